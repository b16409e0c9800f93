"""Only those allowed command a node: mTLS on TCP, roles, the audit trail, the Unix socket's mode.

Certificates are made at test time with the openssl command line; the client is Python grpcio.
"""
import json
import os
import shutil
import stat
import subprocess
import socket
import tempfile
import time

import grpc
import pytest

from conftest import BIN, free_port, start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc
from fpga.orchestrator.v1 import orchestrator_pb2 as opb

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
    # The orchestrator link: the orchestrator's server certificate, the agent's client one, and
    # an impostor with the right name from another CA.
    issue(folder, "ca", "orchestrator", san="DNS:orchestrator.test,IP:127.0.0.1")
    issue(folder, "ca", "node-link")
    issue(folder, "other-ca", "impostor", san="DNS:orchestrator.test,IP:127.0.0.1")
    # A rotation: a second CA, and the agent's next certificate from it.
    make_ca(folder, "next-ca")
    issue(folder, "next-ca", "agent-next", san="IP:127.0.0.1,DNS:localhost")
    issue(folder, "next-ca", "next-admin")
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


def _link_config(pki, port, role="operator", server="orchestrator.test"):
    return (f"orchestrator:\n  address: 127.0.0.1:{port}\n  server_name: {server}\n  role: {role}\n"
            f"  tls:\n    cert: {pki}/node-link.pem\n    key: {pki}/node-link.key\n    ca: {pki}/ca.pem\n")


def _orchestrator(directory, pki, port, certificate="orchestrator"):
    from test_orchestrator import Orchestrator
    return Orchestrator(directory, port, epoch=1, tls=(
        os.path.join(pki, f"{certificate}.pem"), os.path.join(pki, f"{certificate}.key"), os.path.join(pki, "ca.pem"),
        os.path.join(pki, "admin-client.pem"), os.path.join(pki, "admin-client.key"),
        os.path.join(pki, "ca.pem" if certificate == "orchestrator" else "other-ca.pem")))


def _audit(agent):
    return [json.loads(line) for line in open(os.path.join(agent.directory, "state", "audit.log"))]


def _stop(agent):
    agent.process.terminate()
    agent.process.wait(timeout=30)


def test_the_orchestrator_link_over_mtls_runs_commands_with_its_role(pki):
    with tempfile.TemporaryDirectory(prefix="fpga-link-") as directory:
        port = free_port()
        orchestrator = _orchestrator(directory, pki, port)
        try:
            # role operator: allocations and contexts are carried out, and audited.
            operator_dir = os.path.join(directory, "operator")
            os.mkdir(operator_dir)
            agent = start_agent(operator_dir, config_text=_link_config(pki, port))
            try:
                # Connected and its inventory reported (the placement needs its free VFs).
                orchestrator.wait(lambda v: any(n.connected and n.vfs_free > 0 for n in v.nodes),
                                  "the agent connected over mTLS")
                placed = orchestrator.stub.PlaceVF(opb.PlaceVFRequest(guest="g-1", request_id="r1"), timeout=30)
                assert placed.allocation_id.startswith("alloc-")
                line = next(l for l in _audit(agent) if l["transport"] == "link")
                assert line["identity"] == "orchestrator:orchestrator.test" and line["rpc"] == "AllocateVF"
                assert line["status"] == "ok" and line["command_id"] == "place-vf-r1"
                assert line["idempotency_key"] == "place-vf-r1" and line["request"]["owner"] == "g-1"
                # fpgactl audit (admin: the agent's own user on the socket) shows it.
                out = subprocess.run([str(BIN / "fpgactl"), "audit", "--server", agent.unix], capture_output=True,
                                     text=True, timeout=30)
                assert out.returncode == 0, out.stderr
                assert "orchestrator:orchestrator.test" in out.stdout and "place-vf-r1" in out.stdout, out.stdout
            finally:
                _stop(agent)
            # role viewer: the same command is refused, audited, and changes nothing.
            viewer_dir = os.path.join(directory, "viewer")
            os.mkdir(viewer_dir)
            agent = start_agent(viewer_dir, config_text=_link_config(pki, port, role="viewer"))
            try:
                # The same node id as the first agent: wait for this agent's own connection (the
                # orchestrator may not yet have noticed that the first one's stream ended).
                orchestrator.wait(lambda v: any(n.connected and n.node_id == "interop" and n.connections >= 2
                                                and n.vfs_free > 0 for n in v.nodes), "the viewer agent connected")
                code, details = code_of(lambda: orchestrator.stub.PlaceVF(
                    opb.PlaceVFRequest(guest="g-2", request_id="r2"), timeout=30))
                assert code == grpc.StatusCode.PERMISSION_DENIED and "needs role operator" in details, details
                refused = [l for l in _audit(agent) if l["transport"] == "link"]
                assert [l["status"] for l in refused] == ["permissionDenied"]
                inventory = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp)).GetInventory(
                    pb.GetInventoryRequest(), timeout=10)
                assert list(inventory.allocations) == []
            finally:
                _stop(agent)
        finally:
            orchestrator.stop()


def test_an_orchestrator_from_another_ca_is_refused(pki):
    with tempfile.TemporaryDirectory(prefix="fpga-link-") as directory:
        port = free_port()
        impostor = _orchestrator(directory, pki, port, certificate="impostor")
        try:
            agent = start_agent(directory, config_text=_link_config(pki, port))
            try:
                stub = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))
                deadline = time.monotonic() + 30
                while True:
                    link = stub.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10).orchestrator
                    if link.state == "disconnected" and link.error:
                        break
                    assert time.monotonic() < deadline, link
                    time.sleep(0.2)
                assert link.connections == 0
                assert not any(n.connected for n in impostor.cluster().nodes)
            finally:
                _stop(agent)
        finally:
            impostor.stop()


def test_fpgactl_audit_is_for_admins(secured, pki):
    tls = ["--tls-cert", os.path.join(pki, "operator-client.pem"), "--tls-key", os.path.join(pki, "operator-client.key"),
           "--tls-ca", os.path.join(pki, "ca.pem")]
    out = subprocess.run([str(BIN / "fpgactl"), "audit", "--server", secured.tcp, *tls], capture_output=True, text=True)
    assert out.returncode == 1 and "needs role admin" in out.stderr, out.stderr
    admin = ["--tls-cert", os.path.join(pki, "admin-client.pem"), "--tls-key", os.path.join(pki, "admin-client.key"),
             "--tls-ca", os.path.join(pki, "ca.pem")]
    out = subprocess.run([str(BIN / "fpgactl"), "audit", "-n", "3", "--json", "--server", secured.tcp, *admin],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    assert 0 < len(entries) <= 3 and all("rpc" in e and "identity" in e for e in entries)
    # Reading the trail is not itself a mutating request.
    assert not any(e["rpc"] == "GetAuditTrail" for e in entries)


def _handshake_certificate(port, pki, client, ca):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(os.path.join(pki, f"{ca}.pem"))
    context.load_cert_chain(os.path.join(pki, f"{client}.pem"), os.path.join(pki, f"{client}.key"))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def test_certificates_replaced_while_serving_are_picked_up(pki):
    from cryptography import x509
    with tempfile.TemporaryDirectory(prefix="fpga-rotate-") as directory:
        served = os.path.join(directory, "tls")
        os.mkdir(served)
        shutil.copy(os.path.join(pki, "agent.pem"), os.path.join(served, "tls.crt"))
        shutil.copy(os.path.join(pki, "agent.key"), os.path.join(served, "tls.key"))
        # The client CA bundle holds the old and the next CA during the rotation.
        with open(os.path.join(served, "ca.crt"), "wb") as bundle:
            for name in ["ca", "next-ca"]:
                bundle.write(open(os.path.join(pki, f"{name}.pem"), "rb").read())
        agent = start_agent(
            directory,
            extra=("--tls-cert", os.path.join(served, "tls.crt"), "--tls-key", os.path.join(served, "tls.key"),
                   "--tls-client-ca", os.path.join(served, "ca.crt")),
            config_text=ROLES.replace("    cn:stranger: admin\n", "    cn:stranger: admin\n    cn:next-admin: admin\n")
            + "server:\n  tls:\n    reload_seconds: 1\n", health_over_unix=True)
        try:
            first = x509.load_der_x509_certificate(_handshake_certificate(agent.port, pki, "admin-client", "ca"))
            assert first.subject.rfc4514_string() == "CN=agent"
            # Clients of both CAs get in meanwhile.
            assert client(agent, pki, "admin-client").GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10).node_id
            # Replace key and certificate (key first, as cert-manager's Secret update may land).
            for name, target in [("agent-next.key", "tls.key"), ("agent-next.pem", "tls.crt")]:
                shutil.copy(os.path.join(pki, name), os.path.join(served, target + ".new"))
                os.replace(os.path.join(served, target + ".new"), os.path.join(served, target))
            deadline = time.monotonic() + 30
            while True:
                try:
                    seen = x509.load_der_x509_certificate(
                        _handshake_certificate(agent.port, pki, "next-admin", "next-ca"))
                    if seen.issuer.rfc4514_string() == "CN=next-ca":
                        break
                except (OSError, ValueError):
                    pass  # still the old certificate: the next CA does not verify it
                assert time.monotonic() < deadline, "the agent kept its old certificate"
                time.sleep(0.2)
            assert agent.process.poll() is None
        finally:
            _stop(agent)


def test_a_non_root_user_on_the_socket_gets_its_mapped_role_or_nothing():
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("needs root, useradd and runuser to create a local user")
    user, group = "fpga-test-user", "fpga-test-sock"
    subprocess.run(["groupadd", "-f", group], check=True)
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", user], check=True)
    uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True, check=True).stdout)
    # A copy of fpgactl the user can run, whatever the checkout's modes.
    tools = tempfile.mkdtemp(prefix="fpga-user-")
    os.chmod(tools, 0o755)
    shutil.copy(BIN / "fpgactl", os.path.join(tools, "fpgactl"))
    os.chmod(os.path.join(tools, "fpgactl"), 0o755)
    socket_dir = os.path.join(tools, "run")
    os.mkdir(socket_dir)
    os.chmod(socket_dir, 0o755)
    sock = os.path.join(socket_dir, "agent.sock")

    def as_user(*args):
        return subprocess.run(["runuser", "-u", user, "--", os.path.join(tools, "fpgactl"), *args,
                               "--server", f"unix:{sock}"], capture_output=True, text=True, timeout=60)

    def agent_with(directory, roles):
        config = f"server:\n  unix_socket: {sock}\n  socket_group: {group}\nauth:\n  plaintext_role: admin\n" + roles
        return start_agent(directory, config_text=config, extra=("--unix-socket", sock))

    try:
        with tempfile.TemporaryDirectory(prefix="fpga-user-") as directory:
            # Outside the socket's group: the socket itself is closed to the user (0660).
            agent = agent_with(directory, f"  roles:\n    uid:{uid}: operator\n")
            try:
                assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
                out = as_user("whoami")
                assert out.returncode == 3, out
                # In the group, with the role mapped to its uid: operator, no more.
                subprocess.run(["usermod", "-a", "-G", group, user], check=True)
                out = as_user("whoami")
                assert out.returncode == 0 and out.stdout.strip() == f"uid:{uid} operator", out
                out = as_user("allocate", "--owner", "local-user", "--key", "user-1")
                assert out.returncode == 0 and "allocated" in out.stdout, out
                out = as_user("reconfigure", "0000:3b:00.3", "2")
                assert out.returncode == 1 and "needs role admin" in out.stderr, out
                lines = [l for l in _audit(agent) if l["identity"] == f"uid:{uid}"]
                assert [(l["rpc"], l["status"]) for l in lines] == [("AllocateVF", "ok"),
                                                                    ("Reconfigure", "permissionDenied")]
            finally:
                _stop(agent)
        with tempfile.TemporaryDirectory(prefix="fpga-user-") as directory:
            # In the group but with no role: identified, and refused.
            agent = agent_with(directory, "")
            try:
                out = as_user("whoami")
                assert out.returncode == 1 and f"uid:{uid} has no role" in out.stderr, out
            finally:
                _stop(agent)
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(tools, ignore_errors=True)
