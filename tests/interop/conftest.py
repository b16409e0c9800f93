"""Fixtures for the interoperability tests: Python grpcio against the real fpga-agent binary.

Stubs are generated at test time from Protos/ with grpcio-tools, so the Python side shares
nothing with the Swift code but the .proto files.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = Path(__file__).resolve().parent / ".generated"


def _generate_stubs():
    from grpc_tools import protoc

    GENERATED.mkdir(exist_ok=True)
    # Health comes from grpcio-health-checking: an independent client of grpc.health.v1.
    protos = ["fpga/agent/v1/agent.proto", "k8s/deviceplugin/v1beta1/api.proto", "fpga/orchestrator/v1/orchestrator.proto",
              # The kubelet's DRA contract (test_dra.py's fake kubelet).
              "k8s/pluginregistration/v1/api.proto", "k8s/dra/v1/api.proto", "k8s/dra/v1beta1/api.proto",
              "k8s/drahealth/v1alpha1/api.proto", "k8s/drahealth/v1/api.proto"]
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(
        ["protoc", f"-I{ROOT / 'Protos'}", f"-I{include}", f"--python_out={GENERATED}",
         f"--grpc_python_out={GENERATED}"] + protos
    )
    assert code == 0, "grpcio-tools could not compile Protos/"
    sys.path.insert(0, str(GENERATED))


_generate_stubs()


def bin_dir():
    if os.environ.get("FPGA_AGENT_BIN_DIR"):
        return Path(os.environ["FPGA_AGENT_BIN_DIR"])
    out = subprocess.run(["swift", "build", "--show-bin-path"], cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


BIN = bin_dir()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, port, socket_path, process, directory):
        self.port = port
        self.socket_path = socket_path
        self.process = process
        self.directory = directory

    @property
    def tcp(self):
        return f"127.0.0.1:{self.port}"

    @property
    def unix(self):
        return f"unix:{self.socket_path}"


def start_agent(directory, extra=(), env=None, preexec_fn=None, config_text="", health_over_unix=False):
    port = free_port()
    socket_path = os.path.join(directory, "agent.sock")
    log = open(os.path.join(directory, "agent.log"), "w")
    # No workload generator: its accelerator figures would add revisions while tests count them.
    config = os.path.join(directory, "agent.yaml")
    with open(config, "w") as f:
        # The tests drive the API over loopback TCP without certificates (test_security.py
        # covers TLS and roles).
        auth = "" if "auth:" in config_text else "auth:\n  plaintext_role: admin\n"
        f.write("simulator:\n  workloads: []\n" + config_text + auth)
    process = subprocess.Popen(
        [str(BIN / "fpga-agent"), "--config", config, "--listen", f"127.0.0.1:{port}", "--unix-socket", socket_path,
         "--state-dir", os.path.join(directory, "state"), "--node-id", "interop",
         # The HTTP listener only where a test asks for it: an ephemeral port of its own could take
         # the port picked above for gRPC before the gRPC server binds it.
         *([] if "--http-listen" in extra else ["--http-listen", ""]), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=None if env is None else {**os.environ, **env},
        preexec_fn=preexec_fn,
    )
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError("fpga-agent exited: " + open(os.path.join(directory, "agent.log")).read())
        try:
            with grpc.insecure_channel(f"unix:{socket_path}" if health_over_unix else f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("fpga-agent did not become healthy in 60 s")
        time.sleep(0.1)
    return Agent(port, socket_path, process, directory)


@pytest.fixture
def agent():
    with tempfile.TemporaryDirectory(prefix="fpga-interop-") as directory:
        agent = start_agent(directory)
        yield agent
        if agent.process.poll() is None:
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=30)
