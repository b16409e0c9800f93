"""Kubernetes DRA against fakes of both of its peers, with the real fpga-agent binary in between.

- A fake kubelet in Python grpcio, from the verbatim protos in Protos/k8s/ (compiled by conftest):
  it finds `<registry>/<driver>-reg.sock`, checks GetInfo (type, driver name, absolute endpoint,
  supported versions in the order the kubelet picks from), answers NotifyRegistrationStatus,
  dials the endpoint and drives NodePrepareResources/NodeUnprepareResources (v1 and v1beta1) in
  batches, repeated (idempotence), with a replaced UID, an unallocated claim, an unknown claim,
  and across a SIGKILL of the agent; it reads the DRAResourceHealth streams (v1alpha1 and v1).
- A fake API server (fake_kube_api.py) on loopback with TLS (its own CA) and a bearer token, so
  the agent's real client path runs: it serves the ResourceClaims the tests create and stores the
  ResourceSlices the agent writes, validating each one with kubernetes-validate --strict for 1.34,
  the `kubernetes` client's pydantic model and the API server's limits; it wipes the slices as the
  kubelet does and expects them back.
- CDI: the spec the agent wrote, consumed by podman 4.3 (`--device k8s.<driver>/vf=<id>`).

What is NOT covered here: a real kubelet, scheduler or kube-apiserver (none can run on these
machines), and real VFIO (the simulated platform's VFs have IOMMU groups but no /dev/vfio nodes;
the podman test makes stand-in device nodes, see there).
"""
import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import ROOT, free_port, start_agent
from fake_kube_api import FakeKubeAPI, slice_limit_problems
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc
from k8s.dra.v1 import api_pb2 as dra
from k8s.dra.v1 import api_pb2_grpc as dra_rpc
from k8s.dra.v1beta1 import api_pb2 as dra_beta
from k8s.dra.v1beta1 import api_pb2_grpc as dra_beta_rpc
from k8s.drahealth.v1 import api_pb2 as health
from k8s.drahealth.v1 import api_pb2_grpc as health_rpc
from k8s.drahealth.v1alpha1 import api_pb2 as health_alpha
from k8s.drahealth.v1alpha1 import api_pb2_grpc as health_alpha_rpc
from k8s.pluginregistration.v1 import api_pb2 as reg
from k8s.pluginregistration.v1 import api_pb2_grpc as reg_rpc

DRIVER = "qdma.xilinx.com"
NODE = "interop"  # conftest's --node-id: the default node name, pool name and slice prefix
VERSIONS = ["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth"]
CALL = 45  # the kubelet's per-call timeout (defaultClientCallTimeout)
CONTAINER_METADATA = "/var/run/kubernetes.io/dra-device-attributes/resourceclaims"
PCIE_ROOT = re.compile(r"^pci[0-9a-f]{4}:[0-9a-f]{2}$")


def device_name(bdf):
    """A VF's device name in the pool: its BDF with ':' and '.' as '-' (a DNS label)."""
    return "vf-" + bdf.replace(":", "-").replace(".", "-")


def env_name(driver):
    return "PCI_RESOURCE_" + re.sub(r"[^A-Z0-9]", "_", driver.upper()) + "_VF"


def claim_uid():
    """A UID that starts with a digit, so CDI device names `<claimUID>-<device>` need CDI 0.5.0."""
    while True:
        uid = str(uuid.uuid4())
        if uid[0].isdigit():
            return uid


def make_claim(namespace, name, uid, results, allocated=True, allocated_at="2026-11-30T12:00:00Z"):
    """A resource.k8s.io/v1 ResourceClaim; results: [(request, device)] or [(request, device, driver, pool)]."""
    results = [r if len(r) == 4 else (r[0], r[1], DRIVER, NODE) for r in results]
    requests = {}
    for request, *_ in results:
        requests[request] = requests.get(request, 0) + 1
    claim = {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {"devices": {"requests": [
            {"name": request, "exactly": {"deviceClassName": "qdma-vf", "allocationMode": "ExactCount", "count": count}}
            for request, count in requests.items()]}},
    }
    if allocated:
        claim["status"] = {
            "allocation": {
                "devices": {"results": [{"request": r, "device": d, "driver": drv, "pool": p} for r, d, drv, p in results]},
                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [NODE]}]}]},
                "allocationTimestamp": allocated_at,
            },
            "reservedFor": [{"resource": "pods", "name": f"{name}-pod", "uid": str(uuid.uuid4())}],
        }
    return claim


class Claim:
    def __init__(self, namespace, name, uid=None):
        self.namespace, self.name, self.uid = namespace, name, uid or claim_uid()

    def v1(self):
        return dra.Claim(namespace=self.namespace, name=self.name, uid=self.uid)

    def v1beta1(self):
        return dra_beta.Claim(namespace=self.namespace, name=self.name, uid=self.uid)

    @property
    def owner(self):
        return f"claim:{self.namespace}/{self.name}/{self.uid}"


class FakeKubelet:
    """The kubelet's side of DRA: plugin registration and the DRAPlugin and health clients."""

    def __init__(self, registry, driver=DRIVER):
        self.registry, self.driver = Path(registry), driver
        self.info = None

    @property
    def registration_socket(self):
        return self.registry / f"{self.driver}-reg.sock"

    def discover(self, timeout=30):
        """What the plugin watcher does: wait for the socket file to appear in the registry dir."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [p for p in self.registry.glob("*-reg.sock") if stat.S_ISSOCK(p.stat().st_mode)]
            if self.registration_socket in found:
                return self.registration_socket
            time.sleep(0.1)
        raise AssertionError(f"no {self.registration_socket.name} in {self.registry} after {timeout} s: "
                             f"{os.listdir(self.registry)}")

    def register(self, timeout=30):
        socket_path = self.discover(timeout)
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            registration = reg_rpc.RegistrationStub(channel)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.info = registration.GetInfo(reg.InfoRequest(), timeout=10)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            registration.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True), timeout=10)
        return self.info

    def channel(self):
        return grpc.insecure_channel(f"unix:{self.info.endpoint}")

    def prepare(self, claims, version="v1"):
        with self.channel() as channel:
            if version == "v1":
                reply = dra_rpc.DRAPluginStub(channel).NodePrepareResources(
                    dra.NodePrepareResourcesRequest(claims=[c.v1() for c in claims]), timeout=CALL)
            else:
                reply = dra_beta_rpc.DRAPluginStub(channel).NodePrepareResources(
                    dra_beta.NodePrepareResourcesRequest(claims=[c.v1beta1() for c in claims]), timeout=CALL)
        return dict(reply.claims)

    def unprepare(self, claims, version="v1"):
        with self.channel() as channel:
            if version == "v1":
                reply = dra_rpc.DRAPluginStub(channel).NodeUnprepareResources(
                    dra.NodeUnprepareResourcesRequest(claims=[c.v1() for c in claims]), timeout=CALL)
            else:
                reply = dra_beta_rpc.DRAPluginStub(channel).NodeUnprepareResources(
                    dra_beta.NodeUnprepareResourcesRequest(claims=[c.v1beta1() for c in claims]), timeout=CALL)
        return dict(reply.claims)


class Rig:
    """A fake API server, the kubelet's directories and the flags that point the agent at them."""

    def __init__(self, directory, driver=DRIVER):
        self.directory = Path(directory)
        self.driver = driver
        self.registry = self.directory / "plugins_registry"
        self.plugins = self.directory / "plugins"
        self.cdi = self.directory / "cdi"
        for d in (self.registry, self.plugins, self.cdi):
            d.mkdir()
        (self.directory / "api").mkdir()
        self.api = FakeKubeAPI(self.directory / "api", node=NODE, driver=driver).start()
        self.kubelet = FakeKubelet(self.registry, driver)
        self.agent = None

    def flags(self):
        return ["--dra", "--dra-driver-name", self.driver, "--dra-registry-dir", str(self.registry),
                "--dra-plugins-dir", str(self.plugins), "--cdi-dir", str(self.cdi),
                "--kube-api-server", self.api.url, "--kube-token-file", str(self.api.token_file),
                "--kube-ca-file", str(self.api.ca_file)]

    def start(self, extra=None, config_text="", env=None):
        self.agent = start_agent(str(self.directory), self.flags() if extra is None else extra,
                                 config_text=config_text, env=env)
        return self.agent

    def stop(self):
        if self.agent and self.agent.process.poll() is None:
            self.agent.process.send_signal(signal.SIGTERM)
            self.agent.process.wait(timeout=30)
        self.api.stop()

    def node(self):
        return rpc.NodeAgentStub(grpc.insecure_channel(self.agent.tcp))

    def inventory(self):
        return self.node().GetInventory(pb.GetInventoryRequest(), timeout=10)

    def vfs(self):
        """bdf -> (VirtualFunction, card id)"""
        return {vf.bdf: (vf, card.id) for card in self.inventory().cards for pf in card.pfs for vf in pf.vfs}

    def owners(self):
        return {a.vf_bdf: a.owner for a in self.inventory().allocations}

    def spec_path(self, claim):
        return self.cdi / f"k8s.{self.driver}-vf_{claim.uid}.json"

    def metadata_path(self, claim, request):
        return self.plugins / self.driver / "dra-device-metadata" / claim.uid / request / f"{self.driver}-metadata.json"

    def assert_api_clean(self):
        assert self.api.problems == [], "the agent wrote objects the API server refuses:\n" + "\n".join(
            f"{m} {p}: {probs}" for m, p, probs in self.api.problems)
        assert self.api.unauthorized == [], f"requests without the bearer token: {self.api.unauthorized[:5]}"


@pytest.fixture
def rig():
    with tempfile.TemporaryDirectory(prefix="fpga-dra-") as directory:
        rig = Rig(directory)
        try:
            yield rig
        finally:
            rig.stop()
            # Shown by pytest only when the test failed.
            for log in sorted(Path(directory).glob("agent*.log")):
                print(f"--- {log.name} (last 40 lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
            print(f"--- API requests (last 20): {rig.api.log[-20:]}")


def wait_for(predicate, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def free_vfs(rig, count, pf=None):
    vfs = rig.vfs()
    free = sorted(bdf for bdf, (vf, _) in vfs.items()
                  if vf.state == pb.VF_STATE_FREE and (pf is None or vf.pf_bdf == pf))
    assert len(free) >= count
    return free[:count]


# --- CDI -----------------------------------------------------------------------------------------

def cdi_minimum_version(spec):
    """The lowest CDI version a spec's fields allow (container-device-interface specs-go/version.go)."""
    version = (0, 3, 0)
    edits = [spec.get("containerEdits") or {}] + [d.get("containerEdits") or {} for d in spec.get("devices", [])]
    if any(m.get("type") for e in edits for m in e.get("mounts") or []):
        version = max(version, (0, 4, 0))
    if any(n.get("hostPath") for e in edits for n in e.get("deviceNodes") or []) or any(
            d["name"][:1].isdigit() for d in spec.get("devices", [])):
        version = max(version, (0, 5, 0))
    if "annotations" in spec or any("annotations" in d for d in spec.get("devices", [])) or "." in spec["kind"].split("/")[1]:
        version = max(version, (0, 6, 0))
    if any(e.get("intelRdt") or e.get("additionalGids") for e in edits):
        version = max(version, (0, 7, 0))
    if any(e.get("netDevices") for e in edits):
        version = max(version, (1, 1, 0))
    return version


def check_cdi_spec(rig, claim, devices):
    """devices: [(request, bdf)]. Returns the spec."""
    path = rig.spec_path(claim)
    assert path.exists(), f"no CDI spec {path.name} in {os.listdir(rig.cdi)}"
    spec = json.loads(path.read_text())
    assert set(spec) <= {"cdiVersion", "kind", "devices", "containerEdits"}, spec.keys()
    assert spec["cdiVersion"] == "0.5.0"
    assert cdi_minimum_version(spec) <= (0, 5, 0)  # what Debian's podman 4.3 accepts
    assert spec["kind"] == f"k8s.{rig.driver}/vf"
    vfs = rig.vfs()
    by_name = {d["name"]: d for d in spec["devices"]}
    assert set(by_name) == {f"{claim.uid}-{device_name(bdf)}" for _, bdf in devices}
    spec_edits = spec.get("containerEdits") or {}
    for request, bdf in devices:
        device = by_name[f"{claim.uid}-{device_name(bdf)}"]
        assert set(device) <= {"name", "containerEdits"}
        edits = device.get("containerEdits") or {}
        nodes = [n for e in (spec_edits, edits) for n in e.get("deviceNodes") or []]
        paths = {n["path"] for n in nodes}
        vf, _ = vfs[bdf]
        assert vf.iommu_group >= 0
        assert {"/dev/vfio/vfio", f"/dev/vfio/{vf.iommu_group}"} <= paths, paths
        assert all(set(n) <= {"path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid"}
                   for n in nodes)
        env = dict(e.split("=", 1) for x in (spec_edits, edits) for e in x.get("env") or [])
        assert bdf in env.get(env_name(rig.driver), "").split(","), env
        assert all(k.startswith("PCI_RESOURCE_") for k in env), env
        # KubeVirt's device metadata file, bind-mounted read-only where virt-launcher reads it.
        mounts = [m for e in (spec_edits, edits) for m in e.get("mounts") or []]
        wanted = f"{CONTAINER_METADATA}/{claim.name}/{request}/{rig.driver}-metadata.json"
        (mount,) = [m for m in mounts if m["containerPath"] == wanted] or [None]
        assert mount is not None, f"no mount of {wanted}: {mounts}"
        assert Path(mount["hostPath"]) == rig.metadata_path(claim, request)
        assert "ro" in mount.get("options", []) and "bind" in mount.get("options", []) + [mount.get("type")]
    return spec


def read_json_stream(text):
    decoder, objects, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        while text[at].isspace():
            at += 1
        obj, at = decoder.raw_decode(text, at)
        objects.append(obj)
    return objects


def check_metadata(rig, claim, request, bdfs):
    """The KEP-5304 DeviceMetadata stream KubeVirt reads: newest API version first."""
    path = rig.metadata_path(claim, request)
    assert path.exists(), f"no metadata file {path}"
    objects = read_json_stream(path.read_text())
    assert objects, "empty metadata file"
    first = objects[0]
    assert first.get("apiVersion", "").startswith("metadata.resource.k8s.io/"), first.get("apiVersion")
    meta = first["metadata"]
    assert (meta["name"], meta["namespace"], meta["uid"]) == (claim.name, claim.namespace, claim.uid)
    assert int(meta.get("generation", 1)) >= 1
    (entry,) = [r for r in first["requests"] if r["name"] == request]
    devices = {d["name"]: d for d in entry["devices"]}
    assert set(devices) == {device_name(b) for b in bdfs}
    for bdf in bdfs:
        device = devices[device_name(bdf)]
        assert device["driver"] == rig.driver and device["pool"] == NODE
        assert device["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": bdf}
    return objects


def prepared(reply, claim):
    """{(device_name, request names, cdi ids)} of one claim's successful reply."""
    response = reply[claim.uid]
    assert response.error == "", f"{claim.owner}: {response.error}"
    for device in response.devices:
        assert device.pool_name == NODE
    return sorted((d.device_name, tuple(d.request_names), tuple(d.cdi_device_ids)) for d in response.devices)


# --- Registration, endpoint, versions ------------------------------------------------------------

def test_registration_get_info_and_services(rig):
    rig.start()
    info = rig.kubelet.register()
    assert info.type == "DRAPlugin"
    assert info.name == DRIVER
    assert info.endpoint == str(rig.plugins / DRIVER / "dra.sock") and os.path.isabs(info.endpoint)
    assert stat.S_ISSOCK(os.stat(info.endpoint).st_mode)
    # The kubelet takes the first entry it supports: v1 before v1beta1.
    assert list(info.supported_versions) == VERSIONS
    # A failed registration is only logged by the plugin; it still answers.
    with grpc.insecure_channel(f"unix:{rig.kubelet.registration_socket}") as channel:
        reg_rpc.RegistrationStub(channel).NotifyRegistrationStatus(
            reg.RegistrationStatus(plugin_registered=False, error="kubelet says no"), timeout=10)
    # Both DRAPlugin versions answer on the endpoint; an empty batch is an empty map.
    with rig.kubelet.channel() as channel:
        assert dict(dra_rpc.DRAPluginStub(channel).NodePrepareResources(
            dra.NodePrepareResourcesRequest(), timeout=CALL).claims) == {}
        assert dict(dra_beta_rpc.DRAPluginStub(channel).NodeUnprepareResources(
            dra_beta.NodeUnprepareResourcesRequest(), timeout=CALL).claims) == {}
    # A kubelet restart: it walks the registry directory again and finds the same socket.
    again = FakeKubelet(rig.registry).register()
    assert again == info
    rig.assert_api_clean()


# --- ResourceSlices ------------------------------------------------------------------------------

def check_vf_devices(rig, slices):
    """Every VF of the inventory is a device with the attributes the contract lists; returns
    {device name: device}."""
    devices = {}
    for s in slices:
        for device in s["spec"].get("devices") or []:
            assert device["name"] not in devices, f"{device['name']} twice in the pool"
            devices[device["name"]] = device
    vf_devices = {n: d for n, d in devices.items() if d["attributes"].get(f"{rig.driver}/kind") == {"string": "vf"}}
    others = {n: d["attributes"].get(f"{rig.driver}/kind") for n, d in devices.items() if n not in vf_devices}
    assert all(kind == {"string": "accelerator"} for kind in others.values()), others
    vfs = rig.vfs()
    assert set(vf_devices) == {device_name(b) for b in vfs}
    for bdf, (vf, card) in vfs.items():
        attributes = vf_devices[device_name(bdf)]["attributes"]
        assert attributes["resource.kubernetes.io/pciBusID"] == {"string": bdf}
        # The Linux platform reads the PCIe root from sysfs; the simulated platform knows none, and
        # then the attribute is left out (so a matchAttribute on it never pairs simulated VFs).
        if "resource.kubernetes.io/pcieRoot" in attributes:
            assert PCIE_ROOT.match(attributes["resource.kubernetes.io/pcieRoot"]["string"]), attributes
        assert attributes[f"{rig.driver}/pf"] == {"string": vf.pf_bdf}
        assert attributes[f"{rig.driver}/card"] == {"string": card}
        assert attributes[f"{rig.driver}/vfIndex"] == {"int": vf.index}
        assert int(attributes[f"{rig.driver}/vendorID"]["string"], 16) == vf.vendor_id
        assert int(attributes[f"{rig.driver}/deviceID"]["string"], 16) == vf.device_id
        assert attributes[f"{rig.driver}/iommuGroup"] == {"int": vf.iommu_group}
        assert attributes[f"{rig.driver}/numaNode"] == {"int": vf.numa_node}
    return vf_devices


def run_operation(node, operation):
    states = [op.state for op in node.WatchOperation(pb.WatchOperationRequest(id=operation.id), timeout=60)]
    assert states[-1] == pb.OPERATION_STATE_SUCCEEDED, states


def test_resource_slices_published_republished_and_recreated(rig):
    rig.start()
    api = rig.api
    name_pattern = re.compile(rf"^{re.escape(NODE)}-{re.escape(DRIVER)}-\d+$")
    generation, slices = api.wait_settled(DRIVER, NODE, what="the first publication")
    assert all(name_pattern.match(s["metadata"]["name"]) for s in slices), [s["metadata"]["name"] for s in slices]
    for s in slices:
        assert s["spec"]["nodeName"] == NODE and s["spec"]["driver"] == DRIVER
        # Owned by the Node, so the garbage collector deletes them with it.
        (owner,) = s["metadata"]["ownerReferences"]
        assert (owner["apiVersion"], owner["kind"], owner["name"], owner["uid"]) == ("v1", "Node", NODE, api.node_uid)
    devices = check_vf_devices(rig, slices)
    assert len(devices) == 52 and not any(d.get("taints") for d in devices.values())
    # The agent lists its slices by field selector (so it finds what is already there).
    assert any(m == "GET" and "fieldSelector=" in p and "spec.nodeName" in p for _, m, p, _ in api.log), api.log[:10]

    # Quiet: no inventory change, no writes (the server's added fields, e.g. managedFields, must
    # not look like a difference). A start-up rescan may still republish once: let it pass first.
    time.sleep(2)
    writes = len(api.writes())
    time.sleep(5)
    assert api.writes()[writes:] == []

    # A drained PF: its VFs carry a NoSchedule taint, and the pool's generation goes up.
    node = rig.node()
    drained = "0000:3b:00.1"
    run_operation(node, node.DrainDevice(pb.DrainDeviceRequest(device=drained), timeout=10))
    drained_vfs = {device_name(vf.bdf) for vf, _ in rig.vfs().values() if vf.pf_bdf == drained}
    assert len(drained_vfs) == 8

    def tainted(gen, slices):
        found = {d["name"] for s in slices for d in s["spec"]["devices"] if d.get("taints")}
        return gen > generation and found == drained_vfs

    generation2, slices = api.wait_settled(DRIVER, NODE, predicate=tainted, what="the drained PF's taints")
    for s in slices:
        for device in s["spec"]["devices"]:
            for taint in device.get("taints") or []:
                assert taint["key"] == f"{DRIVER}/draining" and taint["effect"] == "NoSchedule", taint
                assert 0 < len(taint.get("value", "x")) <= 63
    # The API server stamps timeAdded on the taints: that is no reason to write again.
    time.sleep(2)
    writes = len(api.writes())
    time.sleep(4)
    assert api.writes()[writes:] == []

    # More VFs than fit in one slice once any device has a taint (<= 64): the pool is split.
    reconfigured = "0000:3b:00.0"
    before = {device_name(vf.bdf) for vf, _ in rig.vfs().values() if vf.pf_bdf == reconfigured}
    with api.lock:
        rv_before = api.rv
    run_operation(node, node.Reconfigure(pb.ReconfigureRequest(pf_bdf=reconfigured, vf_count=64), timeout=30))
    # The PF's VFs were published tainted first, in the old layout, before any of them went: the
    # first generation written after the request has every one of them, each with the taint.
    with api.lock:
        after = [(rv, obj) for rv, _, obj in api.events if rv > rv_before]
    assert after, "nothing published for the reconfiguration"
    first = after[0][1]["spec"]["pool"]["generation"]
    fenced = {d["name"]: d for _, obj in after if obj["spec"]["pool"]["generation"] == first
              for d in obj["spec"].get("devices", [])
              if d["attributes"].get(f"{DRIVER}/pf") == {"string": reconfigured}}
    assert set(fenced) == before, (sorted(before - set(fenced)), sorted(set(fenced) - before))
    for device in fenced.values():
        assert any(t["key"] == f"{DRIVER}/draining" and t.get("value", "").endswith("being-reconfigured")
                   for t in device.get("taints") or []), device
    generation3, slices = api.wait_settled(
        DRIVER, NODE, timeout=45, what="100 VFs in several slices",
        predicate=lambda gen, slices: gen > generation2 and sum(len(s["spec"]["devices"]) for s in slices) >= 100)
    assert len(slices) >= 2 and all(len(s["spec"]["devices"]) <= 64 for s in slices)
    assert len(check_vf_devices(rig, slices)) == 100

    # Undrained: the taints go, the generation goes up again.
    node.UndrainDevice(pb.UndrainDeviceRequest(device=drained), timeout=10)
    generation4, slices = api.wait_settled(
        DRIVER, NODE, what="taints removed",
        predicate=lambda gen, slices: gen > generation3 and not any(d.get("taints") for s in slices for d in s["spec"]["devices"]))
    check_vf_devices(rig, slices)
    # While the agent runs, the pool's generation never goes down.
    written = [g for _, _, g, _ in api.generations]
    assert written == sorted(written), written

    # The kubelet wipes the node's slices (at its start, or 30 s after the driver's connection
    # ended): the agent notices and publishes them again.
    wiped_at = time.monotonic()
    api.wipe_slices()
    _, slices = api.wait_settled(DRIVER, NODE, timeout=30, what="the slices after a wipe",
                                 predicate=lambda gen, slices: sum(len(s["spec"]["devices"]) for s in slices) >= 100)
    print(f"republished {time.monotonic() - wiped_at:.1f} s after the wipe")
    assert len(check_vf_devices(rig, slices)) == 100

    # Another writer changes a VF's attribute: the agent's resync puts it back.
    numa = f"{DRIVER}/numaNode"
    victim = next(s["metadata"]["name"] for s in slices if any(numa in d["attributes"] for d in s["spec"]["devices"]))

    def tamper(obj):
        next(d for d in obj["spec"]["devices"] if numa in d["attributes"])["attributes"][numa] = {"int": 7}

    api.tamper_slice(victim, tamper)
    _, slices = api.wait_settled(DRIVER, NODE, timeout=45, what="the tampered slice restored", predicate=lambda gen, slices: all(
        d["attributes"][numa]["int"] != 7 for s in slices for d in s["spec"]["devices"] if numa in d["attributes"]))
    check_vf_devices(rig, slices)

    # Every stored slice once more, with the kubernetes-validate command itself.
    dump = rig.directory / "slices.yaml"
    dump.write_text(yaml.safe_dump_all(api.slice_list()))
    result = subprocess.run(["kubernetes-validate", "--strict", "-k", "1.34.0", str(dump)], capture_output=True, text=True)
    assert result.returncode == 0 and "WARN" not in result.stdout + result.stderr, result.stdout + result.stderr
    for s in api.slice_list():
        assert slice_limit_problems(s, DRIVER, NODE) == []
    rig.assert_api_clean()


# --- Prepare and Unprepare -----------------------------------------------------------------------

def test_prepare_and_unprepare_in_batches(rig):
    rig.start()
    kubelet = rig.kubelet
    kubelet.register()
    api = rig.api
    vf = free_vfs(rig, 8)
    a, b, c = Claim("default", "vm-a"), Claim("tenant-a", "pod-b"), Claim("default", "pod-c")
    api.put_claim(make_claim(a.namespace, a.name, a.uid, [("vf", device_name(vf[0]))]))
    # Two VFs for one request, and a result of another driver (not ours: left alone).
    claim_b = make_claim(b.namespace, b.name, b.uid, [
        ("vfs", device_name(vf[1])), ("vfs", device_name(vf[2])), ("gpu", "gpu-0", "gpu.example.com", NODE)])
    # The other driver reported its device already: its entry must survive ours coming and going.
    gpu_status = {"driver": "gpu.example.com", "pool": NODE, "device": "gpu-0", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Configured", "message": "", "lastTransitionTime": "2026-11-30T12:00:01Z"}]}
    claim_b["status"]["devices"] = [gpu_status]
    api.put_claim(claim_b)
    api.put_claim(make_claim(c.namespace, c.name, c.uid, [("vf", device_name(vf[3]))]))

    reply = kubelet.prepare([a, b, c])
    assert set(reply) == {a.uid, b.uid, c.uid}
    expected = {
        a.uid: [(device_name(vf[0]), ("vf",), (f"k8s.{DRIVER}/vf={a.uid}-{device_name(vf[0])}",))],
        b.uid: sorted([(device_name(vf[1]), ("vfs",), (f"k8s.{DRIVER}/vf={b.uid}-{device_name(vf[1])}",)),
                       (device_name(vf[2]), ("vfs",), (f"k8s.{DRIVER}/vf={b.uid}-{device_name(vf[2])}",))]),
        c.uid: [(device_name(vf[3]), ("vf",), (f"k8s.{DRIVER}/vf={c.uid}-{device_name(vf[3])}",))],
    }
    for claim in (a, b, c):
        assert prepared(reply, claim) == expected[claim.uid]
        assert not any(d.HasField("share_id") for d in reply[claim.uid].devices)  # VFs are not shared
        for device in reply[claim.uid].devices:
            resolve_cdi(rig, device.cdi_device_ids[0])
    # The engine's own allocations, owned by the claims; the VFs on vfio-pci.
    owners = rig.owners()
    assert owners[vf[0]] == a.owner and owners[vf[1]] == b.owner and owners[vf[2]] == b.owner and owners[vf[3]] == c.owner
    vfs = rig.vfs()
    for bdf in vf[:4]:
        assert vfs[bdf][0].driver == "vfio-pci" and vfs[bdf][0].vfio_device == f"/dev/vfio/{vfs[bdf][0].iommu_group}"
    # CDI specs and KubeVirt's metadata files.
    check_cdi_spec(rig, a, [("vf", vf[0])])
    check_cdi_spec(rig, b, [("vfs", vf[1]), ("vfs", vf[2])])
    check_cdi_spec(rig, c, [("vf", vf[3])])
    check_metadata(rig, a, "vf", [vf[0]])
    check_metadata(rig, b, "vfs", [vf[1], vf[2]])
    assert not rig.metadata_path(b, "gpu").exists()
    # status.devices (server-side apply, the driver as field manager): a Ready entry per VF with
    # its address and VFIO group, next to the other driver's untouched entry.
    for claim, bdfs in ((a, vf[:1]), (b, vf[1:3]), (c, vf[3:4])):
        entries = api.device_status(claim.namespace, claim.name)
        ours = sorted((e for e in entries if e["driver"] == DRIVER), key=lambda e: e["device"])
        assert [e["device"] for e in ours] == [device_name(bdf) for bdf in bdfs], entries
        for entry, bdf in zip(ours, bdfs):
            assert entry["pool"] == NODE and "shareID" not in entry
            (ready,) = entry["conditions"]
            assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", "Prepared")
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ready["lastTransitionTime"]), ready
            assert entry["data"] == {"pciBusID": bdf, "vfioDevice": vfs[bdf][0].vfio_device,
                                     "cdiDeviceID": f"k8s.{DRIVER}/vf={claim.uid}-{device_name(bdf)}"}
    assert [e for e in api.device_status(b.namespace, b.name) if e["driver"] != DRIVER] == [gpu_status]
    applies = [entry for entry in api.writes() if entry[1] == "PATCH"]
    assert len(applies) == 3 and all(f"fieldManager={DRIVER}" in entry[2] and entry[3] == 200 for entry in applies), applies
    allocations = sorted((x.id, x.vf_bdf) for x in rig.inventory().allocations)

    # Idempotent: the same batch again, and a part of it, give the same answers and change nothing.
    specs = {claim.uid: rig.spec_path(claim).read_text() for claim in (a, b, c)}
    again = kubelet.prepare([a, b, c])
    for claim in (a, b, c):
        assert prepared(again, claim) == expected[claim.uid]
    assert prepared(kubelet.prepare([b]), b) == expected[b.uid]
    assert sorted((x.id, x.vf_bdf) for x in rig.inventory().allocations) == allocations
    assert {claim.uid: rig.spec_path(claim).read_text() for claim in (a, b, c)} == specs

    # Claims that must fail, each with its own error, next to one that succeeds in the same batch.
    replaced = Claim("default", "replaced")
    api.put_claim(make_claim("default", "replaced", claim_uid(), [("vf", device_name(vf[4]))]))  # another UID
    unallocated = Claim("default", "unallocated")
    api.put_claim(make_claim("default", "unallocated", unallocated.uid, [("vf", device_name(vf[4]))], allocated=False))
    missing = Claim("default", "never-created")
    elsewhere = Claim("default", "other-pool")
    api.put_claim(make_claim("default", "other-pool", elsewhere.uid, [("vf", device_name(vf[4]), DRIVER, "other-node")]))
    no_such_vf = Claim("default", "no-such-vf")
    api.put_claim(make_claim("default", "no-such-vf", no_such_vf.uid, [("vf", "vf-0000-77-00-4")]))
    taken_by_node_api = rig.node().AllocateVF(pb.AllocateVFRequest(
        owner="node-api", constraints=pb.AllocationConstraints(pf_bdf="0000:d8:00.1")), timeout=10).allocation.vf_bdf
    taken = Claim("default", "taken")
    api.put_claim(make_claim("default", "taken", taken.uid, [("vf", device_name(taken_by_node_api))]))
    good = Claim("default", "good")
    api.put_claim(make_claim("default", "good", good.uid, [("vf", device_name(vf[5]))]))
    bad = [replaced, unallocated, missing, elsewhere, no_such_vf, taken]
    reply = kubelet.prepare([*bad, good])
    assert set(reply) == {claim.uid for claim in [*bad, good]}
    assert re.search(r"claim .*got replaced", reply[replaced.uid].error), reply[replaced.uid].error
    assert "not allocated" in reply[unallocated.uid].error, reply[unallocated.uid].error
    for claim in bad:
        assert reply[claim.uid].error and not reply[claim.uid].devices, (claim.name, reply[claim.uid])
        assert not rig.spec_path(claim).exists()
    assert prepared(reply, good) == [(device_name(vf[5]), ("vf",), (f"k8s.{DRIVER}/vf={good.uid}-{device_name(vf[5])}",))]
    owners = rig.owners()
    assert owners[taken_by_node_api] == "node-api" and vf[4] not in owners

    # The scheduler must not pick a VF taken outside DRA: it is tainted in the pool. VFs of
    # prepared claims are not (the scheduler tracks its own allocations).
    def only_node_api_tainted(generation, slices):
        tainted = {d["name"]: [t["key"] for t in d.get("taints") or []] for s in slices for d in s["spec"]["devices"]}
        return tainted[device_name(taken_by_node_api)] == [f"{DRIVER}/allocated"] and not any(
            tainted[device_name(bdf)] for bdf in vf[:4])

    api.wait_settled(DRIVER, NODE, predicate=only_node_api_tainted, what="the node API's VF tainted")
    assert not any(o.startswith("claim:") and not o.endswith(tuple(c.uid for c in (a, b, c, good))) for o in owners.values())

    # v1beta1 (kubelets 1.32, 1.33): the same service without share_id.
    beta = Claim("default", "beta")
    api.put_claim(make_claim("default", "beta", beta.uid, [("vf", device_name(vf[6]))]))
    reply = kubelet.prepare([beta], version="v1beta1")
    assert reply[beta.uid].error == "" and [d.device_name for d in reply[beta.uid].devices] == [device_name(vf[6])]
    assert list(reply[beta.uid].devices[0].cdi_device_ids) == [f"k8s.{DRIVER}/vf={beta.uid}-{device_name(vf[6])}"]
    assert dict(kubelet.unprepare([beta], version="v1beta1")) == {beta.uid: dra_beta.NodeUnprepareResourceResponse()}

    # Unprepare: every claim gets an entry; unknown claims and claims that failed to prepare succeed.
    unknown = Claim("default", "unknown")
    everything = [a, b, c, good, unknown, *bad]
    reply = kubelet.unprepare(everything)
    assert {uid: r.error for uid, r in reply.items()} == {claim.uid: "" for claim in everything}
    owners = rig.owners()
    assert not any(o.startswith("claim:") for o in owners.values()), owners
    assert owners[taken_by_node_api] == "node-api"  # not the claim's to release
    assert list(rig.cdi.iterdir()) == []
    for claim, request in ((a, "vf"), (b, "vfs"), (c, "vf")):
        assert not rig.metadata_path(claim, request).exists()
    # The driver's status entries are withdrawn; the other driver's stays.
    assert api.device_status(a.namespace, a.name) == [] and api.device_status(c.namespace, c.name) == []
    assert api.device_status(b.namespace, b.name) == [gpu_status]
    # Again: still fine.
    assert {uid: r.error for uid, r in kubelet.unprepare([a, b]).items()} == {a.uid: "", b.uid: ""}
    # A stale Prepare retry after Unprepare (the kubelet's retry racing the pod's end) must not
    # allocate the device again: the agent keeps tombstones of unprepared claim UIDs.
    stale = kubelet.prepare([a])
    assert stale[a.uid].error and not stale[a.uid].devices
    assert vf[0] not in rig.owners() and not rig.spec_path(a).exists()
    # The same claim deallocated and allocated again later (a standalone claim another pod uses):
    # a new allocation, prepared; unprepared again, its own stale retry is refused in turn.
    api.put_claim(make_claim(a.namespace, a.name, a.uid, [("vf", device_name(vf[0]))], allocated_at="2026-11-30T12:30:00Z"))
    assert prepared(kubelet.prepare([a]), a) == expected[a.uid]
    assert rig.owners()[vf[0]] == a.owner and rig.spec_path(a).exists()
    assert {uid: r.error for uid, r in kubelet.unprepare([a]).items()} == {a.uid: ""}
    assert kubelet.prepare([a])[a.uid].error and vf[0] not in rig.owners()
    rig.assert_api_clean()

    # Every Prepare and Unprepare is in the audit trail, from the kubelet over `dra`, each claim named.
    trail = rig.node().GetAuditTrail(pb.GetAuditTrailRequest(limit=1000), timeout=10).entries
    dra = [e for e in trail if e.transport == "dra"]
    assert {e.rpc for e in dra} == {"DRA.NodePrepareResources", "DRA.NodeUnprepareResources"}, dra
    assert all(e.identity == "kubelet" and e.status == "ok" for e in dra), dra
    prepares = [json.loads(e.request_json) for e in dra if e.rpc == "DRA.NodePrepareResources"]
    named = {(c["namespace"], c["name"], c["uid"]) for r in prepares for c in r["claims"]}
    assert {(x.namespace, x.name, x.uid) for x in (a, b, c, good, beta)} <= named, named
    unprepared = {c["uid"] for e in dra if e.rpc == "DRA.NodeUnprepareResources"
                  for c in json.loads(e.request_json)["claims"]}
    assert {x.uid for x in everything} <= unprepared


def test_sigkill_between_prepare_and_unprepare(rig):
    rig.start()
    rig.kubelet.register()
    vf = free_vfs(rig, 3)
    a, b = Claim("default", "kill-a"), Claim("default", "kill-b")
    rig.api.put_claim(make_claim(a.namespace, a.name, a.uid, [("vf", device_name(vf[0]))]))
    rig.api.put_claim(make_claim(b.namespace, b.name, b.uid, [("one", device_name(vf[1])), ("two", device_name(vf[2]))]))
    first = rig.kubelet.prepare([a, b])
    before = {claim.uid: prepared(first, claim) for claim in (a, b)}
    specs = {claim.uid: json.loads(rig.spec_path(claim).read_text()) for claim in (a, b)}

    rig.agent.process.send_signal(signal.SIGKILL)
    rig.agent.process.wait(timeout=10)
    shutil.copy(rig.directory / "agent.log", rig.directory / "agent-killed.log")
    with pytest.raises(grpc.RpcError):  # the kubelet's Unprepare while the driver is down fails; it retries
        rig.kubelet.unprepare([a])
    # /var/run/cdi is a tmpfs: after a reboot the specs are gone. The agent rebuilds them at start.
    for spec in rig.cdi.iterdir():
        spec.unlink()

    rig.start()
    wait_for(lambda: rig.spec_path(a).exists() and rig.spec_path(b).exists(), 15, "the CDI specs rebuilt at start")
    assert {claim.uid: json.loads(rig.spec_path(claim).read_text()) for claim in (a, b)} == specs
    # The plugin watcher sees the new registration socket and registers the driver again.
    rig.kubelet.register()
    owners = rig.owners()
    assert owners[vf[0]] == a.owner and owners[vf[1]] == b.owner and owners[vf[2]] == b.owner
    # A Prepare retry after the restart is answered from the journal, unchanged.
    again = rig.kubelet.prepare([a, b])
    assert {claim.uid: prepared(again, claim) for claim in (a, b)} == before
    reply = rig.kubelet.unprepare([a, b])
    assert {uid: r.error for uid, r in reply.items()} == {a.uid: "", b.uid: ""}
    assert not any(o.startswith("claim:") for o in rig.owners().values())
    assert list(rig.cdi.iterdir()) == []
    # The status entries reported before the kill are withdrawn by the restarted agent.
    assert rig.api.device_status(a.namespace, a.name) == [] and rig.api.device_status(b.namespace, b.name) == []
    rig.assert_api_clean()


# --- Metrics -------------------------------------------------------------------------------------

def dra_metrics(port):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_count_claims_status_reports_and_the_pools_publishing(rig):
    """/metrics: claims answered by call and result, claims prepared now, refused status reports,
    the pool's generation and whether its last sync worked, and the kubelet's calls timed like the
    node API's."""
    port = free_port()
    rig.start(extra=rig.flags() + ["--http-listen", f"127.0.0.1:{port}"])
    rig.kubelet.register()
    generation, _ = rig.api.wait_settled(DRIVER, NODE, what="the pool")
    vf = free_vfs(rig, 2)
    good, unallocated, refused = Claim("default", "m-good"), Claim("default", "m-unallocated"), Claim("default", "m-refused")
    rig.api.put_claim(make_claim("default", good.name, good.uid, [("vf", device_name(vf[0]))]))
    rig.api.put_claim(make_claim("default", unallocated.name, unallocated.uid, [("vf", device_name(vf[1]))], allocated=False))
    reply = rig.kubelet.prepare([good, unallocated])
    assert reply[good.uid].error == "" and reply[unallocated.uid].error
    found = dra_metrics(port)
    assert found[("fpga_dra_prepared_claims", ())] == 1
    assert found[("fpga_dra_claims_total", (("call", "prepare"), ("result", "ok")))] == 1
    assert found[("fpga_dra_claims_total", (("call", "prepare"), ("result", "failed")))] == 1
    assert found[("fpga_dra_claim_status_failures_total", ())] == 0
    assert found[("fpga_dra_slices_synced", ())] == 1
    assert found[("fpga_dra_pool_generation", ())] >= generation
    prepare_calls = ("grpc_server_handled_total", (("grpc_code", "OK"), ("grpc_method", "NodePrepareResources"),
                                                   ("grpc_service", "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin")))
    assert found.get(prepare_calls) == 1, sorted(k for k in found if k[0] == "grpc_server_handled_total")

    # Without the RBAC for claim status, Prepare still works; the refusal is counted (and logged).
    rig.api.refuse_status_writes = True
    rig.api.put_claim(make_claim("default", refused.name, refused.uid, [("vf", device_name(vf[1]))]))
    assert rig.kubelet.prepare([refused])[refused.uid].error == ""
    assert rig.owners()[vf[1]] == refused.owner and rig.spec_path(refused).exists()
    found = dra_metrics(port)
    assert found[("fpga_dra_claim_status_failures_total", ())] == 1
    assert found[("fpga_dra_prepared_claims", ())] == 2
    log = (rig.directory / "agent.log").read_text()
    assert "cannot report the claim's device status" in log and "associated-node:patch on resourceclaims/driver" in log
    rig.api.refuse_status_writes = False

    reply = rig.kubelet.unprepare([good, refused])
    assert {uid: r.error for uid, r in reply.items()} == {good.uid: "", refused.uid: ""}
    found = dra_metrics(port)
    assert found[("fpga_dra_prepared_claims", ())] == 0
    assert found[("fpga_dra_claims_total", (("call", "unprepare"), ("result", "ok")))] == 2

    # The agent's token is revoked: the next sync (an inventory change starts one) fails, and says so.
    rig.api.token = "revoked"
    rig.node().AllocateVF(pb.AllocateVFRequest(owner="metrics"), timeout=10)
    found = wait_for(lambda: (lambda f: f if f[("fpga_dra_slices_synced", ())] == 0 else None)(dra_metrics(port)),
                     30, "fpga_dra_slices_synced to fall to 0")
    assert found[("fpga_dra_slice_sync_failures_total", ())] >= 1


# --- Accelerator shares --------------------------------------------------------------------------

def resolve_cdi(rig, cdi_id):
    """What a container runtime does with a CDI id: the device of that kind and name in a spec."""
    kind, name = cdi_id.split("=", 1)
    found = [d for path in rig.cdi.glob("*.json") for spec in [json.loads(path.read_text())] if spec["kind"] == kind
             for d in spec["devices"] if d["name"] == name]
    assert len(found) == 1, f"{cdi_id} resolves to {len(found)} devices in {os.listdir(rig.cdi)}"
    return found[0]


def test_accelerator_shares(rig):
    """An accelerator slot is one device many claims share (allowMultipleAllocations, capacity in
    guest slots); a claim on it becomes a context with the function and weight of its opaque
    configuration, and Unprepare deletes it."""
    rig.start()
    rig.kubelet.register()
    _, slices = rig.api.wait_settled(DRIVER, NODE, what="the pool")
    accelerators = {d["name"]: d for s in slices for d in s["spec"]["devices"]
                    if d["attributes"].get(f"{DRIVER}/kind") == {"string": "accelerator"}}
    device = accelerators["acc-0000-3b-0"]
    assert device["allowMultipleAllocations"] is True
    assert device["attributes"][f"{DRIVER}/card"] == {"string": "card-0000:3b"}
    limit = device["attributes"][f"{DRIVER}/overcommitLimit"]["int"]
    assert device["capacity"]["guests"]["value"] == str(limit) and limit >= 2
    node = rig.node()
    before = {c.id for c in node.ListContexts(pb.ListContextsRequest(), timeout=10).contexts}
    claims, shares = [], {}
    for index, weight in enumerate((1, 3)):
        claim = Claim("default", f"share-{index}")
        obj = make_claim(claim.namespace, claim.name, claim.uid, [("share", "acc-0000-3b-0")])
        obj["spec"]["devices"]["requests"][0]["exactly"]["deviceClassName"] = "qdma-accelerator"
        config = [{"requests": ["share"], "opaque": {"driver": DRIVER, "parameters": {"function": "fft", "weight": weight}}}]
        obj["spec"]["devices"]["config"] = config
        obj["status"]["allocation"]["devices"]["config"] = [dict(source="FromClaim", **config[0])]
        result = obj["status"]["allocation"]["devices"]["results"][0]
        result["shareID"] = shares[claim.uid] = str(uuid.uuid4())
        result["consumedCapacity"] = {"guests": "1"}
        rig.api.put_claim(obj)
        claims.append((claim, weight))
    reply = rig.kubelet.prepare([c for c, _ in claims])
    for claim, weight in claims:
        response = reply[claim.uid]
        assert response.error == "", response.error
        (prepared_device,) = response.devices
        assert (prepared_device.device_name, prepared_device.pool_name, list(prepared_device.request_names)) == (
            "acc-0000-3b-0", NODE, ["share"])
        assert prepared_device.HasField("share_id") and prepared_device.share_id == shares[claim.uid]
        for cdi_id in prepared_device.cdi_device_ids:  # every id the kubelet gets must resolve
            resolve_cdi(rig, cdi_id)
    contexts = [c for c in node.ListContexts(pb.ListContextsRequest(), timeout=10).contexts if c.id not in before]
    assert sorted((c.accelerator_id, c.function, c.weight) for c in contexts) == [
        ("card-0000:3b/acc0", "fft", 1), ("card-0000:3b/acc0", "fft", 3)]
    assert len({c.guest for c in contexts}) == 2
    for claim, _ in claims:  # status.devices: the share (by its shareID) and its context
        (entry,) = rig.api.device_status(claim.namespace, claim.name)
        assert entry["device"] == "acc-0000-3b-0" and entry["shareID"] == shares[claim.uid]
        assert entry["data"]["accelerator"] == "card-0000:3b/acc0" and entry["data"]["context"] in {c.id for c in contexts}
        assert entry["conditions"][0]["status"] == "True"
    # Idempotent, like VFs.
    again = rig.kubelet.prepare([c for c, _ in claims])
    assert {uid: [d.share_id for d in r.devices] for uid, r in again.items()} == {uid: [s] for uid, s in shares.items()}
    assert len([c for c in node.ListContexts(pb.ListContextsRequest(), timeout=10).contexts if c.id not in before]) == 2
    reply = rig.kubelet.unprepare([c for c, _ in claims])
    assert {uid: r.error for uid, r in reply.items()} == {c.uid: "" for c, _ in claims}
    assert {c.id for c in node.ListContexts(pb.ListContextsRequest(), timeout=10).contexts} == before
    assert list(rig.cdi.iterdir()) == []
    assert all(rig.api.device_status(c.namespace, c.name) == [] for c, _ in claims)
    rig.assert_api_clean()


# --- Health --------------------------------------------------------------------------------------

def stream_into(call):
    updates = queue.Queue()

    def pump():
        try:
            for response in call:
                updates.put(response)
        except grpc.RpcError as e:
            updates.put(e)

    threading.Thread(target=pump, daemon=True).start()
    return updates


def test_health_streams_list_every_device(rig):
    rig.start()
    rig.kubelet.register()
    names = {device_name(b) for b in rig.vfs()}
    with rig.kubelet.channel() as channel:
        streams = {
            "v1alpha1": (health_alpha, stream_into(health_alpha_rpc.DRAResourceHealthStub(channel).NodeWatchResources(
                health_alpha.NodeWatchResourcesRequest(), timeout=120))),
            "v1": (health, stream_into(health_rpc.DRAResourceHealthStub(channel).NodeWatchResources(
                health.NodeWatchResourcesRequest(), timeout=120))),
        }
        for version, (module, updates) in streams.items():
            first = updates.get(timeout=30)
            assert not isinstance(first, grpc.RpcError), f"{version}: {first}"
            listed = {d.device.device_name: d for d in first.devices}
            assert set(listed) >= names, f"{version}: {names - set(listed)} missing"
            for name in names:
                device = listed[name]
                assert device.device.pool_name == NODE
                assert device.health == module.HEALTHY, (version, name, device)
                assert abs(device.last_updated_time - time.time()) < 24 * 3600
                assert len(device.message) <= 1024
        # Each response is the complete list: two more VFs appear in a later one.
        node = rig.node()
        run_operation(node, node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.3", vf_count=6), timeout=30))
        grown = {device_name(b) for b in rig.vfs()}
        assert len(grown) == len(names) + 2
        for version, (module, updates) in streams.items():
            deadline = time.monotonic() + 30
            while True:
                update = updates.get(timeout=max(0.1, deadline - time.monotonic()))
                assert not isinstance(update, grpc.RpcError), f"{version}: {update}"
                if {d.device.device_name for d in update.devices} >= grown:
                    break
    rig.assert_api_clean()


# --- Configuration file and in-cluster discovery ------------------------------------------------

def test_config_file_and_in_cluster_environment(rig):
    """kubernetes.dra and kubernetes.api from the configuration file, the API server's address
    from KUBERNETES_SERVICE_HOST/PORT (as in a pod), another driver name throughout."""
    rig.api.stop()
    driver = "fpga.example.org"
    rig.driver = driver
    rig.api = FakeKubeAPI(rig.directory / "api", node=NODE, driver=driver).start()
    rig.kubelet = FakeKubelet(rig.registry, driver)
    config = {"kubernetes": {
        "dra": {"enabled": True, "driver_name": driver, "registry_dir": str(rig.registry),
                "plugins_dir": str(rig.plugins), "cdi_dir": str(rig.cdi)},
        "api": {"token_file": str(rig.api.token_file), "ca_file": str(rig.api.ca_file)}}}
    rig.start(extra=[], config_text=yaml.safe_dump(config),
              env={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(rig.api.port)})
    info = rig.kubelet.register()
    assert (info.name, info.endpoint) == (driver, str(rig.plugins / driver / "dra.sock"))
    _, slices = rig.api.wait_settled(driver, NODE, what="the slices of the other driver")
    assert all(s["metadata"]["name"].startswith(f"{NODE}-{driver}-") for s in slices)
    assert len(check_vf_devices(rig, slices)) == 52
    (bdf,) = free_vfs(rig, 1)
    claim = Claim("default", "other-driver")
    rig.api.put_claim(make_claim("default", claim.name, claim.uid, [("vf", device_name(bdf), driver, NODE)]))
    reply = rig.kubelet.prepare([claim])
    assert prepared(reply, claim) == [(device_name(bdf), ("vf",), (f"k8s.{driver}/vf={claim.uid}-{device_name(bdf)}",))]
    spec = check_cdi_spec(rig, claim, [("vf", bdf)])
    assert f"{env_name(driver)}={bdf}" in spec["devices"][0]["containerEdits"]["env"] + (
        spec.get("containerEdits") or {}).get("env", [])
    assert rig.kubelet.unprepare([claim])[claim.uid].error == ""
    rig.assert_api_clean()


# --- A kubeconfig ---------------------------------------------------------------------------------

def write_kubeconfig(rig, ca, user, current="fpga"):
    """A kubeconfig in <rig>/kube/config pointing at the fake API server, with a second context
    (`broken`, whose cluster and user do not exist) besides `fpga`. ca: "data" (inline) or "file"
    (a path relative to the kubeconfig's directory); user: "token" (inline), "tokenFile" (relative)
    or "cert" (a client certificate and key, inline and as a file)."""
    import base64

    from fake_kube_api import make_client_cert

    kube = rig.directory / "kube"
    kube.mkdir(exist_ok=True)
    cluster = {"server": rig.api.url}
    if ca == "data":
        cluster["certificate-authority-data"] = base64.b64encode(rig.api.ca_file.read_bytes()).decode()
    else:
        (kube / "pki").mkdir(exist_ok=True)
        shutil.copy(rig.api.ca_file, kube / "pki" / "ca.crt")
        cluster["certificate-authority"] = "pki/ca.crt"
    if user == "token":
        credentials = {"token": rig.api.token}
    elif user == "tokenFile":
        shutil.copy(rig.api.token_file, kube / "token")
        credentials = {"tokenFile": "token"}
    else:
        rig.api.client_user = "system:node:interop"
        crt, key = make_client_cert(rig.directory / "api", rig.api.client_user)
        credentials = {"client-certificate": str(crt),
                       "client-key-data": base64.b64encode(key.read_bytes()).decode()}
    config = {"apiVersion": "v1", "kind": "Config", "current-context": current,
              "clusters": [{"name": "fake", "cluster": cluster}],
              "users": [{"name": "agent", "user": credentials}],
              "contexts": [{"name": "broken", "context": {"cluster": "gone", "user": "nobody"}},
                           {"name": "fpga", "context": {"cluster": "fake", "user": "agent", "namespace": "x"}}]}
    path = kube / "config"
    path.write_text(yaml.safe_dump(config))
    return path


def dra_flags(rig):
    return ["--dra", "--dra-driver-name", rig.driver, "--dra-registry-dir", str(rig.registry),
            "--dra-plugins-dir", str(rig.plugins), "--cdi-dir", str(rig.cdi)]


def prepare_one_claim(rig, name):
    """The slices published, then one claim prepared (its status reported) and unprepared."""
    rig.kubelet.register()
    _, slices = rig.api.wait_settled(rig.driver, NODE, what="the slices published through the kubeconfig")
    assert len(check_vf_devices(rig, slices)) == 52
    (bdf,) = free_vfs(rig, 1)
    claim = Claim("default", name)
    rig.api.put_claim(make_claim("default", claim.name, claim.uid, [("vf", device_name(bdf))]))
    assert prepared(rig.kubelet.prepare([claim]), claim)[0][0] == device_name(bdf)
    wait_for(lambda: rig.api.device_status(claim.namespace, claim.name), 15, "the claim's status.devices")
    assert rig.kubelet.unprepare([claim])[claim.uid].error == ""
    rig.assert_api_clean()


@pytest.mark.parametrize("ca,user", [("data", "token"), ("file", "tokenFile"), ("data", "cert")])
def test_kubeconfig(rig, ca, user):
    """--kubeconfig alone points the driver at the API server: the CA inline or as a file relative
    to the kubeconfig, a token inline or from a file, or a client certificate (mutual TLS)."""
    path = write_kubeconfig(rig, ca, user)
    rig.start(extra=dra_flags(rig) + ["--kubeconfig", str(path)])
    prepare_one_claim(rig, f"kubeconfig-{ca}-{user.lower()}")
    (line,) = [l for l in (rig.directory / "agent.log").read_text().splitlines() if "DRA: Kubernetes API" in l]
    assert rig.api.url in line and str(path) in line and "fpga" in line, line
    if user == "cert":
        # Every request proved itself by the certificate alone (assert_api_clean: none refused).
        assert rig.api.by_certificate, "no request was authenticated by the client certificate"
        assert "client certificate" in line and "bearer token" not in line, line
    else:
        assert rig.api.by_certificate == []


def test_kubeconfig_from_the_environment_with_a_chosen_context(rig):
    """KUBECONFIG (its first file) and --kube-context choose what current-context does not; an
    explicit --kube-ca-file overrides the kubeconfig's CA."""
    path = write_kubeconfig(rig, "data", "token", current="broken")
    rig.start(extra=dra_flags(rig) + ["--kube-context", "fpga", "--kube-ca-file", str(rig.api.ca_file)],
              env={"KUBECONFIG": f"{path}:/nonexistent/second"})
    prepare_one_claim(rig, "kubeconfig-env")


def test_kubeconfig_errors_name_the_file_and_the_context(rig):
    path = write_kubeconfig(rig, "data", "token", current="broken")
    with pytest.raises(RuntimeError) as failed:
        rig.start(extra=dra_flags(rig) + ["--kubeconfig", str(path)])
    assert f'kubeconfig {path}: cluster "gone" not found; clusters: "fake"' in str(failed.value)
    with pytest.raises(RuntimeError) as failed:
        rig.start(extra=dra_flags(rig) + ["--kubeconfig", str(path), "--kube-context", "foo"])
    assert f'kubeconfig {path}: context "foo" not found; contexts: "broken", "fpga"' in str(failed.value)
    huge = rig.directory / "kube" / "huge"
    huge.write_bytes(b"#" * (1 << 20) + b"\n")
    with pytest.raises(RuntimeError) as failed:
        rig.start(extra=dra_flags(rig) + ["--kubeconfig", str(huge)])
    assert f"kubeconfig {huge}: larger than 1048576 bytes, refused" in str(failed.value)


# --- A real CDI consumer -------------------------------------------------------------------------

BASE_IMAGE = "localhost/fpga-agent-base:bookworm"
ENGINE_ENV = dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF", str(ROOT / "deploy" / "containers.conf")))
PODMAN_CDI_DIR = Path("/var/run/cdi")  # podman 4.3 reads /etc/cdi and /var/run/cdi only
VFIO_MISC = (10, 196)  # /dev/vfio/vfio, the real misc device numbers
GROUP_STAND_IN_MAJOR = 240  # a char major of the "local/experimental" range for stand-in group nodes


def need_podman():
    message = None
    if shutil.which("podman") is None or shutil.which("runc") is None:
        message = "podman and runc are missing (scripts/install-test-deps installs them)"
    elif os.geteuid() != 0:
        message = "the CDI test runs podman as root and makes /dev/vfio stand-ins; this is not root"
    if message:
        if os.environ.get("CI"):
            pytest.fail(message + " - CI must have them", pytrace=False)
        pytest.skip(message)
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=ENGINE_ENV).returncode != 0:
        subprocess.run([ROOT / "scripts" / "make-base-image"], env=ENGINE_ENV, check=True, timeout=900)


@pytest.fixture
def vfio_stand_ins():
    """The simulated platform's VFs have IOMMU groups but the host has no /dev/vfio: podman refuses
    a CDI device whose node is missing ("failed to stat CDI host device"). So, for missing nodes
    only, this makes character devices in /dev/vfio: vfio with the real misc numbers (10:196) and
    each group with major 240 (no driver behind either: nothing in the test opens them). Whatever it
    made is removed afterwards; existing nodes are never touched."""
    made, made_dir = [], False
    vfio = Path("/dev/vfio")

    def make(groups):
        nonlocal made_dir
        if not vfio.exists():
            vfio.mkdir(mode=0o755)
            made_dir = True
        for name, numbers in [("vfio", VFIO_MISC)] + [(str(g), (GROUP_STAND_IN_MAJOR, g)) for g in groups]:
            path = vfio / name
            if not path.exists():
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(*numbers))
                made.append(path)

    yield make
    for path in made:
        path.unlink(missing_ok=True)
    if made_dir:
        try:
            vfio.rmdir()
        except OSError:
            pass


def test_cdi_spec_runs_in_podman(rig, vfio_stand_ins):
    need_podman()
    rig.start()
    rig.kubelet.register()
    (bdf,) = free_vfs(rig, 1)
    claim = Claim("default", "podman")
    rig.api.put_claim(make_claim("default", claim.name, claim.uid, [("vf", device_name(bdf))]))
    reply = rig.kubelet.prepare([claim])
    ((_, _, (cdi_id,)),) = prepared(reply, claim)
    spec = check_cdi_spec(rig, claim, [("vf", bdf)])
    group = rig.vfs()[bdf][0].iommu_group
    vfio_stand_ins([group])
    PODMAN_CDI_DIR.mkdir(parents=True, exist_ok=True)
    published = PODMAN_CDI_DIR / rig.spec_path(claim).name
    assert not published.exists()
    shutil.copy(rig.spec_path(claim), published)
    metadata = f"{CONTAINER_METADATA}/{claim.name}/vf/{DRIVER}-metadata.json"
    script = (f"env | grep ^PCI_RESOURCE_; echo '--- nodes'; ls /dev/vfio; echo '--- metadata'; cat {metadata}; "
              f"echo; echo '--- write'; if echo x >> {metadata} 2>/dev/null; then echo WRITABLE; else echo READONLY; fi")
    try:
        result = subprocess.run(["podman", "run", "--rm", "--network", "none", "--device", cdi_id, BASE_IMAGE,
                                 "sh", "-c", script], env=ENGINE_ENV, capture_output=True, text=True, timeout=120)
    finally:
        published.unlink(missing_ok=True)
    assert result.returncode == 0, f"podman: {result.stderr}\nspec: {json.dumps(spec, indent=1)}"
    env, rest = result.stdout.split("--- nodes\n", 1)
    nodes, rest = rest.split("--- metadata\n", 1)
    metadata_text, written = rest.split("--- write\n", 1)
    assert f"{env_name(DRIVER)}={bdf}" in env.splitlines()
    assert {"vfio", str(group)} <= set(nodes.split())
    objects = read_json_stream(metadata_text)
    assert objects[0]["metadata"]["uid"] == claim.uid
    assert objects[0]["requests"][0]["devices"][0]["attributes"]["resource.kubernetes.io/pciBusID"] == {"string": bdf}
    assert written.strip() == "READONLY"  # the metadata reaches the container read-only
    assert rig.kubelet.unprepare([claim])[claim.uid].error == ""
    rig.assert_api_clean()


# --- Grow on demand ------------------------------------------------------------------------------

GROW_CONFIG = """kubernetes:
  dra:
    grow_on_demand: true
    grow_pfs: ["0000:3b:00.3"]
    grow_max_vfs: 12
    grow_step: 4
"""


def potential_devices(rig, slices, pf):
    """{vfIndex: device} of the pool's not-yet-created VFs of `pf`."""
    found = {}
    for s in slices:
        for device in s["spec"].get("devices") or []:
            attributes = device["attributes"]
            if attributes.get(f"{rig.driver}/created") == {"bool": False} and attributes[f"{rig.driver}/pf"] == {"string": pf}:
                found[attributes[f"{rig.driver}/vfIndex"]["int"]] = device
    return found


def test_grow_on_demand_prepares_claims_on_vfs_the_pf_does_not_have_yet(rig):
    """The pool offers PF 0000:3b:00.3's potential VFs (4 of 68 exist, ceiling 12); a batch of two
    claims on two of them grows the PF once (4 -> 8, step 4) through a reconfiguration started by
    the first claim, and both are prepared into vfio-pci VFs whose CDI specs name their groups."""
    rig.start(rig.flags(), config_text=GROW_CONFIG)
    rig.kubelet.register()
    pf = "0000:3b:00.3"
    _, slices = rig.api.wait_settled(
        rig.driver, NODE, what="the potential VFs published",
        predicate=lambda generation, slices: len(potential_devices(rig, slices, pf)) == 8)
    potential = potential_devices(rig, slices, pf)
    assert sorted(potential) == list(range(4, 12))
    real = check_vf_devices(rig, [{"spec": {"devices": [d for s in slices for d in s["spec"].get("devices") or []
                                                         if d["attributes"].get(f"{rig.driver}/created") != {"bool": False}]}}])
    assert all(d["attributes"][f"{rig.driver}/created"] == {"bool": True} for d in real.values())
    # The future BDFs follow offset and stride: index 4 comes right after index 3.
    existing = {vf.index: bdf for bdf, (vf, _) in rig.vfs().items() if vf.pf_bdf == pf}
    fourth = potential[4]["attributes"]["resource.kubernetes.io/pciBusID"]["string"]
    assert int(fourth.split(".")[-1], 16) + int(fourth.split(":")[2].split(".")[0], 16) * 8 == \
        int(existing[3].split(".")[-1], 16) + int(existing[3].split(":")[2].split(".")[0], 16) * 8 + 1
    a, b = Claim("default", "grow-a"), Claim("default", "grow-b")
    rig.api.put_claim(make_claim("default", a.name, a.uid, [("vf", potential[4]["name"])]))
    rig.api.put_claim(make_claim("default", b.name, b.uid, [("vf", potential[6]["name"])]))
    reply = rig.kubelet.prepare([a, b])
    assert prepared(reply, a)[0][0] == potential[4]["name"]
    assert prepared(reply, b)[0][0] == potential[6]["name"]
    pfs = {p.bdf: p for card in rig.inventory().cards for p in card.pfs}
    assert pfs[pf].num_vfs == 8
    vfs = rig.vfs()
    for device in (potential[4], potential[6]):
        bdf = device["attributes"]["resource.kubernetes.io/pciBusID"]["string"]
        vf, _ = vfs[bdf]
        assert vf.driver == "vfio-pci"
        assert f"/dev/vfio/{vf.iommu_group}" in rig.spec_path(a if device is potential[4] else b).read_text()
    # One growth, started by the first claim, audited.
    operations = [e for e in rig.node().GetAuditTrail(pb.GetAuditTrailRequest(limit=200), timeout=10).entries
                  if e.rpc == "Reconfigure"]
    assert len(operations) == 1 and operations[0].identity == "dra claim default/grow-a", operations
    operation_id = json.loads(operations[0].request_json)["operationId"]
    operation = rig.node().GetOperation(pb.GetOperationRequest(id=operation_id), timeout=10)
    assert operation.started_by == "dra claim default/grow-a" and operation.state == pb.OPERATION_STATE_SUCCEEDED
    # The pool now offers the rest up to the ceiling, and every slice the agent wrote validated.
    rig.api.wait_settled(rig.driver, NODE, what="the pool after the growth",
                         predicate=lambda generation, slices: sorted(potential_devices(rig, slices, pf)) == list(range(8, 12)))
    rig.assert_api_clean()


class HeartbeatCollector:
    """A minimal orchestrator (grpcio, from orchestrator.proto): welcomes the agent and keeps the
    last heartbeat it sends."""

    def __init__(self):
        from fpga.orchestrator.v1 import orchestrator_pb2 as opb
        from fpga.orchestrator.v1 import orchestrator_pb2_grpc as orpc
        import concurrent.futures
        self.last = None
        collector = self

        class Servicer(orpc.OrchestratorServicer):
            def Connect(self, request_iterator, context):
                for message in request_iterator:
                    if message.HasField("hello"):
                        yield opb.OrchestratorMessage(welcome=opb.Welcome(epoch=1))
                    elif message.HasField("heartbeat"):
                        collector.last = message.heartbeat

        self.port = free_port()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        orpc.add_OrchestratorServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def config(self):
        return f"orchestrator:\n  address: 127.0.0.1:{self.port}\n  heartbeat_seconds: 1\n"


def test_the_link_reports_growths_and_the_boot(rig):
    """The orchestrator link's heartbeat carries the same growth figures as /metrics, and the
    boot the agent started on (its restore report)."""
    collector = HeartbeatCollector()
    try:
        rig.start(rig.flags(), config_text=GROW_CONFIG + collector.config())
        rig.kubelet.register()
        _, slices = rig.api.wait_settled(
            rig.driver, NODE, what="the potential VFs published",
            predicate=lambda generation, slices: len(potential_devices(rig, slices, "0000:3b:00.3")) == 8)
        claim = Claim("default", "grow-link")
        device = potential_devices(rig, slices, "0000:3b:00.3")[5]["name"]
        rig.api.put_claim(make_claim("default", claim.name, claim.uid, [("vf", device)]))
        assert prepared(rig.kubelet.prepare([claim]), claim)[0][0] == device
        beat = wait_for(lambda: collector.last if collector.last and collector.last.dra_growth.grown == 1 else None,
                        30, "a heartbeat with the growth")
        assert beat.HasField("layout_restore") and beat.layout_restore.boot_id and not beat.layout_restore.rebooted
        assert beat.dra_growth.failed == 0 and beat.dra_growth.seconds >= 0
    finally:
        collector.server.stop(0)


def test_a_refused_growth_fails_the_prepare_and_withdraws_the_offer(rig):
    """A PF whose bitstream has no mailbox cannot change its VF count: the Prepare fails with the
    kernel's reason, the PF keeps its VFs, and the pool stops offering its potential VFs."""
    cards = """  cards:
  - {bus: "3b", numa_node: 0, total_vfs: [8], enabled_vfs: [2], mailbox: false}
"""
    config = cards + GROW_CONFIG.replace('grow_pfs: ["0000:3b:00.3"]', 'grow_pfs: ["0000:3b:00.0"]')
    rig.start(rig.flags(), config_text=config)
    rig.kubelet.register()
    pf = "0000:3b:00.0"
    _, slices = rig.api.wait_settled(
        rig.driver, NODE, what="the potential VFs published",
        predicate=lambda generation, slices: len(potential_devices(rig, slices, pf)) == 6)
    claim = Claim("default", "grow-refused")
    rig.api.put_claim(make_claim("default", claim.name, claim.uid, [("vf", potential_devices(rig, slices, pf)[2]["name"])]))
    reply = rig.kubelet.prepare([claim])
    assert "could not grow" in reply[claim.uid].error and "mailbox" in reply[claim.uid].error, reply[claim.uid].error
    pfs = {p.bdf: p for card in rig.inventory().cards for p in card.pfs}
    assert pfs[pf].num_vfs == 2 and not rig.inventory().allocations
    rig.api.wait_settled(rig.driver, NODE, what="the offer withdrawn",
                         predicate=lambda generation, slices: not potential_devices(rig, slices, pf))
    rig.assert_api_clean()
