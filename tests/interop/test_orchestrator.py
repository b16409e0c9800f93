"""Three agents on simulated nodes and the example orchestrator on loopback: guests placed
cluster-wide through the link; an agent SIGKILLed and restarted; every link cut and restored;
the orchestrator restarted with a stale epoch. Checks convergence, that no command is applied
twice, and that stale epochs are refused."""
import os
import signal
import socket
import subprocess
import tempfile
import time

import grpc
import pytest

from conftest import BIN, free_port, start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc
from fpga.orchestrator.v1 import orchestrator_pb2 as opb
from fpga.orchestrator.v1 import orchestrator_pb2_grpc as orpc


class Orchestrator:
    def __init__(self, directory, port, epoch, limit=2, tls=None):
        """tls: (certificate, key, client CA, admin client certificate, admin client key, CA of
        the orchestrator's certificate) to serve mTLS only."""
        self.port = port
        self.log = open(os.path.join(directory, f"orchestrator-{epoch}-{port}.log"), "w")
        extra = ["--tls-cert", tls[0], "--tls-key", tls[1], "--tls-client-ca", tls[2]] if tls else []
        self.process = subprocess.Popen(
            [str(BIN / "fpga-orchestrator-example"), "--listen", f"127.0.0.1:{port}", "--epoch", str(epoch),
             "--overcommit-limit", str(limit), *extra], stdout=self.log, stderr=subprocess.STDOUT)
        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=open(tls[5], "rb").read(), private_key=open(tls[4], "rb").read(),
                certificate_chain=open(tls[3], "rb").read())
            channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials)
        else:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = orpc.ExampleOrchestratorStub(channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stub.Cluster(opb.ClusterRequest(), timeout=1)
                return
            except grpc.RpcError:
                assert time.monotonic() < deadline, "orchestrator did not start"
                time.sleep(0.1)

    def cluster(self, cut=False):
        return self.stub.Cluster(opb.ClusterRequest(cut_links=cut), timeout=10)

    def wait(self, predicate, what, seconds=30):
        deadline = time.monotonic() + seconds
        while True:
            view = self.cluster()
            if predicate(view):
                return view
            assert time.monotonic() < deadline, f"{what}: {view}"
            time.sleep(0.1)

    def stop(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def connected(view, count):
    return sum(1 for n in view.nodes if n.connected and n.vfs_free > 0) == count


def test_a_cluster_driven_by_the_orchestrator_survives_restarts_and_cuts():
    with tempfile.TemporaryDirectory(prefix="fpga-cluster-") as directory:
        port = free_port()
        orchestrator = Orchestrator(directory, port, epoch=2)
        agents = {}
        try:
            for name in ["node-a", "node-b", "node-c"]:
                folder = os.path.join(directory, name)
                os.makedirs(folder)
                agents[name] = start_agent(folder, ["--node-id", name, "--orchestrator", f"127.0.0.1:{port}"])
            view = orchestrator.wait(lambda v: connected(v, 3), "three agents connected")
            assert [n.platform for n in view.nodes] == ["simulated"] * 3  # from each hello

            # Six guests, placed where the most VFs are free: two per node.
            placements = [orchestrator.stub.PlaceVF(opb.PlaceVFRequest(guest=f"guest-{i}", request_id=f"r{i}"), timeout=30)
                          for i in range(6)]
            per_node = {}
            for p in placements:
                per_node[p.node_id] = per_node.get(p.node_id, 0) + 1
            assert per_node == {"node-a": 2, "node-b": 2, "node-c": 2}, per_node
            # The same request again is the same placement, and nothing new on the node.
            again = orchestrator.stub.PlaceVF(opb.PlaceVFRequest(guest="guest-0", request_id="r0"), timeout=30)
            assert again.allocation_id == placements[0].allocation_id

            # Each node's own view agrees; fpgactl status shows the link.
            for name, agent in agents.items():
                inventory = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp)).GetInventory(pb.GetInventoryRequest(), timeout=10)
                assert sorted(a.owner for a in inventory.allocations) == sorted(
                    f"guest-{i}" for i, p in enumerate(placements) if p.node_id == name)
            status = subprocess.run([str(BIN / "fpgactl"), "status", "--server", agents["node-a"].tcp],
                                    capture_output=True, text=True, timeout=30).stdout
            assert f"orchestrator 127.0.0.1:{port}: connected" in status, status

            # Contexts under the cluster-wide overcommit limit (2 guests per accelerator here).
            spots = set()
            for i in range(4):
                placed = orchestrator.stub.PlaceContext(opb.PlaceContextRequest(
                    guest=f"ctx-guest-{i}", request_id=f"c{i}", function="fft", weight=1), timeout=30)
                spots.add((placed.node_id, placed.accelerator_id))
            assert len(spots) == 4  # least utilized first: four different accelerators

            # An agent is SIGKILLed and restarted: it reconnects with a snapshot, keeps its records.
            killed = agents["node-b"]
            killed.process.send_signal(signal.SIGKILL)
            killed.process.wait()
            orchestrator.wait(lambda v: not next(n for n in v.nodes if n.node_id == "node-b").connected, "node-b gone")
            before = next(n for n in orchestrator.cluster().nodes if n.node_id == "node-b")
            agents["node-b"] = start_agent(killed.directory, ["--node-id", "node-b", "--orchestrator", f"127.0.0.1:{port}"])
            view = orchestrator.wait(
                lambda v: next(n for n in v.nodes if n.node_id == "node-b").snapshots > before.snapshots
                and next(n for n in v.nodes if n.node_id == "node-b").connected, "node-b back with a snapshot")

            # Every link cut: the agents reconnect and resume with deltas, not snapshots.
            snapshots = {n.node_id: n.snapshots for n in view.nodes}
            connections = {n.node_id: n.connections for n in view.nodes}
            orchestrator.cluster(cut=True)
            orchestrator.wait(lambda v: all(n.connected and n.connections > connections[n.node_id] for n in v.nodes),
                              "all reconnected after the cut")
            release = orchestrator.stub.Release(opb.ReleaseRequest(
                request_id="rel-0", allocation_id=placements[0].allocation_id, node_id=placements[0].node_id), timeout=30)
            assert release.reason == "released"
            view = orchestrator.wait(lambda v: all(n.deltas > 0 for n in v.nodes), "deltas flowing")
            assert {n.node_id: n.snapshots for n in view.nodes} == snapshots, "a cut link resumes without a snapshot"

            # The orchestrator goes away: every node keeps serving local requests and says so.
            orchestrator.stop()
            local = rpc.NodeAgentStub(grpc.insecure_channel(agents["node-c"].tcp))
            deadline = time.monotonic() + 30
            while local.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10).orchestrator.state != "disconnected":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            made = local.AllocateVF(pb.AllocateVFRequest(owner="local-while-away"), timeout=10).allocation
            local.ReleaseVF(pb.ReleaseVFRequest(allocation_id=made.id), timeout=10)

            # A new orchestrator with an older epoch: its commands are refused on every node.
            orchestrator = Orchestrator(directory, port, epoch=1)
            orchestrator.wait(lambda v: connected(v, 3), "agents back with the stale leader")
            with pytest.raises(grpc.RpcError) as caught:
                orchestrator.stub.PlaceVF(opb.PlaceVFRequest(guest="late", request_id="stale"), timeout=30)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "stale" in caught.value.details()
            # Nothing was applied twice: 6 placements, one released, on all nodes together.
            total = 0
            for agent in agents.values():
                inventory = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp)).GetInventory(pb.GetInventoryRequest(), timeout=10)
                total += len(inventory.allocations)
            assert total == 5
        finally:
            orchestrator.stop()
            for agent in agents.values():
                if agent.process.poll() is None:
                    agent.process.send_signal(signal.SIGTERM)
                    agent.process.wait(timeout=30)
