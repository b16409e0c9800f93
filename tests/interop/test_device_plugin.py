"""A fake kubelet, written with Python grpcio from the v1beta1 proto, against the agent's device
plugin: registration, ListAndWatch updates when a VF changes, Allocate contents, preferred
allocation, and a kubelet restart (sockets deleted, a new kubelet) followed by re-registration."""
import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from concurrent import futures

import grpc
import pytest

from conftest import start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc
from k8s.deviceplugin.v1beta1 import api_pb2 as dp
from k8s.deviceplugin.v1beta1 import api_pb2_grpc as dp_rpc

RESOURCE = "xilinx.com/qdma-vf"
ENDPOINT = "fpga-agent-xilinx_com_qdma-vf.sock"


class FakeKubelet(dp_rpc.RegistrationServicer):
    def __init__(self, directory):
        self.registrations = queue.Queue()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        dp_rpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"unix:{directory}/kubelet.sock")
        self.server.start()

    def Register(self, request, context):
        self.registrations.put(request)
        return dp.Empty()

    def stop(self):
        self.server.stop(0).wait()


@pytest.fixture
def kubelet_and_agent():
    with tempfile.TemporaryDirectory(prefix="fpga-dp-") as directory:
        plugins = os.path.join(directory, "dp")
        os.makedirs(plugins)
        kubelet = FakeKubelet(plugins)
        agent = start_agent(directory, ["--kubelet-dir", plugins])
        yield kubelet, agent, plugins
        kubelet.stop()
        if agent.process.poll() is None:
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=30)


def plugin(plugins):
    return dp_rpc.DevicePluginStub(grpc.insecure_channel(f"unix:{plugins}/{ENDPOINT}"))


def test_registration_list_and_watch_allocate_and_kubelet_restart(kubelet_and_agent):
    kubelet, agent, plugins = kubelet_and_agent
    request = kubelet.registrations.get(timeout=30)
    assert (request.version, request.endpoint, request.resource_name) == ("v1beta1", ENDPOINT, RESOURCE)
    assert request.options.get_preferred_allocation_available and not request.options.pre_start_required

    device_plugin = plugin(plugins)
    options = device_plugin.GetDevicePluginOptions(dp.Empty(), timeout=10)
    assert options.get_preferred_allocation_available

    updates = queue.Queue()
    stream = device_plugin.ListAndWatch(dp.Empty())
    threading.Thread(target=lambda: [updates.put(r) for r in stream], daemon=True).start()
    first = updates.get(timeout=10)
    devices = {d.ID: d for d in first.devices}
    assert len(devices) == 52 and all(d.health == "Healthy" for d in devices.values())
    assert [n.ID for n in devices["0000:3b:00.4"].topology.nodes] == [0]
    assert [n.ID for n in devices["0000:d8:00.4"].topology.nodes] == [1]

    # A VF handed out through the node API turns Unhealthy for the kubelet.
    node = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))
    taken = node.AllocateVF(pb.AllocateVFRequest(owner="node-api", constraints=pb.AllocationConstraints(
        pf_bdf="0000:3b:00.0")), timeout=10).allocation
    deadline = time.monotonic() + 10
    while True:
        update = {d.ID: d.health for d in updates.get(timeout=10).devices}
        if update[taken.vf_bdf] == "Unhealthy":
            break
        assert time.monotonic() < deadline
    assert sum(1 for h in update.values() if h == "Healthy") == 51

    # Preferred allocation packs by NUMA node and PF.
    available = [d for d in devices if d != taken.vf_bdf]
    preferred = device_plugin.GetPreferredAllocation(dp.PreferredAllocationRequest(container_requests=[
        dp.ContainerPreferredAllocationRequest(available_deviceIDs=available, must_include_deviceIDs=["0000:d8:00.5"],
                                               allocation_size=3)]), timeout=10)
    chosen = list(preferred.container_responses[0].deviceIDs)
    assert chosen[0] == "0000:d8:00.5" and len(chosen) == 3
    assert all(d.startswith("0000:d8:00.") or d.startswith("0000:d8:01.") for d in chosen), chosen

    # Allocate: vfio nodes with mrw, and KubeVirt's variable.
    allocated = device_plugin.Allocate(dp.AllocateRequest(container_requests=[
        dp.ContainerAllocateRequest(devices_ids=chosen[:2])]), timeout=10)
    container = allocated.container_responses[0]
    # KubeVirt's rule keeps the dash; the shell-safe spelling replaces it: both are set.
    assert dict(container.envs) == {"PCI_RESOURCE_XILINX_COM_QDMA_VF": ",".join(chosen[:2]),
                                    "PCI_RESOURCE_XILINX_COM_QDMA-VF": ",".join(chosen[:2])}
    paths = [(d.container_path, d.host_path, d.permissions) for d in container.devices]
    assert paths[0] == ("/dev/vfio/vfio", "/dev/vfio/vfio", "mrw")
    assert len(paths) == 3 and all(p[0].startswith("/dev/vfio/") and p[2] == "mrw" for p in paths[1:])
    owners = {a.vf_bdf: a.owner for a in node.GetInventory(pb.GetInventoryRequest(), timeout=10).allocations}
    assert owners[chosen[0]] == "kubelet" and owners[chosen[1]] == "kubelet"
    # The same allocation again (a container restart) is fine; the node API's VF is refused.
    device_plugin.Allocate(dp.AllocateRequest(container_requests=[dp.ContainerAllocateRequest(devices_ids=chosen[:1])]),
                           timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        device_plugin.Allocate(dp.AllocateRequest(container_requests=[
            dp.ContainerAllocateRequest(devices_ids=[taken.vf_bdf])]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as caught:
        device_plugin.Allocate(dp.AllocateRequest(container_requests=[
            dp.ContainerAllocateRequest(devices_ids=["../../etc"])]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Every kubelet Allocate is in the audit trail, refused ones included.
    audit = [json.loads(line) for line in open(os.path.join(agent.directory, "state", "audit.log"))]
    kubelet_lines = [line for line in audit if line["transport"] == "device-plugin"]
    assert [line["status"] for line in kubelet_lines] == ["ok", "ok", "failedPrecondition", "invalidArgument"]
    assert all(line["identity"] == "kubelet" and line["rpc"] == "DevicePlugin.Allocate" for line in kubelet_lines)
    assert kubelet_lines[0]["request"]["containerRequests"][0]["devicesIds"] == chosen[:2]

    # The kubelet restarts: it deletes every socket of the directory and comes back.
    kubelet.stop()
    for name in os.listdir(plugins):
        os.unlink(os.path.join(plugins, name))
    restarted = FakeKubelet(plugins)
    try:
        again = restarted.registrations.get(timeout=30)
        assert (again.endpoint, again.resource_name) == (ENDPOINT, RESOURCE)
        fresh = plugin(plugins).ListAndWatch(dp.Empty())
        listed = next(iter(fresh))
        assert len(listed.devices) == 52
        fresh.cancel()
        # The agent restarts: it serves and registers again on its own.
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=30)
        assert not os.path.exists(os.path.join(plugins, ENDPOINT))  # removed on the way out
        restarted_agent = start_agent(agent.directory, ["--kubelet-dir", plugins])
        try:
            third = restarted.registrations.get(timeout=30)
            assert third.endpoint == ENDPOINT
            owners = {a.vf_bdf: a.owner for a in rpc.NodeAgentStub(grpc.insecure_channel(restarted_agent.tcp)).GetInventory(
                pb.GetInventoryRequest(), timeout=10).allocations}
            assert owners[chosen[0]] == "kubelet"  # the kubelet's VFs stay taken across the restart
        finally:
            restarted_agent.process.send_signal(signal.SIGTERM)
            restarted_agent.process.wait(timeout=30)
    finally:
        restarted.stop()


def _sysfs_tree(root, pf="0000:3b:00.0", vfs=("0000:3b:00.4", "0000:3b:00.5")):
    """A small sysfs tree as the kernel lays it out (a QDMA PF, its VFs bound to vfio-pci, their
    IOMMU groups and /dev/vfio nodes), for the agent's linux platform."""
    sys_root, dev_root = os.path.join(root, "sys"), os.path.join(root, "dev")
    devices = os.path.join(sys_root, "devices", "pci0000:00")
    bus = os.path.join(sys_root, "bus", "pci", "devices")
    drivers = os.path.join(sys_root, "bus", "pci", "drivers")
    groups = os.path.join(sys_root, "kernel", "iommu_groups")
    for folder in [devices, bus, groups, os.path.join(dev_root, "vfio")] + [
            os.path.join(drivers, d) for d in ["qdma-pf", "qdma-vf", "vfio-pci"]]:
        os.makedirs(folder, exist_ok=True)

    def write(device, name, text):
        with open(os.path.join(devices, device, name), "w") as f:
            f.write(text + "\n")

    def device(address, attributes, driver):
        os.makedirs(os.path.join(devices, address), exist_ok=True)
        for name, text in attributes.items():
            write(address, name, text)
        os.symlink(f"../../../bus/pci/drivers/{driver}", os.path.join(devices, address, "driver"))
        os.symlink(f"../../../devices/pci0000:00/{address}", os.path.join(bus, address))

    device(pf, {"vendor": "0x10ee", "device": "0x903f", "sriov_totalvfs": "8", "sriov_numvfs": str(len(vfs)),
                "sriov_offset": "4", "sriov_stride": "1", "sriov_drivers_autoprobe": "0", "sriov_vf_device": "a03f",
                "numa_node": "0", "aer_dev_fatal": "TOTAL_ERR_FATAL 0", "aer_dev_nonfatal": "TOTAL_ERR_NONFATAL 0",
                "aer_dev_correctable": "TOTAL_ERR_COR 0"}, "qdma-pf")
    for index, vf in enumerate(vfs):
        group = 40 + index
        device(vf, {"vendor": "0x10ee", "device": "0xa03f", "numa_node": "0", "driver_override": "vfio-pci"}, "vfio-pci")
        os.symlink(f"../{pf}", os.path.join(devices, vf, "physfn"))
        os.symlink(f"../{vf}", os.path.join(devices, pf, f"virtfn{index}"))
        os.makedirs(os.path.join(groups, str(group)), exist_ok=True)
        os.symlink(f"../../../kernel/iommu_groups/{group}", os.path.join(devices, vf, "iommu_group"))
        open(os.path.join(dev_root, "vfio", str(group)), "w").close()
    return sys_root, dev_root, devices


def test_the_kubelet_sees_devices_go_unhealthy_and_back():
    """The linux platform on a sysfs tree: an uncorrectable AER error on the PF makes its VFs
    Unhealthy for the kubelet; the PF removed and added back (re-enumerated, counters afresh)
    makes them Healthy again."""
    with tempfile.TemporaryDirectory(prefix="fpga-dp-health-") as directory:
        plugins = os.path.join(directory, "dp")
        os.makedirs(plugins)
        sys_root, dev_root, devices = _sysfs_tree(os.path.join(directory, "tree"))
        kubelet = FakeKubelet(plugins)
        agent = start_agent(directory, ["--kubelet-dir", plugins, "--platform", "linux", "--sysfs-root", sys_root,
                                        "--dev-root", dev_root], config_text="linux:\n  uevents: false\n")
        try:
            kubelet.registrations.get(timeout=30)
            stream = plugin(plugins).ListAndWatch(dp.Empty())
            states = queue.Queue()

            def follow():
                try:
                    for response in stream:
                        states.put({d.ID: d.health for d in response.devices})
                except grpc.RpcError:
                    pass  # cancelled at the end of the test

            threading.Thread(target=follow, daemon=True).start()

            def until(expected):
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        seen = states.get(timeout=1)
                    except queue.Empty:
                        continue
                    if seen == expected:
                        return
                pytest.fail(f"the kubelet never saw {expected}")

            healthy = {"0000:3b:00.4": "Healthy", "0000:3b:00.5": "Healthy"}
            until(healthy)
            node = rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))
            with open(os.path.join(devices, "0000:3b:00.0", "aer_dev_fatal"), "w") as f:
                f.write("DLP 1\nTOTAL_ERR_FATAL 1\n")
            node.Rescan(pb.RescanRequest(), timeout=30)
            until({"0000:3b:00.4": "Unhealthy", "0000:3b:00.5": "Unhealthy"})
            status = node.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=10)
            assert any("PF 0000:3b:00.0 is unhealthy" in p and "aer-fatal" in p for p in status.problems), status.problems
            # Removed from the bus, then back: a new device to the kernel, healthy again.
            bus = os.path.join(sys_root, "bus", "pci", "devices")
            moved = {name: os.readlink(os.path.join(bus, name)) for name in os.listdir(bus)}
            for name in moved:
                os.unlink(os.path.join(bus, name))
            node.Rescan(pb.RescanRequest(), timeout=30)
            until({})
            with open(os.path.join(devices, "0000:3b:00.0", "aer_dev_fatal"), "w") as f:
                f.write("TOTAL_ERR_FATAL 0\n")
            for name, target in moved.items():
                os.symlink(target, os.path.join(bus, name))
            node.Rescan(pb.RescanRequest(), timeout=30)
            until(healthy)
            stream.cancel()
        finally:
            kubelet.stop()
            if agent.process.poll() is None:
                agent.process.send_signal(signal.SIGTERM)
                agent.process.wait(timeout=30)
