"""Python grpcio calls the Swift agent: the node API, its stream, health, over TCP and Unix."""
import json
import os
import signal
import subprocess
import tempfile
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2 as independent_health_pb2
from grpc_health.v1 import health_pb2_grpc as independent_health_grpc

from conftest import BIN, start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc


def stub(target):
    return rpc.NodeAgentStub(grpc.insecure_channel(target))


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_allocate_and_release(agent, transport):
    node = stub(getattr(agent, transport))
    status = node.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10)
    assert status.node_id == "interop"
    assert status.health == pb.NODE_HEALTH_SERVING
    assert (status.cards, status.pfs, status.vfs_enabled) == (2, 8, 52)

    request = pb.AllocateVFRequest(
        meta=pb.RequestMeta(idempotency_key="py-1"), owner="python", vm="vm-py",
        constraints=pb.AllocationConstraints(numa_node=1))
    first = node.AllocateVF(request, timeout=10)
    assert first.allocation.vf_bdf == "0000:d8:00.4"
    assert first.vf.state == pb.VF_STATE_ALLOCATED
    retry = node.AllocateVF(request, timeout=10)
    assert retry.replayed and retry.allocation.id == first.allocation.id

    inventory = node.GetInventory(pb.GetInventoryRequest(), timeout=10)
    assert [a.id for a in inventory.allocations] == [first.allocation.id]
    assert inventory.revision == first.revision

    released = node.ReleaseVF(pb.ReleaseVFRequest(allocation_id=first.allocation.id), timeout=10)
    assert released.allocation.id == first.allocation.id
    assert released.revision == first.revision + 1


def test_errors_have_precise_codes(agent):
    node = stub(agent.tcp)
    cases = [
        (pb.AllocateVFRequest(owner=""), grpc.StatusCode.INVALID_ARGUMENT, "owner is required"),
        (pb.AllocateVFRequest(owner="o", constraints=pb.AllocationConstraints(pf_bdf="../../sys")),
         grpc.StatusCode.INVALID_ARGUMENT, "is not a PCI address"),
        (pb.AllocateVFRequest(owner="o", constraints=pb.AllocationConstraints(pf_bdf="0000:99:00.0")),
         grpc.StatusCode.NOT_FOUND, "not managed by this node"),
        (pb.AllocateVFRequest(owner="o", constraints=pb.AllocationConstraints(pf_bdf="0000:3b:00.2")),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "no enabled VF"),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as caught:
            node.AllocateVF(request, timeout=10)
        assert caught.value.code() == code
        assert text in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        node.ReleaseVF(pb.ReleaseVFRequest(allocation_id="alloc-0123456789ab"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.0", vf_count=65), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vf_count 65 is out of range for PF 0000:3b:00.0: it supports 0 to 64 VFs" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        node.Reconfigure(pb.ReconfigureRequest(pf_bdf="../sys", vf_count=1), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_reconfigure_dry_run_then_run(agent):
    node = stub(agent.tcp)
    allocation = node.AllocateVF(
        pb.AllocateVFRequest(owner="py", constraints=pb.AllocationConstraints(pf_bdf="0000:3b:00.0")), timeout=10).allocation
    plan = node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.0", vf_count=2, dry_run=True), timeout=10)
    assert plan.state == pb.OPERATION_STATE_PLANNED
    assert [(i.allocation_id, i.outcome, i.guest_sees) for i in plan.impacts] == [(allocation.id, "kept", "nothing")]
    started = node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.0", vf_count=2), timeout=10)
    states = [op.state for op in node.WatchOperation(pb.WatchOperationRequest(id=started.id), timeout=30)]
    assert states[-1] == pb.OPERATION_STATE_SUCCEEDED
    inventory = node.GetInventory(pb.GetInventoryRequest(), timeout=10)
    pf = next(p for card in inventory.cards for p in card.pfs if p.bdf == "0000:3b:00.0")
    assert pf.num_vfs == 2 and [a.id for a in inventory.allocations] == [allocation.id]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_watch_inventory_stream(agent, transport):
    node = stub(getattr(agent, transport))
    stream = node.WatchInventory(pb.WatchInventoryRequest(), timeout=30)
    first = next(stream)
    assert first.WhichOneof("event") == "snapshot"
    assert len(first.snapshot.cards) == 2 and not first.resync
    allocated = node.AllocateVF(pb.AllocateVFRequest(owner="watcher"), timeout=10)
    delta = next(stream)
    assert delta.revision == first.revision + 1
    kinds = [change.WhichOneof("change") for change in delta.delta.changes]
    assert kinds[0] == "allocation_updated"
    assert delta.delta.changes[0].allocation_updated.id == allocated.allocation.id
    assert "vf_updated" in kinds
    stream.cancel()

    resumed = node.WatchInventory(pb.WatchInventoryRequest(from_revision=first.revision), timeout=30)
    assert next(resumed) == delta
    resumed.cancel()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_health_with_the_independent_client(agent, transport):
    channel = grpc.insecure_channel(getattr(agent, transport))
    health = independent_health_grpc.HealthStub(channel)
    for service in ["", "fpga.agent.v1.NodeAgent"]:
        reply = health.Check(independent_health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == independent_health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(independent_health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(independent_health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == independent_health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_sigterm_ends_watches_reports_not_serving_and_removes_the_socket(agent):
    channel = grpc.insecure_channel(agent.tcp)
    health = independent_health_grpc.HealthStub(channel).Watch(
        independent_health_pb2.HealthCheckRequest(), timeout=60)
    assert next(health).status == independent_health_pb2.HealthCheckResponse.SERVING
    events = stub(agent.tcp).WatchInventory(pb.WatchInventoryRequest(), timeout=60)
    assert next(events).WhichOneof("event") == "snapshot"

    agent.process.send_signal(signal.SIGTERM)
    assert next(health).status == independent_health_pb2.HealthCheckResponse.NOT_SERVING
    assert list(events) == []  # the stream ends cleanly
    assert agent.process.wait(timeout=30) == 0
    assert not os.path.exists(agent.socket_path)
    log = open(os.path.join(agent.directory, "agent.log")).read()
    assert "fpga-agent stopped" in log


def test_gzip_requests_are_accepted(agent):
    channel = grpc.insecure_channel(agent.tcp, compression=grpc.Compression.Gzip)
    reply = rpc.NodeAgentStub(channel).GetInventory(pb.GetInventoryRequest(), timeout=10)
    assert len(reply.cards) == 2


def test_concurrent_allocations_never_share_a_vf(agent):
    node = stub(agent.tcp)
    results, errors = [], []

    def worker(index):
        try:
            for n in range(5):
                reply = node.AllocateVF(pb.AllocateVFRequest(owner=f"w{index}"), timeout=10)
                results.append(reply.allocation.vf_bdf)
        except grpc.RpcError as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 40 and len(set(results)) == 40


def test_fpgactl_binary_against_the_agent(agent):
    out = subprocess.run([str(BIN / "fpgactl"), "--server", agent.unix, "inventory", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    inventory = json.loads(out.stdout)
    assert [card["id"] for card in inventory["cards"]] == ["card-0000:3b", "card-0000:d8"]
    unreachable = subprocess.run([str(BIN / "fpgactl"), "--server", "127.0.0.1:1", "status"],
                                 capture_output=True, text=True, timeout=30)
    assert unreachable.returncode == 3
    assert "cannot reach the agent at 127.0.0.1:1" in unreachable.stderr


def test_invalid_configuration_is_refused_naming_the_key():
    with tempfile.TemporaryDirectory() as directory:
        config = os.path.join(directory, "agent.yaml")
        with open(config, "w") as f:
            f.write("server:\n  listen: nowhere\nplatfrom: simulated\n")
        out = subprocess.run([str(BIN / "fpga-agent"), "--config", config, "--state-dir", directory],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert "unknown key platfrom" in out.stderr
        out = subprocess.run([str(BIN / "fpga-agent"), "--platform", "windows", "--state-dir", directory],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert "The value 'windows' is invalid for '--platform <platform>'. Please provide one of 'simulated' and 'linux'" in out.stderr


def test_a_corrupt_state_store_stops_the_agent_and_is_left_alone():
    with tempfile.TemporaryDirectory() as directory:
        state = os.path.join(directory, "state")
        os.makedirs(state)
        os.chmod(state, 0o700)  # a loose state dir is refused before the store is read
        garbage = os.urandom(8192)
        with open(os.path.join(state, "state.sqlite"), "wb") as f:
            f.write(garbage)
        out = subprocess.run(
            [str(BIN / "fpga-agent"), "--state-dir", state, "--listen", "127.0.0.1:0",
             "--unix-socket", os.path.join(directory, "a.sock")],
            capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert "is corrupt or not an SQLite database: the agent will not start on it and will not replace it" in out.stderr
        with open(os.path.join(state, "state.sqlite"), "rb") as f:
            assert f.read() == garbage


def test_records_survive_a_restart_of_the_binary():
    with tempfile.TemporaryDirectory(prefix="fpga-restart-") as directory:
        agent = start_agent(directory)
        node = stub(agent.tcp)
        request = pb.AllocateVFRequest(meta=pb.RequestMeta(idempotency_key="restart-1", orchestrator_epoch=9), owner="py")
        first = node.AllocateVF(request, timeout=10)
        node.DrainDevice(pb.DrainDeviceRequest(device="0000:d8:00.1"), timeout=10)
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=30)
        agent = start_agent(directory)
        try:
            node = stub(agent.tcp)
            again = node.AllocateVF(request, timeout=10)
            assert again.replayed and again.allocation.id == first.allocation.id
            inventory = node.GetInventory(pb.GetInventoryRequest(), timeout=10)
            assert [a.id for a in inventory.allocations] == [first.allocation.id]
            assert any(p.draining for c in inventory.cards for p in c.pfs if p.bdf == "0000:d8:00.1")
            with pytest.raises(grpc.RpcError) as caught:
                node.AllocateVF(pb.AllocateVFRequest(meta=pb.RequestMeta(orchestrator_epoch=8), owner="py"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert node.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10).orchestrator_epoch == 9
        finally:
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=30)


def test_contexts_and_sharing_over_grpcio(agent):
    node = stub(agent.tcp)
    accelerator = "card-0000:3b/acc0"
    ids = {}
    for guest, weight in [("py-a", 1), ("py-b", 3)]:
        response = node.RegisterContext(pb.RegisterContextRequest(context=pb.Context(
            accelerator_id=accelerator, guest=guest, function="aes256-gcm", parameters={"mode": "gcm"},
            saved_state_bytes=65536, weight=weight)), timeout=10)
        assert response.context.id.startswith("ctx-") and not response.replayed
        ids[guest] = response.context.id
    switched = node.SwitchContext(pb.SwitchContextRequest(context_id=ids["py-b"], timing=pb.SWITCH_TIMING_NOW), timeout=10)
    assert switched.switched and switched.switch_time.ToNanoseconds() > 0
    from google.protobuf import duration_pb2
    policy = node.SetSharingPolicy(pb.SetSharingPolicyRequest(policy=pb.SharingPolicy(
        accelerator_id=accelerator, time_slice=duration_pb2.Duration(nanos=5_000_000), overcommit_limit=2)), timeout=10)
    assert policy.policy.overcommit_limit == 2 and dict(policy.policy.weights) == {"py-a": 1, "py-b": 3}
    with pytest.raises(grpc.RpcError) as caught:
        node.RegisterContext(pb.RegisterContextRequest(context=pb.Context(
            accelerator_id=accelerator, guest="py-c", function="f")), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    inventory = node.GetInventory(pb.GetInventoryRequest(), timeout=10)
    shared = next(a for a in inventory.accelerators if a.id == accelerator)
    assert [g.guest for g in shared.guests] == ["py-a", "py-b"] and shared.metrics.overcommit_ratio == 1.0
    moved = node.MoveContext(pb.MoveContextRequest(context_id=ids["py-a"], accelerator_id="card-0000:d8/acc1"), timeout=10)
    assert moved.context.accelerator_id == "card-0000:d8/acc1"
    listed = node.ListContexts(pb.ListContextsRequest(accelerator_id=accelerator), timeout=10).contexts
    assert [c.guest for c in listed] == ["py-b"]
    node.DeleteContext(pb.DeleteContextRequest(context_id=ids["py-b"]), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        node.SwitchContext(pb.SwitchContextRequest(context_id="ctx-../../x"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
