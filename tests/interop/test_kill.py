"""The kill test: a reconfiguration of a PF whose VFs sit in running QEMU VMs, the agent killed
at each journal step in turn (injected crash right before and right after it) and at random
moments (SIGKILL), then restarted; after each restart the invariants must hold.

The node is the simulated one with its cards kept in a file (simulator.state_file), so the
"hardware" outlives the agent as real cards do; the VMs are real QEMU processes (q35, -S,
native PCIe hot-plug) with `edu` devices standing in for the VFs. Each VM has a second QMP
socket the test inspects them through.
"""
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time

import grpc
import pytest

from conftest import start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc

PF = "0000:3b:00.0"
QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (scripts/install-test-deps)")


class VM:
    def __init__(self, directory, name):
        self.name = name
        self.qmp = os.path.join(directory, f"{name}.qmp")
        self.inspect = os.path.join(directory, f"{name}.inspect")
        ports = []
        for slot in range(1, 5):
            ports += ["-device", f"pcie-root-port,id=rp{slot},chassis={slot},slot={slot}"]
        self.process = subprocess.Popen(
            [QEMU, "-machine", "q35", "-nodefaults", "-nographic", "-display", "none", "-m", "64", "-S",
             "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off", *ports,
             "-qmp", f"unix:{self.qmp},server=on,wait=off", "-qmp", f"unix:{self.inspect},server=on,wait=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.qmp) and os.path.exists(self.inspect)):
            assert time.monotonic() < deadline, "QEMU did not create its QMP sockets"
            time.sleep(0.02)

    def devices(self):
        """The alloc-* devices QEMU has, asked over the second QMP socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.inspect)
            f = s.makefile("rw")
            json.loads(f.readline())
            for command in ({"execute": "qmp_capabilities"},
                            {"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}):
                f.write(json.dumps(command) + "\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break
            return sorted(p["name"] for p in reply["return"] if p["name"].startswith("alloc-"))

    def stop(self):
        self.process.kill()
        self.process.wait()


def node(agent):
    return rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))


def launch(directory, vms, fault=None):
    extra = ["--vf-device-model", "edu"]
    for vm in vms:
        extra += ["--qmp-socket", f"{vm.name}={vm.qmp}"]
    os.environ["FPGA_AGENT_SIMULATOR_STATE_FILE"] = os.path.join(directory, "hardware.json")
    if fault:
        os.environ["FPGA_AGENT_FAULT_INJECTION"] = fault
    try:
        return start_agent(directory, extra)
    finally:
        os.environ.pop("FPGA_AGENT_FAULT_INJECTION", None)
        os.environ.pop("FPGA_AGENT_SIMULATOR_STATE_FILE", None)


def prepare(stub):
    """Three allocations on the PF: two attached (one per VM), one not."""
    made = []
    for vm in ["vm-1", "vm-2", None]:
        allocation = stub.AllocateVF(
            pb.AllocateVFRequest(owner="kill-test", constraints=pb.AllocationConstraints(pf_bdf=PF)), timeout=10
        ).allocation
        if vm:
            stub.AttachVF(pb.AttachVFRequest(allocation_id=allocation.id, vm=vm), timeout=30)
        made.append((allocation.id, allocation.vf_bdf, vm))
    return made


def reconfigure(stub, dry_run=False):
    return stub.Reconfigure(
        pb.ReconfigureRequest(
            meta=pb.RequestMeta(idempotency_key="" if dry_run else "kill-test-reconfigure"),
            pf_bdf=PF, vf_count=2, strategy=pb.RECONFIGURE_STRATEGY_DETACH_REATTACH, dry_run=dry_run),
        timeout=10)


def wait_exit(process, seconds=60):
    deadline = time.monotonic() + seconds
    while process.poll() is None:
        assert time.monotonic() < deadline, "the agent did not crash at the injected point"
        time.sleep(0.02)
    return process.returncode


def check_invariants(directory, agent, vms, made, plan, operation_id):
    stub = node(agent)
    deadline = time.monotonic() + 60
    while True:
        operation = stub.GetOperation(pb.GetOperationRequest(id=operation_id), timeout=10)
        if operation.state in (pb.OPERATION_STATE_SUCCEEDED, pb.OPERATION_STATE_FAILED):
            break
        assert time.monotonic() < deadline, f"operation still {operation.state} after restart"
        time.sleep(0.05)
    inventory = stub.GetInventory(pb.GetInventoryRequest(), timeout=10)

    # No VF allocated twice.
    vfs = [a.vf_bdf for a in inventory.allocations]
    assert len(vfs) == len(set(vfs)), vfs
    # No allocation lost unless the plan said so (rolled forward) ...
    lost = {i.allocation_id for i in plan.impacts if i.outcome == "lost"}
    present = {a.id for a in inventory.allocations}
    for allocation_id, _, _ in made:
        assert allocation_id in present or (allocation_id in lost and operation.state == pb.OPERATION_STATE_SUCCEEDED), (
            allocation_id, operation)
    # ... and every guest has its VF back, as recorded.
    attached = {a.id: a.vm for a in inventory.allocations if a.attached}
    assert attached == {i: vm for i, _, vm in made if vm}, (attached, operation)
    for vm in vms:
        assert vm.devices() == sorted(i for i, v in attached.items() if v == vm.name)
    # Journal empty.
    with sqlite3.connect(os.path.join(directory, "state", "state.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM operations WHERE unfinished = 1").fetchone()[0] == 0
        stored = {row[0] for row in db.execute("SELECT id FROM allocations")}
    assert stored == present
    # Inventory equal to what the platform reports.
    hardware = json.load(open(os.path.join(directory, "hardware.json")))
    pfs = dict(zip(hardware["pfs"][::2], hardware["pfs"][1::2])) if isinstance(hardware["pfs"], list) else hardware["pfs"]
    pf = next(p for card in inventory.cards for p in card.pfs if p.bdf == PF)
    assert pf.num_vfs == pfs[PF]["numVFs"]
    assert len(pf.vfs) == pf.num_vfs
    expected = 2 if operation.state == pb.OPERATION_STATE_SUCCEEDED else 16
    assert pf.num_vfs == expected, operation
    return operation


def one_run(kill):
    """Sets up, reconfigures, lets `kill(agent, stub)` kill the agent, restarts, checks."""
    with tempfile.TemporaryDirectory(prefix="fpga-kill-") as directory:
        vms = [VM(directory, "vm-1"), VM(directory, "vm-2")]
        try:
            agent, fault = None, kill.get("fault")
            agent = launch(directory, vms, fault)
            stub = node(agent)
            made = prepare(stub)
            plan = reconfigure(stub, dry_run=True)
            try:
                started = reconfigure(stub)
            except grpc.RpcError as error:
                # The agent can die before it answers: the retry after the restart, with the
                # same idempotency key, names the operation it had started.
                assert fault and error.code() == grpc.StatusCode.UNAVAILABLE, error
                started = None
            if fault:
                assert wait_exit(agent.process) == 86, open(os.path.join(directory, "agent.log")).read()
            else:
                time.sleep(kill["after"])
                agent.process.send_signal(signal.SIGKILL)
                agent.process.wait()
            agent = launch(directory, vms)
            retried = reconfigure(node(agent))
            assert started is None or retried.id == started.id
            operation = check_invariants(directory, agent, vms, made, plan, retried.id)
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=30)
            return plan, operation
        finally:
            if agent and agent.process.poll() is None:
                agent.process.kill()
            for vm in vms:
                vm.stop()


def test_killed_at_every_journal_step_and_at_random_moments_loses_nothing():
    # The plan: 1 plan, 2-3 detach, 4 write 0, 5 write 2, 6 end the lost allocation, 7 verify,
    # 8-9 bind, 10-11 re-attach, 12 commit. Step 1 is recorded with the operation itself.
    plan, _ = one_run({"after": 5.0})
    steps = len(plan.steps)
    assert steps == 12, [s.description for s in plan.steps]
    outcomes = {}
    for step in range(2, steps + 1):
        for effect in ("crash-before", "crash-after"):
            _, operation = one_run({"fault": f"{effect}:{step}"})
            outcomes[f"{effect}:{step}"] = operation.state
    # Before the first write of 0 the change is rolled back; from it on, rolled forward.
    assert outcomes["crash-before:2"] == pb.OPERATION_STATE_FAILED
    assert outcomes["crash-after:3"] == pb.OPERATION_STATE_FAILED
    assert outcomes["crash-before:4"] == pb.OPERATION_STATE_FAILED
    assert outcomes["crash-after:4"] == pb.OPERATION_STATE_SUCCEEDED
    assert outcomes["crash-before:12"] == pb.OPERATION_STATE_SUCCEEDED
    rng = random.Random(20261122)
    for _ in range(4):
        one_run({"after": rng.uniform(0.0, 0.4)})
