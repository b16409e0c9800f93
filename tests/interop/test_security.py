"""Only those allowed command a node: mTLS on TCP, roles, the audit trail, the Unix socket's mode.

Certificates are made at test time with the openssl command line; the client is Python grpcio.
"""
import json
import os
import shutil
import stat
import subprocess
import tempfile

import grpc
import pytest

from conftest import BIN, free_port, start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc

pytestmark = [
    pytest.mark.skipif(not (BIN / "fpga-agent").exists(), reason=f"{BIN / 'fpga-agent'} is not built (swift build)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=folder)


def issue(folder, ca, name, days="30", san=None, expired=False):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)
    extensions = os.path.join(folder, f"{name}.ext")
    with open(extensions, "w") as f:
        f.write("basicConstraints=CA:FALSE\n")
        if san:
            f.write(f"subjectAltName={san}\n")
    args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-extfile", extensions]
    openssl(*args + ["-days", days], cwd=folder)
    if expired:
        _reissue_expired(folder, ca, name)


def _reissue_expired(folder, ca, name):
    """The same key and subject, signed by the same CA, valid only in January 2020 (openssl 3.0's
    x509 command cannot set past dates)."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert = x509.load_pem_x509_certificate(open(os.path.join(folder, f"{ca}.pem"), "rb").read())
    ca_key = serialization.load_pem_private_key(open(os.path.join(folder, f"{ca}.key"), "rb").read(), None)
    leaf = x509.load_pem_x509_certificate(open(os.path.join(folder, f"{name}.pem"), "rb").read())
    expired = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(ca_cert.subject)
               .public_key(leaf.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(datetime.datetime(2020, 1, 1)).not_valid_after(datetime.datetime(2020, 1, 2))
               .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(folder, f"{name}.pem"), "wb") as f:
        f.write(expired.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki():
    folder = tempfile.mkdtemp(prefix="fpga-pki-")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    issue(folder, "ca", "agent", san="IP:127.0.0.1,DNS:localhost")
    for name in ["viewer-client", "operator-client", "admin-client", "nobody-client"]:
        issue(folder, "ca", name)
    issue(folder, "ca", "expired-client", expired=True)
    issue(folder, "other-ca", "stranger")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


ROLES = """auth:
  plaintext_role: none
  roles:
    cn:viewer-client: viewer
    cn:operator-client: operator
    cn:admin-client: admin
    cn:expired-client: admin
    cn:stranger: admin
"""


@pytest.fixture(scope="module")
def secured(pki):
    with tempfile.TemporaryDirectory(prefix="fpga-secure-") as directory:
        agent = start_agent(
            directory,
            extra=("--tls-cert", os.path.join(pki, "agent.pem"), "--tls-key", os.path.join(pki, "agent.key"),
                   "--tls-client-ca", os.path.join(pki, "ca.pem")),
            config_text=ROLES, health_over_unix=True)
        yield agent
        agent.process.terminate()
        agent.process.wait(timeout=30)


def client(agent, pki, name):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=open(os.path.join(pki, "ca.pem"), "rb").read(),
        private_key=open(os.path.join(pki, f"{name}.key"), "rb").read() if name else None,
        certificate_chain=open(os.path.join(pki, f"{name}.pem"), "rb").read() if name else None)
    return rpc.NodeAgentStub(grpc.secure_channel(agent.tcp, credentials))


def code_of(call):
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def revision(agent, pki):
    return client(agent, pki, "admin-client").GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10).revision


@pytest.mark.parametrize("name", [None, "stranger", "expired-client"])
def test_no_certificate_another_ca_or_expired_is_refused_at_the_handshake(secured, pki, name):
    code, _ = code_of(lambda: client(secured, pki, name).GetNodeStatus(pb.GetNodeStatusRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_each_role_gets_what_it_may(secured, pki):
    before = revision(secured, pki)
    viewer = client(secured, pki, "viewer-client")
    assert viewer.GetInventory(pb.GetInventoryRequest(), timeout=10).revision >= before
    mutating = [
        lambda stub: stub.AllocateVF(pb.AllocateVFRequest(owner="v"), timeout=10),
        lambda stub: stub.ReleaseVF(pb.ReleaseVFRequest(allocation_id="alloc-000000000000"), timeout=10),
        lambda stub: stub.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.3", vf_count=2), timeout=10),
        lambda stub: stub.DrainDevice(pb.DrainDeviceRequest(device="0000:3b:00.3"), timeout=10),
        lambda stub: stub.Rescan(pb.RescanRequest(), timeout=10),
    ]
    for call in mutating:
        code, details = code_of(lambda: call(viewer))
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "needs role" in details
    assert revision(secured, pki) == before
    nobody = client(secured, pki, "nobody-client")
    code, details = code_of(lambda: nobody.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "cn:nobody-client has no role" in details
    operator = client(secured, pki, "operator-client")
    allocated = operator.AllocateVF(pb.AllocateVFRequest(owner="op", meta=pb.RequestMeta(idempotency_key="sec-1")),
                                    timeout=10)
    code, _ = code_of(lambda: mutating[2](operator))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    admin = client(secured, pki, "admin-client")
    operation = admin.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.3", vf_count=2), timeout=10)
    assert operation.id.startswith("op-")
    operator.ReleaseVF(pb.ReleaseVFRequest(allocation_id=allocated.allocation.id), timeout=10)
    # The audit trail has a line per mutating request, denied ones included.
    lines = [json.loads(line) for line in open(os.path.join(secured.directory, "state", "audit.log"))]
    denied = [line for line in lines if line["identity"] == "cn:viewer-client"]
    assert len(denied) == len(mutating) and all(line["status"] == "permissionDenied" for line in denied)
    allocate = next(line for line in lines if line["rpc"] == "AllocateVF" and line["status"] == "ok")
    assert allocate["identity"] == "cn:operator-client" and allocate["idempotency_key"] == "sec-1"
    assert allocate["transport"] == "tcp-tls" and allocate["request"]["owner"] == "op"
    assert any(line["rpc"] == "Reconfigure" and line["identity"] == "cn:admin-client" for line in lines)
    assert stat.S_IMODE(os.stat(os.path.join(secured.directory, "state", "audit.log")).st_mode) == 0o600


def test_fpgactl_with_certificates_and_whoami(secured, pki):
    tls = ["--tls-cert", os.path.join(pki, "operator-client.pem"), "--tls-key", os.path.join(pki, "operator-client.key"),
           "--tls-ca", os.path.join(pki, "ca.pem")]
    out = subprocess.run([str(BIN / "fpgactl"), "whoami", "--server", secured.tcp, *tls], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cn:operator-client operator"
    wrong = subprocess.run([str(BIN / "fpgactl"), "status", "--server", secured.tcp, "--tls-cert",
                            os.path.join(pki, "stranger.pem"), "--tls-key", os.path.join(pki, "stranger.key"),
                            "--tls-ca", os.path.join(pki, "ca.pem")], capture_output=True, text=True)
    assert wrong.returncode == 3 and "--tls-cert" in wrong.stderr
    # The Unix socket: 0660 whatever the umask, and the agent's own user is admin there.
    assert stat.S_IMODE(os.stat(secured.socket_path).st_mode) == 0o660
    mine = subprocess.run([str(BIN / "fpgactl"), "whoami", "--server", secured.unix], capture_output=True, text=True)
    assert mine.returncode == 0 and mine.stdout.strip() == f"uid:{os.geteuid()} admin", mine.stderr


def test_plaintext_on_a_network_address_is_refused_at_start():
    with tempfile.TemporaryDirectory(prefix="fpga-secure-") as directory:
        out = subprocess.run(
            [str(BIN / "fpga-agent"), "--listen", f"0.0.0.0:{free_port()}", "--unix-socket", "",
             "--state-dir", os.path.join(directory, "state")], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "server.tls.cert" in out.stderr + out.stdout and "server.insecure" in out.stderr + out.stdout


def test_a_loose_state_directory_is_refused():
    with tempfile.TemporaryDirectory(prefix="fpga-secure-") as directory:
        state = os.path.join(directory, "state")
        os.mkdir(state, 0o755)
        os.chmod(state, 0o755)
        out = subprocess.run([str(BIN / "fpga-agent"), "--listen", "", "--unix-socket", os.path.join(directory, "s"),
                              "--state-dir", state], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "chmod 700" in out.stderr + out.stdout
