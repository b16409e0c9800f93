"""One front door: the same request through gRPC, the orchestrator link and the dashboard's JSON
API meets the same handlers and the same interceptors, so a refusal has the same status and
message on every door, and a success leaves audit records of one shape.

The orchestrator here is a minimal one in grpcio (from orchestrator.proto): it welcomes the
agent and sends the commands the test gives it, collecting their results.
"""
import concurrent.futures
import json
import os
import queue
import tempfile
import threading

import grpc

from conftest import free_port
from fpga.agent.v1 import agent_pb2 as pb
from test_dashboard import start_web_agent, stop, stub


class CommandingOrchestrator:
    def __init__(self):
        from fpga.orchestrator.v1 import orchestrator_pb2 as opb
        from fpga.orchestrator.v1 import orchestrator_pb2_grpc as orpc
        self.opb = opb
        self.outbox = queue.Queue()
        self.results = {}
        self.changed = threading.Condition()
        self.welcomed = threading.Event()
        orchestrator = self

        class Servicer(orpc.OrchestratorServicer):
            def Connect(self, request_iterator, context):
                def read():
                    try:
                        for message in request_iterator:
                            if message.HasField("hello"):
                                orchestrator.outbox.put(opb.OrchestratorMessage(welcome=opb.Welcome(epoch=1)))
                                orchestrator.welcomed.set()
                            elif message.HasField("result"):
                                with orchestrator.changed:
                                    orchestrator.results[message.result.command_id] = message.result
                                    orchestrator.changed.notify_all()
                    except grpc.RpcError:
                        pass  # the agent (or the test's end) closed the stream
                    orchestrator.outbox.put(None)

                threading.Thread(target=read, daemon=True).start()
                while True:
                    item = orchestrator.outbox.get()
                    if item is None:
                        return
                    yield item

        self.port = free_port()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        orpc.add_OrchestratorServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def config(self, role):
        return f"orchestrator:\n  address: 127.0.0.1:{self.port}\n  role: {role}\n"

    def command(self, command_id, **command):
        """Sends a command (one field of Command) and returns its result."""
        self.outbox.put(self.opb.OrchestratorMessage(
            command=self.opb.Command(command_id=command_id, epoch=1, **command)))
        with self.changed:
            assert self.changed.wait_for(lambda: command_id in self.results, timeout=60), command_id
            return self.results[command_id]

    def stop(self):
        self.outbox.put(None)
        self.server.stop(0)


def audit(agent):
    return [json.loads(line) for line in open(os.path.join(agent.directory, "state", "audit.log"))]


def grpc_error(call):
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name, error.details()
    raise AssertionError("no error")


HTTP_CODES = {"NOT_FOUND": "notFound", "INVALID_ARGUMENT": "invalidArgument", "PERMISSION_DENIED": "permissionDenied"}


def test_the_same_request_meets_the_same_refusal_and_audit_on_every_door():
    orchestrator = CommandingOrchestrator()
    with tempfile.TemporaryDirectory(prefix="fpga-doors-") as directory:
        agent = start_web_agent(directory, config_text=orchestrator.config("operator"))
        try:
            assert orchestrator.welcomed.wait(60), "the agent never connected"
            node = stub(agent)
            refusals = {
                "release of an unknown allocation": (
                    "ReleaseVF", {"allocationId": "alloc-000000000000"},
                    pb.ReleaseVFRequest(allocation_id="alloc-000000000000"), "release"),
                "an allocation on a malformed PF": (
                    "AllocateVF", {"owner": "doors", "constraints": {"pfBdf": "3b:00.0"}},
                    pb.AllocateVFRequest(owner="doors", constraints=pb.AllocationConstraints(pf_bdf="3b:00.0")),
                    "allocate"),
                # The link's role (operator) does not reach a reconfiguration; the socket's
                # (plaintext admin) and the page's do: the role table is the same, the role differs.
            }
            for what, (method, body, message, field) in refusals.items():
                code, details = grpc_error(lambda: getattr(node, method)(message, timeout=30))
                status, reply = agent.http.rpc(method, body)
                assert reply == {"code": code, "message": details}, (what, reply, code, details)
                result = orchestrator.command(f"refused-{field}", **{field: message})
                assert (grpc.StatusCode[code].value[0], result.message) == (result.code, details), (what, result)

            # The link's role, refused by the same table with the same words.
            result = orchestrator.command("too-much", reconfigure=pb.ReconfigureRequest(
                pf_bdf="0000:3b:00.0", vf_count=4, dry_run=True))
            assert result.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
            assert result.message == (
                "Reconfigure needs role admin; orchestrator:127.0.0.1 has role operator: nothing changed"), result

            # Success: one audit record per door, of one shape.
            node.AllocateVF(pb.AllocateVFRequest(owner="via-grpc"), timeout=30)
            assert agent.http.rpc("AllocateVF", {"owner": "via-http"})[0] == 200
            assert orchestrator.command("via-link", allocate=pb.AllocateVFRequest(owner="via-link")).code == 0
            lines = {line["request"]["owner"]: line for line in audit(agent)
                     if line["rpc"] == "AllocateVF" and line["status"] == "ok"}
            assert set(lines) == {"via-grpc", "via-http", "via-link"}, lines
            shapes = {owner: sorted(k for k in line if k not in ("command_id", "idempotency_key"))
                      for owner, line in lines.items()}
            assert shapes["via-grpc"] == shapes["via-http"] == shapes["via-link"], shapes
            assert {owner: line["transport"] for owner, line in lines.items()} == {
                "via-grpc": "tcp-plaintext", "via-http": "http", "via-link": "link"}
            assert lines["via-link"]["command_id"] == "via-link"
            assert lines["via-link"]["identity"] == "orchestrator:127.0.0.1"
            # Refusals are audited on every door too, with their status.
            refused = [(line["transport"], line["status"]) for line in audit(agent) if line["rpc"] == "ReleaseVF"]
            assert sorted(refused) == [("http", "notFound"), ("link", "notFound"), ("tcp-plaintext", "notFound")]
        finally:
            stop(agent)
            orchestrator.stop()
