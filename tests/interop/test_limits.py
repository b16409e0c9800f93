"""A hostile or careless client cannot crash, hang or keep the agent from stopping.

Independent client: Python grpcio and raw sockets against the real binary. The only timed
assertion is the shutdown bound itself; every other wait is a bounded retry loop.
"""
import os
import resource
import signal
import socket
import tempfile
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import BIN, start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc

pytestmark = pytest.mark.skipif(
    not (BIN / "fpga-agent").exists(), reason=f"{BIN / 'fpga-agent'} is not built (swift build)")


def _low_descriptor_limit(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def _served(target, timeout=5):
    with grpc.insecure_channel(target) as channel:
        return rpc.NodeAgentStub(channel).GetNodeStatus(pb.GetNodeStatusRequest(), timeout=timeout)


def _stop(agent, bound=30):
    if agent.process.poll() is None:
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=bound)


def test_an_idle_connection_flood_never_crashes_the_agent():
    # The agent cannot raise its open-file limit above 512 here; it caps its connections below it.
    flood = 700
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)
    if ours[1] != resource.RLIM_INFINITY and ours[1] < flood + 200:
        pytest.skip(f"this process may open only {ours[1]} files; the flood needs {flood + 200}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(ours[0], flood + 200), ours[1]))
    with tempfile.TemporaryDirectory(prefix="fpga-limits-") as directory:
        agent = start_agent(
            directory, env={"FPGA_AGENT_IDLE_TIMEOUT_SECONDS": "3"}, preexec_fn=_low_descriptor_limit(512))
        sockets = []
        try:
            for _ in range(flood):
                s = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
                sockets.append(s)
            # Still alive, and the other listener serves at once.
            assert agent.process.poll() is None
            assert _served(agent.unix).node_id == "interop"
            # The connections over the cap were closed at accept, the idle ones (which never
            # sent the HTTP/2 preface) after the idle timeout: every one ends, none hangs on.
            for s in sockets:
                s.settimeout(30)
                try:
                    assert s.recv(65536) is not None
                    while s.recv(65536):
                        pass
                except (ConnectionResetError, socket.timeout) as error:
                    assert not isinstance(error, socket.timeout), "an idle connection was never closed"
            assert agent.process.poll() is None
            served = None
            for _ in range(50):
                try:
                    served = _served(agent.tcp)
                    break
                except grpc.RpcError:
                    time.sleep(0.2)
            assert served is not None, "TCP clients were not served after the flood"
            log = open(os.path.join(directory, "agent.log")).read()
            assert "server.max_connections" in log
        finally:
            for s in sockets:
                s.close()
            _stop(agent)
            assert agent.process.returncode == 0


def test_150_watches_share_one_connection(agent):
    with grpc.insecure_channel(agent.tcp) as channel:
        node = rpc.NodeAgentStub(channel)
        streams = [node.WatchInventory(pb.WatchInventoryRequest(), timeout=60) for _ in range(150)]
        firsts = [next(stream) for stream in streams]
        assert all(first.HasField("snapshot") for first in firsts)
        # The connection survives: a unary call on it still works, and every stream sees a change.
        allocated = node.AllocateVF(pb.AllocateVFRequest(owner="many-watches"), timeout=10)
        for stream in streams:
            event = next(stream)
            assert event.revision == allocated.revision
        for stream in streams:
            stream.cancel()


def test_sigterm_is_bounded_with_stalled_readers():
    with tempfile.TemporaryDirectory(prefix="fpga-limits-") as directory:
        agent = start_agent(directory, config_text="shutdown_timeout_seconds: 3\n")
        node = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))
        # 200 watchers that never read past their first event.
        channels = [grpc.insecure_channel(agent.tcp) for _ in range(4)]
        stalled = []
        for index in range(200):
            stream = rpc.NodeAgentStub(channels[index % 4]).WatchInventory(pb.WatchInventoryRequest(), timeout=120)
            next(stream)
            stalled.append(stream)
        # Enough changes to fill their flow-control windows: whole PFs of VFs, back and forth.
        for count in [64, 0, 64, 0, 64]:
            operation = node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.0", vf_count=count), timeout=30)
            for _ in node.WatchOperation(pb.WatchOperationRequest(id=operation.id), timeout=60):
                pass
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=30)
        took = time.monotonic() - started
        # The bound: shutdown_timeout_seconds, then at most 5 s of cancellation.
        assert took < 3 + 5 + 4, f"shutdown took {took:.1f} s"
        for channel in channels:
            channel.close()


def test_contract_deviations_are_gone(agent):
    node = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))
    for request in [
        pb.AllocateVFRequest(owner="o", constraints=pb.AllocationConstraints(pf_bdf="0000:3B:00.0")),
        pb.AllocateVFRequest(owner="o", constraints=pb.AllocationConstraints(card_id="card-0000:3B")),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            node.AllocateVF(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        node.ListContexts(pb.ListContextsRequest(accelerator_id="card-0000:3b/acc99"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A long, hostile service name is neither echoed whole nor verbatim.
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(agent.tcp))
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="\x1b[31m\n" + "x" * 100_000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(caught.value.details()) < 200 and "\x1b" not in caught.value.details()
    # The switch to the context that is loaded already returns.
    context = node.RegisterContext(pb.RegisterContextRequest(context=pb.Context(
        accelerator_id="card-0000:3b/acc1", guest="py-loaded", function="f")), timeout=10).context
    for _ in range(3):
        node.SwitchContext(pb.SwitchContextRequest(context_id=context.id, timing=pb.SWITCH_TIMING_NOW), timeout=10)
    # Saved state is bounded.
    with pytest.raises(grpc.RpcError) as caught:
        node.RegisterContext(pb.RegisterContextRequest(context=pb.Context(
            accelerator_id="card-0000:3b/acc1", guest="py-huge", function="f", saved_state_bytes=1 << 40)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in caught.value.details()


SILENT_GUEST = """  vms:
    - name: silent
      root_ports: 4
      acknowledges_unplug: false
shutdown_timeout_seconds: 3
qemu:
  detach_timeout_seconds: 600
"""


def test_sigterm_is_bounded_with_a_silent_guest_and_a_reconfiguration_mid_step():
    with tempfile.TemporaryDirectory(prefix="fpga-limits-") as directory:
        agent = start_agent(directory, config_text=SILENT_GUEST)
        node = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))

        def attached(pf):
            allocation = node.AllocateVF(pb.AllocateVFRequest(
                owner="o", vm="silent", constraints=pb.AllocationConstraints(pf_bdf=pf)), timeout=10).allocation
            node.AttachVF(pb.AttachVFRequest(allocation_id=allocation.id, vm="silent"), timeout=10)
            return allocation

        waiting = attached("0000:3b:00.1")
        attached("0000:3b:00.0")
        # A DetachVF that waits on the silent guest (up to 600 s)...
        outcome = {}

        def detach():
            try:
                node.DetachVF(pb.DetachVFRequest(allocation_id=waiting.id), timeout=120)
                outcome["detach"] = "OK"
            except grpc.RpcError as error:
                outcome["detach"] = error.code()

        thread = threading.Thread(target=detach)
        thread.start()
        # ...and a reconfiguration whose detach step waits on it too.
        operation = node.Reconfigure(pb.ReconfigureRequest(
            pf_bdf="0000:3b:00.0", vf_count=0, strategy=pb.RECONFIGURE_STRATEGY_DETACH_REATTACH), timeout=10)
        for _ in range(200):
            current = node.GetOperation(pb.GetOperationRequest(id=operation.id), timeout=10)
            if any(step.description.startswith("detach") and step.state == pb.OPERATION_STATE_RUNNING
                   for step in current.steps):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the reconfiguration never reached its detach step: {current}")
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=30)
        took = time.monotonic() - started
        assert took < 3 + 5 + 4, f"shutdown took {took:.1f} s"
        thread.join(timeout=30)
        assert outcome["detach"] != "OK"
        # At the next start the journal takes the operation up again and finishes it.
        agent = start_agent(directory, config_text=SILENT_GUEST)
        node = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))
        try:
            final = None
            for update in node.WatchOperation(pb.WatchOperationRequest(id=operation.id), timeout=60):
                final = update
            assert final is not None and final.state in (pb.OPERATION_STATE_SUCCEEDED, pb.OPERATION_STATE_FAILED)
            assert "rolled back at restart" in final.error
        finally:
            _stop(agent)


def test_a_call_without_a_deadline_gets_the_default_one_but_watches_do_not():
    with tempfile.TemporaryDirectory(prefix="fpga-limits-") as directory:
        agent = start_agent(directory, config_text=SILENT_GUEST + "server:\n  default_deadline_seconds: 2\n")
        node = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))
        try:
            watch = node.WatchInventory(pb.WatchInventoryRequest())  # no deadline
            assert next(watch).HasField("snapshot")
            allocation = node.AllocateVF(pb.AllocateVFRequest(owner="o", vm="silent"), timeout=10).allocation
            node.AttachVF(pb.AttachVFRequest(allocation_id=allocation.id, vm="silent"), timeout=10)
            # The guest never acknowledges and the detach would wait 600 s: the client set no
            # deadline, so the agent's default ends the call.
            with pytest.raises(grpc.RpcError) as caught:
                node.DetachVF(pb.DetachVFRequest(allocation_id=allocation.id))
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()
            # The watch outlived the default deadline and still carries changes.
            other = node.AllocateVF(pb.AllocateVFRequest(owner="later"), timeout=10).allocation
            for event in watch:
                if event.HasField("delta") and any(
                        c.HasField("allocation_updated") and c.allocation_updated.id == other.id for c in event.delta.changes):
                    break
            watch.cancel()
            assert node.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10).node_id == "interop"
        finally:
            _stop(agent)
