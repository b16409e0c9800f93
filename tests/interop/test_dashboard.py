"""The HTTP listener: the dashboard in a real browser (headless Chromium driven by Selenium), the
JSON endpoints against the gRPC API, /metrics parsed by prometheus_client and linted by promtool,
the alert rules under promtool, and the embedded copy of the page.

The browser test writes docs/screenshots/*.png (the README shows one). Without Chromium the
browser tests are skipped with a message, except under CI (CI set), where they fail.
"""
import base64
import http.client
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import json_format

from conftest import BIN, ROOT, free_port, start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc

PAGE = ROOT / "web" / "dashboard.html"
SHOTS = ROOT / "docs" / "screenshots"
RULES = ROOT / "deploy" / "prometheus" / "fpga-agent-rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "fpga-agent-rules.test.yaml"
GRAFANA = ROOT / "deploy" / "grafana" / "fpga-agent-dashboard.json"
METRICS_SOURCE = ROOT / "Sources" / "FPGAAgentDoors" / "Metrics.swift"
IN_CI = bool(os.environ.get("CI"))

# The HTTP status of each gRPC code on the JSON endpoints (docs/operations.md, "Dashboard and metrics").
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "NOT_FOUND": 404, "ABORTED": 409, "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 412,
               "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}


def _agent_serves_http():
    if not (BIN / "fpga-agent").exists():
        return False
    out = subprocess.run([str(BIN / "fpga-agent"), "help", "serve"], capture_output=True, text=True)
    return "--http-listen" in out.stdout


needs_agent = pytest.mark.skipif(not _agent_serves_http(),
                                 reason=f"{BIN / 'fpga-agent'} is not built, or predates --http-listen (swift build)")


def need_tool(name, package):
    """A command the test needs: skipped with a message when missing, failed under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is missing (Debian package {package}; scripts/install-test-deps installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def need_module(name, package):
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"Python module {name} is missing (PyPI {package}; scripts/install-test-deps installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


# ------------------------------------------------------------------------------------------------
# An agent with its HTTP listener, and a small HTTP client


class Http:
    def __init__(self, base, authorization=None):
        self.base = base
        self.authorization = authorization

    def request(self, method, path, body=None, headers=None, timeout=30):
        data = None
        all_headers = dict(headers or {})
        if self.authorization:
            all_headers.setdefault("Authorization", self.authorization)
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()

    def get(self, path):
        return self.request("GET", path)

    def json(self, path):
        status, _, text = self.get(path)
        assert status == 200, f"GET {path}: {status} {text}"
        return json.loads(text)

    def rpc(self, method, body):
        status, _, text = self.request("POST", f"/api/rpc/{method}", body)
        return status, json.loads(text) if text else {}


def start_web_agent(directory, config_text="", workloads=False, http_port=None, extra=(), env=None):
    """An agent serving HTTP on a port of its own; workloads=True keeps the simulated guests' work
    generator on (conftest turns it off in the file it writes; a later --config wins)."""
    port = http_port or free_port()
    extra = ["--http-listen", f"127.0.0.1:{port}", *extra]
    if workloads:
        path = os.path.join(directory, "web-agent.yaml")
        with open(path, "w") as f:
            f.write(config_text + ("" if "auth:" in config_text else "auth:\n  plaintext_role: admin\n"))
        extra += ["--config", path]
    agent = start_agent(directory, extra=extra, config_text=config_text, env=env)
    agent.http_port = port
    agent.http = Http(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 15
    while True:
        try:
            if agent.http.get("/healthz")[0] == 200:
                return agent
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(agent)
            raise RuntimeError("the agent's HTTP listener did not answer /healthz in 15 s")
        time.sleep(0.1)


def stop(agent):
    if agent.process.poll() is None:
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=30)


def stub(agent):
    return rpc.NodeAgentStub(grpc.insecure_channel(agent.tcp))


@pytest.fixture(scope="module")
def web():
    """One admin agent (no workload generator) for the JSON and metrics tests."""
    with tempfile.TemporaryDirectory(prefix="fpga-web-") as directory:
        agent = start_web_agent(directory)
        yield agent
        stop(agent)


@pytest.fixture
def viewer_agent():
    with tempfile.TemporaryDirectory(prefix="fpga-web-viewer-") as directory:
        agent = start_web_agent(directory, config_text="auth:\n  plaintext_role: viewer\n")
        yield agent
        stop(agent)


def key(prefix="t"):
    return f"{prefix}-{time.monotonic_ns()}"


# ------------------------------------------------------------------------------------------------
# The page and its embedded copy (no agent needed)


def test_embedded_page_is_in_sync():
    """Sources/FPGAWebDashboard/DashboardPage.swift is scripts/embed-web's output for web/dashboard.html."""
    result = subprocess.run([str(ROOT / "scripts" / "embed-web"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + "\n(run scripts/embed-web)"


def test_page_is_self_contained():
    """No asset from outside the agent: no external script, style, font, image or connection."""
    html = PAGE.read_text()
    assert '"""#' not in html
    assert not re.search(r"<(script|img|iframe|link)[^>]*\s(src|href)\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//", html, re.I)
    assert not re.search(r"@import", html)
    assert not re.search(r"<script[^>]*\ssrc=", html, re.I)
    assert not re.search(r"(fetch|EventSource|WebSocket)\(\s*[\"'`](https?|wss?):", html)
    # Every call is relative to the agent's own origin.
    for path in re.findall(r"[\"'](/api/[a-z/]+)", html):
        assert path in ("/api/rpc/", "/api/state", "/api/events", "/api/whoami"), path


# ------------------------------------------------------------------------------------------------
# Health, state, events


@needs_agent
def test_healthz_and_page(web):
    status, headers, body = web.http.get("/healthz")
    assert (status, body.strip()) == (200, "ok")
    status, headers, body = web.http.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert body == PAGE.read_text(), "the agent serves another page than web/dashboard.html: rebuild (swift build)"


@needs_agent
def test_state_is_the_node_api_in_proto3_json(web):
    node = stub(web)
    state = web.http.json("/api/state")
    assert set(state) == {"revision", "status", "inventory", "contexts", "operations"}
    status = json_format.ParseDict(state["status"], pb.NodeStatus())
    inventory = json_format.ParseDict(state["inventory"], pb.Inventory())
    json_format.ParseDict(state["contexts"], pb.ListContextsResponse())
    assert int(state["revision"]) == inventory.revision
    assert status.health == pb.NODE_HEALTH_SERVING
    assert [c.id for c in inventory.cards] == ["card-0000:3b", "card-0000:d8"]
    now = node.GetInventory(pb.GetInventoryRequest())
    assert inventory.revision <= now.revision and [c.id for c in inventory.cards] == [c.id for c in now.cards]
    # proto3 JSON: lowerCamelCase, enums by name, 64-bit integers as strings, defaults left out.
    assert isinstance(state["status"]["revision"], str) and state["status"]["health"] == "NODE_HEALTH_SERVING"
    vf = state["inventory"]["cards"][0]["pfs"][0]["vfs"][0]
    assert "pfBdf" in vf and "index" not in vf and vf["state"] == "VF_STATE_FREE"
    # Operations: newest first, at most 50.
    for i in range(3):
        node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:d8:00.1", vf_count=4 + i, dry_run=True))
    operations = web.http.json("/api/state")["operations"]
    assert 3 <= len(operations) <= 50
    created = [op["createdAt"] for op in operations]
    assert created == sorted(created, reverse=True)
    assert operations[0]["state"] == "OPERATION_STATE_PLANNED" and operations[0]["target"] == "0000:d8:00.1"


class EventStream:
    """Reads server-sent events from /api/events."""

    def __init__(self, port, path="/api/events"):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        self.connection.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type").startswith("text/event-stream")

    def next(self):
        """The next event as (name, data), comments as ("comment", text)."""
        name, data = None, []
        while True:
            line = self.response.fp.readline().decode()
            if line == "":
                raise EOFError("the event stream ended")
            line = line.rstrip("\n")
            if line == "":
                if name or data:
                    return name or "message", "\n".join(data)
                continue
            if line.startswith(":"):
                return "comment", line[1:].strip()
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)

    def until(self, predicate, limit=200):
        for _ in range(limit):
            name, data = self.next()
            if predicate(name, data):
                return name, data
        raise AssertionError("no such event")

    def close(self):
        self.connection.close()


@needs_agent
def test_events_follow_the_inventory_and_operations(web):
    node = stub(web)
    events = EventStream(web.http_port)
    try:
        assert events.next()[0] == "comment"  # connected
        before = node.GetInventory(pb.GetInventoryRequest()).revision
        reply = node.AllocateVF(pb.AllocateVFRequest(owner="sse", meta=pb.RequestMeta(idempotency_key=key("sse"))))
        _, data = events.until(lambda n, d: n == "revision" and int(json.loads(d)["revision"]) > before)
        assert int(json.loads(data)["revision"]) <= reply.revision
        node.ReleaseVF(pb.ReleaseVFRequest(allocation_id=reply.allocation.id))
        op = node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:d8:00.1", vf_count=6,
                                                    meta=pb.RequestMeta(idempotency_key=key("sse-op"))))
        _, data = events.until(lambda n, d: n == "operation" and json.loads(d)["id"] == op.id
                               and json.loads(d)["state"] == "OPERATION_STATE_SUCCEEDED")
        done = json_format.Parse(data, pb.Operation())
        assert done.steps and all(s.state == pb.OPERATION_STATE_SUCCEEDED for s in done.steps)
    finally:
        events.close()


# ------------------------------------------------------------------------------------------------
# The JSON endpoints against gRPC


def grpc_error(call, request):
    with pytest.raises(grpc.RpcError) as refused:
        call(request, timeout=30)
    return refused.value.code().name, refused.value.details()


BAD_REQUESTS = [
    ("AllocateVF", {"owner": ""}),
    ("AllocateVF", {"owner": "x", "constraints": {"pfBdf": "0000:3B:00.0"}}),
    ("AllocateVF", {"owner": "x", "vm": ".hidden"}),
    ("AllocateVF", {"owner": "x", "constraints": {"cardId": "card-0000:77"}}),
    ("ReleaseVF", {"allocationId": "alloc-000000000000"}),
    ("ReleaseVF", {"allocationId": "nonsense"}),
    ("AttachVF", {"allocationId": "alloc-000000000000", "vm": "vm-1"}),
    ("DetachVF", {"allocationId": "alloc-000000000000"}),
    ("Reconfigure", {"pfBdf": "0000:3b:00.0", "vfCount": 1000, "dryRun": True}),
    ("Reconfigure", {"pfBdf": "0000:99:00.0", "vfCount": 4, "dryRun": True}),
    ("Reconfigure", {"pfBdf": "3b:00.0", "vfCount": 4}),
    ("GetOperation", {"id": "op-000000000000"}),
    ("DrainDevice", {"device": "card-0000:77"}),
    ("UndrainDevice", {"device": "0000:3b:00.9"}),
    ("RegisterContext", {"context": {"acceleratorId": "card-0000:3b/acc9", "guest": "g", "function": "f"}}),
    ("SwitchContext", {"contextId": "ctx-missing", "timing": "SWITCH_TIMING_NOW"}),
    ("MoveContext", {"contextId": "ctx-missing", "acceleratorId": "card-0000:d8/acc0"}),
    ("DeleteContext", {"contextId": "ctx-missing"}),
    ("SetSharingPolicy", {"policy": {"acceleratorId": "card-0000:3b/acc0", "timeSlice": "100s", "overcommitLimit": 4}}),
    ("SetSharingPolicy", {"policy": {"acceleratorId": "card-0000:3b/acc0", "timeSlice": "0.01s", "overcommitLimit": 0}}),
]


@needs_agent
@pytest.mark.parametrize("method,body", BAD_REQUESTS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_the_grpc_error(web, method, body):
    """The same request refused over gRPC and over JSON: the same code and the same message."""
    node = stub(web)
    request_type = getattr(pb, pb.DESCRIPTOR.services_by_name["NodeAgent"].methods_by_name[method].input_type.name)
    code, details = grpc_error(getattr(node, method), json_format.ParseDict(body, request_type()))
    status, reply = web.http.rpc(method, body)
    assert reply == {"code": code, "message": details}
    assert status == HTTP_STATUS[code], (status, code)


@needs_agent
def test_state_errors_match_grpc(web):
    """Wrong state and reused keys: FAILED_PRECONDITION and INVALID_ARGUMENT as over gRPC."""
    node = stub(web)
    status, reply = web.http.rpc("AllocateVF", {"owner": "json", "vm": "vm-2", "meta": {"idempotencyKey": "reuse-1"}})
    assert status == 200 and reply["allocation"]["owner"] == "json"
    allocation = reply["allocation"]["id"]
    # The same key for another request.
    other = {"owner": "someone-else", "meta": {"idempotencyKey": "reuse-1"}}
    code, details = grpc_error(node.AllocateVF, json_format.ParseDict(other, pb.AllocateVFRequest()))
    assert web.http.rpc("AllocateVF", other) == (HTTP_STATUS[code], {"code": code, "message": details})
    # A retry with the key replays.
    status, again = web.http.rpc("AllocateVF", {"owner": "json", "vm": "vm-2", "meta": {"idempotencyKey": "reuse-1"}})
    assert status == 200 and again["allocation"]["id"] == allocation and again["replayed"] is True
    # Released while attached.
    status, attached = web.http.rpc("AttachVF", {"allocationId": allocation, "vm": "vm-2"})
    assert status == 200 and attached["allocation"]["attached"] is True
    release = {"allocationId": allocation}
    code, details = grpc_error(node.ReleaseVF, json_format.ParseDict(release, pb.ReleaseVFRequest()))
    assert code == "FAILED_PRECONDITION"
    assert web.http.rpc("ReleaseVF", release) == (412, {"code": code, "message": details})
    assert web.http.rpc("DetachVF", {"allocationId": allocation})[0] == 200
    assert web.http.rpc("ReleaseVF", release)[0] == 200
    # Every mutating call from the page is in the audit trail.
    entries = node.GetAuditTrail(pb.GetAuditTrailRequest(limit=50)).entries
    http_entries = [(e.rpc, e.status) for e in entries if e.transport == "http"]
    assert ("AttachVF", "ok") in http_entries and ("ReleaseVF", "ok") in http_entries
    assert any(rpc_name == "ReleaseVF" and status != "ok" for rpc_name, status in http_entries)


@needs_agent
def test_malformed_requests(web):
    status, reply = web.http.rpc("AllocateVF", '{"owner": ')
    assert status == 400 and reply["code"] == "INVALID_ARGUMENT" and "JSON" in reply["message"]
    status, reply = web.http.rpc("AllocateVF", {"owner": "x", "bogus": 1})
    assert status == 400 and reply["code"] == "INVALID_ARGUMENT"
    status, reply = web.http.rpc("Reconfigure", {"pfBdf": "0000:3b:00.0", "vfCount": "many"})
    assert status == 400 and reply["code"] == "INVALID_ARGUMENT"
    status, reply = web.http.rpc("FormatDisk", {})
    assert status == 404 and reply["code"] == "NOT_FOUND" and "AllocateVF" in reply["message"]
    # A streaming RPC has no JSON endpoint.
    assert web.http.rpc("WatchInventory", {})[0] == 404


@needs_agent
def test_every_unary_method_has_a_json_endpoint(web):
    """The bridge serves every unary RPC of the service (a new one is not forgotten), no stream."""
    service = pb.DESCRIPTOR.services_by_name["NodeAgent"]
    unary = sorted(m.name for m in service.methods if not m.client_streaming and not m.server_streaming)
    status, reply = web.http.rpc("NoSuchMethod", {})
    assert status == 404 and reply["code"] == "NOT_FOUND"
    assert reply["message"].split("the methods are ", 1)[1].split(", ") == unary
    assert "ClearDeviceHealth" in unary


@needs_agent
def test_a_viewer_cannot_steer(viewer_agent):
    http_api = viewer_agent.http
    node = stub(viewer_agent)  # plaintext TCP on loopback: also a viewer
    assert http_api.json("/api/whoami")["role"] == "viewer"
    revision = int(http_api.json("/api/state")["revision"])
    steering = [
        ("AllocateVF", {"owner": "v", "meta": {"idempotencyKey": "v-1"}}),
        ("ReleaseVF", {"allocationId": "alloc-000000000000"}),
        ("Reconfigure", {"pfBdf": "0000:3b:00.0", "vfCount": 4}),
        ("DrainDevice", {"device": "card-0000:3b"}),
        ("SetSharingPolicy", {"policy": {"acceleratorId": "card-0000:3b/acc0", "timeSlice": "0.005s", "overcommitLimit": 2}}),
        ("RegisterContext", {"context": {"acceleratorId": "card-0000:3b/acc1", "guest": "v", "function": "f"}}),
        ("Rescan", {}),
        ("GetAuditTrail", {}),
        ("ClearDeviceHealth", {"device": "0000:3b:00.0", "reason": "a viewer tries"}),
    ]
    for method, body in steering:
        status, reply = http_api.rpc(method, body)
        assert status == 403 and reply["code"] == "PERMISSION_DENIED", (method, status, reply)
        request_type = getattr(pb, pb.DESCRIPTOR.services_by_name["NodeAgent"].methods_by_name[method].input_type.name)
        code, _ = grpc_error(getattr(node, method), json_format.ParseDict(body, request_type()))
        assert code == "PERMISSION_DENIED", method
    assert int(http_api.json("/api/state")["revision"]) == revision
    assert node.GetInventory(pb.GetInventoryRequest()).revision == revision
    # Reading is allowed.
    assert http_api.rpc("GetInventory", {})[0] == 200
    assert http_api.rpc("ListContexts", {})[0] == 200
    assert http_api.get("/metrics")[0] == 200
    # The refusals are audited (transport http).
    audit = [json.loads(line) for line in open(os.path.join(viewer_agent.directory, "state", "audit.log"))]
    refused = [e for e in audit if e.get("transport") == "http" and e.get("rpc") == "AllocateVF"]
    assert refused and refused[-1]["status"] != "ok"


@needs_agent
def test_tokens_for_browsers():
    """HTTP Basic (user = the token's name, password = the token) or Bearer, from auth.token_file."""
    with tempfile.TemporaryDirectory(prefix="fpga-web-tokens-") as directory:
        tokens = os.path.join(directory, "tokens.csv")
        with open(tokens, "w") as f:
            f.write("# token,name\nA1b2C3d4E5f6G7h8I9j0,alice\nZ9y8X7w6V5u4T3s2R1q0,bob\n")
        os.chmod(tokens, 0o600)
        config = ("auth:\n  plaintext_role: none\n  token_file: " + tokens +
                  "\n  roles:\n    \"token:alice\": operator\n    \"token:bob\": viewer\n")
        agent = start_web_agent(directory, config_text=config)
        try:
            anonymous = agent.http
            assert anonymous.json("/api/whoami")["role"] == "none"
            assert anonymous.get("/api/state")[0] == 403
            basic = "Basic " + base64.b64encode(b"alice:A1b2C3d4E5f6G7h8I9j0").decode()
            alice = Http(anonymous.base, basic)
            assert alice.json("/api/whoami") == {"identity": "token:alice", "role": "operator"}
            status, reply = alice.rpc("AllocateVF", {"owner": "alice"})
            assert status == 200, reply
            assert alice.rpc("Reconfigure", {"pfBdf": "0000:3b:00.0", "vfCount": 4})[0] == 403
            bob = Http(anonymous.base, "Bearer Z9y8X7w6V5u4T3s2R1q0")
            assert bob.json("/api/whoami")["role"] == "viewer"
            assert bob.get("/metrics")[0] == 200
            assert bob.rpc("ReleaseVF", {"allocationId": reply["allocation"]["id"]})[0] == 403
            wrong = Http(anonymous.base, "Basic " + base64.b64encode(b"alice:wrong-token-0000000").decode())
            status, headers, _ = wrong.get("/api/state")
            assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Basic")
            assert wrong.rpc("AllocateVF", {"owner": "x"})[1]["code"] == "UNAUTHENTICATED"
        finally:
            stop(agent)


# ------------------------------------------------------------------------------------------------
# /metrics


def scrape(agent):
    status, headers, text = agent.http.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return text


def samples(text):
    parser = need_module("prometheus_client.parser", "prometheus_client")
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(found, name, **labels):
    matches = [v for l, v in found.get(name, []) if all(l.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


def vf_counts_from_inventory(inventory):
    """fpga_vfs's states from the inventory: attached includes detaching, unhealthy is unallocatable."""
    names = {pb.VF_STATE_FREE: "free", pb.VF_STATE_ALLOCATED: "allocated", pb.VF_STATE_ATTACHED: "attached",
             pb.VF_STATE_DETACHING: "attached", pb.VF_STATE_UNHEALTHY: "unallocatable"}
    counts = {}
    for card in inventory.cards:
        for pf in card.pfs:
            row = {"free": 0, "allocated": 0, "attached": 0, "unallocatable": 0}
            for vf in pf.vfs:
                row[names[vf.state]] += 1
            counts[(card.id, pf.bdf)] = row
    return counts


def vf_counts_from_metrics(found):
    counts = {}
    for labels, v in found["fpga_vfs"]:
        counts.setdefault((labels["card"], labels["pf"]), {})[labels["state"]] = int(v)
    return counts


@needs_agent
def test_metrics_parse_and_lint(web):
    promtool = need_tool("promtool", "prometheus")
    text = scrape(web)
    found = samples(text)
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for name in ["fpga_agent_build_info", "fpga_agent_inventory_revision", "fpga_node_health", "fpga_node_problems",
                 "fpga_vfs", "fpga_pf_sriov_vfs", "fpga_pf_sriov_total_vfs", "fpga_pf_draining", "fpga_allocations",
                 "fpga_accelerator_utilization_ratio", "fpga_accelerator_switch_overhead_ratio",
                 "fpga_accelerator_guests", "fpga_agent_watchers", "grpc_server_handled_total",
                 "grpc_server_handling_seconds_bucket"]:
        assert name in found, name
    # No orchestrator configured: no link series at all (nothing to be down).
    assert "fpga_orchestrator_link_up" not in found and "fpga_orchestrator_link_connections_total" not in found
    assert value(found, "fpga_node_health", state="serving") == 1
    assert value(found, "fpga_node_health", state="not_serving") == 0
    node = stub(web)
    status = node.GetNodeStatus(pb.GetNodeStatusRequest())
    assert value(found, "fpga_agent_build_info", version=status.agent_version) == 1
    assert len(found["fpga_accelerator_utilization_ratio"]) == 4
    # Every name the catalog makes follows the conventions promtool does not check.
    for name in found:
        assert re.fullmatch(r"(fpga|grpc)_[a-z0-9_]+", name), name


@needs_agent
def test_vf_counts_equal_the_inventory_and_follow_changes(web):
    node = stub(web)

    def check():
        inventory = node.GetInventory(pb.GetInventoryRequest())
        found = samples(scrape(web))
        assert vf_counts_from_metrics(found) == vf_counts_from_inventory(inventory)
        for card in inventory.cards:
            for pf in card.pfs:
                assert value(found, "fpga_pf_sriov_vfs", card=card.id, pf=pf.bdf) == pf.num_vfs
                assert value(found, "fpga_pf_sriov_total_vfs", card=card.id, pf=pf.bdf) == pf.total_vfs
                assert value(found, "fpga_pf_draining", card=card.id, pf=pf.bdf) == int(pf.draining or card.draining)
        status = node.GetNodeStatus(pb.GetNodeStatusRequest())
        total = sum(v for _, v in found["fpga_vfs"])
        assert total == status.vfs_enabled
        assert sum(v for l, v in found["fpga_vfs"] if l["state"] == "free") == status.vfs_free
        attached = sum(1 for a in inventory.allocations if a.attached and not a.detaching)
        assert value(found, "fpga_allocations", state="attached") == attached
        assert value(found, "fpga_allocations", state="unattached") == sum(1 for a in inventory.allocations
                                                                           if not a.attached and not a.detaching)
        assert value(found, "fpga_agent_inventory_revision") == inventory.revision
        return found

    before = check()
    reply = node.AllocateVF(pb.AllocateVFRequest(owner="metrics", constraints=pb.AllocationConstraints(pf_bdf="0000:d8:00.0"),
                                                 meta=pb.RequestMeta(idempotency_key=key("m"))))
    found = check()
    assert value(found, "fpga_vfs", pf="0000:d8:00.0", state="allocated") == \
        value(before, "fpga_vfs", pf="0000:d8:00.0", state="allocated") + 1
    node.AttachVF(pb.AttachVFRequest(allocation_id=reply.allocation.id, vm="vm-1"))
    found = check()
    assert value(found, "fpga_vfs", pf="0000:d8:00.0", state="attached") == \
        value(before, "fpga_vfs", pf="0000:d8:00.0", state="attached") + 1
    node.DetachVF(pb.DetachVFRequest(allocation_id=reply.allocation.id))
    node.ReleaseVF(pb.ReleaseVFRequest(allocation_id=reply.allocation.id))
    after = check()
    assert vf_counts_from_metrics(after) == vf_counts_from_metrics(before)
    # A drain shows, and so does a reconfiguration (the PF's series follow its new VF count).
    node.DrainDevice(pb.DrainDeviceRequest(device="0000:d8:00.1"))
    assert value(check(), "fpga_pf_draining", pf="0000:d8:00.1") == 1
    node.UndrainDevice(pb.UndrainDeviceRequest(device="0000:d8:00.1"))
    operation = node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:d8:00.2", vf_count=3,
                                                       meta=pb.RequestMeta(idempotency_key=key("m-op"))))
    for update in node.WatchOperation(pb.WatchOperationRequest(id=operation.id), timeout=30):
        if update.state == pb.OPERATION_STATE_SUCCEEDED:
            break
    found = check()
    assert value(found, "fpga_pf_sriov_vfs", pf="0000:d8:00.2") == 3
    assert value(found, "fpga_agent_operations_total", kind="reconfigure", result="succeeded") >= 1
    # RPCs are counted by method and code, the JSON endpoints' too.
    with pytest.raises(grpc.RpcError):
        node.ReleaseVF(pb.ReleaseVFRequest(allocation_id="alloc-000000000000"))
    web.http.rpc("ReleaseVF", {"allocationId": "alloc-000000000000"})
    found = samples(scrape(web))
    assert value(found, "grpc_server_handled_total", grpc_service="fpga.agent.v1.NodeAgent", grpc_method="ReleaseVF",
                 grpc_code="NOT_FOUND") >= 1
    assert value(found, "grpc_server_handled_total", grpc_method="AllocateVF", grpc_code="OK",
                 grpc_service="fpga.agent.v1.NodeAgent") >= 1
    assert any(l["grpc_method"] == "ReleaseVF" and l["grpc_code"] == "NOT_FOUND" and l["grpc_service"] != "fpga.agent.v1.NodeAgent"
               for l, _ in found["grpc_server_handled_total"])


@needs_agent
def test_guest_series_go_with_the_guest(web):
    node = stub(web)
    context = node.RegisterContext(pb.RegisterContextRequest(
        context=pb.Context(accelerator_id="card-0000:d8/acc1", guest="metrics-guest", function="sha3"),
        meta=pb.RequestMeta(idempotency_key=key("ctx")))).context
    found = samples(scrape(web))
    assert value(found, "fpga_accelerator_guests", accelerator="card-0000:d8/acc1") == 1
    assert [l for l, _ in found["fpga_accelerator_guest_share_ratio"] if l["guest"] == "metrics-guest"]
    node.DeleteContext(pb.DeleteContextRequest(context_id=context.id))
    found = samples(scrape(web))
    assert value(found, "fpga_accelerator_guests", accelerator="card-0000:d8/acc1") == 0
    assert not [l for l, _ in found.get("fpga_accelerator_guest_share_ratio", []) if l["guest"] == "metrics-guest"]


# ------------------------------------------------------------------------------------------------
# Alert rules and the Grafana dashboard


def catalog():
    """The metric names the agent makes (Sources/FPGAAgentDoors/Metrics.swift, one catalog), with the
    series names of histograms."""
    source = METRICS_SOURCE.read_text()
    names = set(re.findall(r'name:\s*"((?:fpga|grpc)_[a-z0-9_]+)"', source))
    histograms = set(re.findall(r'[Hh]istogram\w*\(\s*name:\s*"([a-z0-9_]+)"', source))
    assert histograms, "no histogram found in Metrics.swift: update catalog()"
    for h in histograms:
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    assert "fpga_vfs" in names
    return names


def referenced_metrics(text):
    return set(re.findall(r"\b((?:fpga|grpc_server)_[a-z0-9_]+)\b", text))


def test_alert_rules_pass_promtool():
    promtool = need_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The rules' unit tests: each alert fires on the series it is about, and not on a healthy node.
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = yaml.safe_load(RULE_TESTS.read_text())
    fired = {a["alertname"] for t in tested["tests"] for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert alerts <= fired, f"alerts without a test that fires them: {alerts - fired}"


def test_rules_and_grafana_use_only_exported_metrics():
    names = catalog()
    for path in (RULES, GRAFANA):
        unknown = referenced_metrics(path.read_text()) - names
        assert not unknown, f"{path.name} uses metrics the agent does not export: {sorted(unknown)}"
    board = json.loads(GRAFANA.read_text())
    assert board["title"] and board["uid"] and board["panels"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs and all(referenced_metrics(e) for e in exprs)
    # Every expression parses: promtool checks them as recording rules (Grafana's variables replaced).
    promtool = shutil.which("promtool")
    if promtool:
        rules = {"groups": [{"name": "grafana", "rules": [
            {"record": f"grafana:panel_{i}", "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*")
             .replace("$accelerator", ".*")} for i, e in enumerate(exprs)]}]}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(rules, f)
        try:
            result = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
            assert result.returncode == 0, result.stdout + result.stderr
        finally:
            os.unlink(f.name)
    text = GRAFANA.read_text()
    for needed in ["fpga_vfs", "fpga_allocations", "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
                   "fpga_accelerator_utilization_ratio", "fpga_accelerator_switch_overhead_ratio",
                   "fpga_accelerator_guests", "fpga_orchestrator_link_up"]:
        assert needed in text, needed


def test_docs_list_every_metric():
    docs = (ROOT / "docs" / "operations.md").read_text()
    missing = [n for n in catalog() if not n.endswith(("_bucket", "_sum", "_count")) and f"`{n}" not in docs]
    assert not missing, f"docs/operations.md does not list: {missing}"


# ------------------------------------------------------------------------------------------------
# The dashboard in a real browser


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "chromium is missing (Debian packages chromium, chromium-driver; scripts/install-test-deps)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    driver_path = need_tool("chromedriver", "chromium-driver")
    need_module("selenium", "selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1000",
                     "--no-first-run", "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1"]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


class Page:
    """The dashboard as a user sees it: every query goes through the DOM."""

    def __init__(self, driver, base):
        self.d = driver
        self.base = base

    def open(self):
        self.d.get(self.base + "/")
        self.d.execute_script("window.__sameDocument = 42")
        self.wait(lambda: self.count(".card[data-card]") > 0, "the cards")

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def count(self, selector):
        return self.js("return document.querySelectorAll(arguments[0]).length", selector)

    def attr(self, selector, name):
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null",
                       selector, name)

    def text(self, selector):
        return self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null", selector)

    def wait(self, condition, what, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_no_error()
            if condition():
                return
            time.sleep(0.1)
        notice = self.js("const n = document.getElementById('notice');"
                         "return n ? [n.hidden, n.textContent, JSON.stringify(n.dataset)] : null")
        raise AssertionError(f"timed out waiting for {what} (the notice: {notice})")

    def check_no_error(self):
        if not self.js("return document.getElementById('error-banner').hidden"):
            raise AssertionError("the page shows an error: " + self.text("#error-banner"))

    def element(self, selector):
        from selenium.webdriver.common.by import By
        return self.d.find_element(By.CSS_SELECTOR, selector)

    def click(self, selector):
        from selenium.common.exceptions import StaleElementReferenceException
        for _ in range(20):
            try:
                element = self.element(selector)
                self.js("arguments[0].scrollIntoView({block: 'center'})", element)
                assert element.is_enabled(), f"{selector} is disabled"
                element.click()
                return
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"{selector} kept being replaced")

    def type(self, selector, text):
        element = self.element(selector)
        element.clear()
        element.send_keys(text)

    def select(self, selector, value):
        from selenium.webdriver.support.ui import Select
        from selenium.common.exceptions import StaleElementReferenceException
        for _ in range(20):
            try:
                Select(self.element(selector)).select_by_value(value)
                return
            except StaleElementReferenceException:
                time.sleep(0.05)

    def clear_notice(self):
        self.js("const n = document.getElementById('notice'); n.hidden = true;"
                "for (const k of Object.keys(n.dataset)) delete n.dataset[k];")

    def notice(self, attribute):
        """The value of data-ATTRIBUTE on the notice shown after an action (clear_notice before it)."""
        name = "data-" + attribute
        self.wait(lambda: not self.js("return document.getElementById('notice').hidden")
                  and self.attr("#notice", name) not in (None, ""), f"the notice's {name}")
        return self.attr("#notice", name)

    def screenshot(self, name, element=None):
        """The whole page, or one element of it, into docs/screenshots/NAME."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        if element:
            self.js("arguments[0].scrollIntoView({block: 'center'})", self.element(element))
            time.sleep(0.2)
            self.element(element).screenshot(str(path))
        else:
            size = self.d.get_window_size()
            height = self.js("return document.documentElement.scrollHeight")
            self.js("window.scrollTo(0, 0)")
            self.d.set_window_size(size["width"], min(max(height + 20, 900), 4000))
            time.sleep(0.3)
            self.d.save_screenshot(str(path))
            self.d.set_window_size(size["width"], size["height"])
        return path


def fpgactl(agent, *args):
    result = subprocess.run([str(BIN / "fpgactl"), "--server", agent.unix, *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def run_browser_flow(driver, agent, base, restart=None):
    """What a person does with the page; `restart` is (stop, start) of the agent (same ports and state)."""
    page = Page(driver, base)
    node = stub(agent)
    page.open()
    # Both cards, every PF and every enabled VF.
    assert page.count('.card[data-card="card-0000:3b"]') == 1 and page.count('.card[data-card="card-0000:d8"]') == 1
    status = node.GetNodeStatus(pb.GetNodeStatusRequest())
    page.wait(lambda: page.count(".vf[data-vf]") == status.vfs_enabled, "every VF")
    assert page.count(".pf[data-pf]") == status.pfs
    assert page.text("#whoami-role") == "admin" and page.attr("#health", "data-health") == "NODE_HEALTH_SERVING"
    page.wait(lambda: page.attr("#conn", "data-conn") == "live", "the event stream")
    title = page.attr('.vf[data-vf="0000:3b:00.4"]', "title")
    assert "NUMA node: 0" in title and "IOMMU group" in title

    # Allocate a VF for vm-1.
    page.type("#allocate-owner", "web-test")
    page.type("#allocate-vm", "vm-1")
    page.clear_notice()
    page.click("#allocate-submit")
    allocation = page.notice("allocation")
    vf = page.attr("#notice", "data-vf")
    page.wait(lambda: page.attr(f'.vf[data-vf="{vf}"]', "data-state") == "allocated", "the VF allocated in the grid")
    page.wait(lambda: page.count(f'div.allocation[data-allocation="{allocation}"]') == 1, "the allocation's row")
    held = [a for a in node.GetInventory(pb.GetInventoryRequest()).allocations if a.id == allocation]
    assert held and held[0].owner == "web-test" and held[0].vm == "vm-1" and held[0].vf_bdf == vf
    pf = held[0].pf_bdf

    # Attach it to vm-1.
    page.select(f'div.allocation[data-allocation="{allocation}"] select[data-field="attach-vm"]', "vm-1")
    page.click(f'div.allocation[data-allocation="{allocation}"] button[data-action="attach"]')
    page.wait(lambda: page.attr(f'.vf[data-vf="{vf}"]', "data-state") == "attached", "the VF attached")
    page.wait(lambda: page.count(f'.vm[data-vm="vm-1"] .vm-device[data-allocation="{allocation}"]') == 1,
              "the device under vm-1")
    assert f"VM: vm-1 (attached)" in page.attr(f'.vf[data-vf="{vf}"]', "title")

    # Reconfigure its PF: the dry run's plan first, then the run, step by step.
    page.click(f'button[data-action="reconfigure"][data-pf="{pf}"]')
    assert page.js("return document.getElementById('reconfigure-pf').value") == pf
    assert not page.element("#reconfigure-dry-run").get_attribute("disabled")
    assert page.element("#reconfigure-run").get_attribute("disabled")  # no plan yet
    page.type("#reconfigure-count", "8")
    page.click("#reconfigure-dry-run")
    page.wait(lambda: page.count("#plan .plan-step") > 0, "the plan's steps")
    page.wait(lambda: page.count(f'#plan .plan-impact[data-allocation="{allocation}"]') == 1, "the plan's impact")
    impact = page.text(f'#plan .plan-impact[data-allocation="{allocation}"]')
    assert "vm-1" in impact and "pause" in impact, impact  # vm-1's VMM can pause VFIO devices
    page.screenshot("dashboard-reconfigure-plan.png", element="#reconfigure-panel")
    assert page.element("#reconfigure-run").is_enabled()
    page.clear_notice()
    page.click("#reconfigure-run")
    operation = page.notice("op")
    seen = set()

    def done():
        seen.add(page.attr(f'#operations .op[data-op="{operation}"]', "data-state"))
        return page.attr(f'#operations .op[data-op="{operation}"]', "data-state") == "OPERATION_STATE_SUCCEEDED"

    page.wait(done, "the reconfiguration to succeed", timeout=30)
    # The page says so too (its own follow-up of the operation, up to 0.7 s after the event):
    # waited for, so it cannot overwrite the next action's notice.
    page.wait(lambda: page.attr("#notice", "data-op") == operation and "succeeded" in (page.text("#notice") or ""),
              "the page's notice that the reconfiguration succeeded")
    steps = page.js("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.dataset.state)",
                    f'#operations .op[data-op="{operation}"] .op-step')
    assert steps and set(steps) == {"OPERATION_STATE_SUCCEEDED"}, steps
    page.wait(lambda: page.attr(f'.pf[data-pf="{pf}"]', "data-num-vfs") == "8"
              and page.count(f'.pf[data-pf="{pf}"] .vf') == 8, "the PF with 8 VFs")
    page.wait(lambda: page.attr(f'.vf[data-vf="{vf}"]', "data-state") == "attached", "the VF kept in vm-1")
    # How the device went through it: paused, by that operation (row and VM card).
    badge = f'div.allocation[data-allocation="{allocation}"] .relayout'
    page.wait(lambda: page.count(badge) == 1, "the allocation's re-layout badge")
    assert page.attr(badge, "data-how") == "paused" and operation in page.attr(badge, "title")
    assert page.count(f'.vm[data-vm="vm-1"] .vm-device[data-allocation="{allocation}"] .relayout[data-how="paused"]') == 1
    relaid = [a for a in node.GetInventory(pb.GetInventoryRequest()).allocations if a.id == allocation][0]
    assert relaid.last_relayout.how == "paused" and relaid.last_relayout.operation_id == operation

    # Register a context, switch to it now, then edit a sharing policy.
    page.select("#context-accelerator", "card-0000:3b/acc1")
    page.type("#context-guest", "web-guest")
    page.type("#context-params", "rounds=24")
    page.clear_notice()
    page.click("#context-submit")
    context = page.notice("context")
    page.wait(lambda: page.count(f'div.context[data-context="{context}"]') == 1, "the context's row")
    page.clear_notice()
    page.click(f'div.context[data-context="{context}"] button[data-action="switch"]')
    # The answer first (the notice hides itself after 12 s), then the accelerator's view, which
    # follows with the next figures.
    page.notice("context")
    assert "switched" in page.text("#notice")
    page.wait(lambda: page.attr('.accelerator[data-accelerator="card-0000:3b/acc1"]', "data-loaded-guest") == "web-guest",
              "web-guest loaded on acc1")
    page.wait(lambda: page.attr(f'div.context[data-context="{context}"]', "data-active") == "true", "the context active")
    page.click('button[data-action="edit-policy"][data-accelerator="card-0000:3b/acc0"]')
    assert page.js("return document.getElementById('policy-accelerator').value") == "card-0000:3b/acc0"
    page.type("#policy-weights", "tenant-a=3, tenant-b=1")
    page.type("#policy-slice-ms", "5")
    page.click("#policy-submit")
    page.wait(lambda: "tenant-a=3" in (page.text('.accelerator[data-accelerator="card-0000:3b/acc0"] .acc-policy') or ""),
              "the new weights")
    policy = [a for a in node.GetInventory(pb.GetInventoryRequest()).accelerators if a.id == "card-0000:3b/acc0"][0].policy
    assert dict(policy.weights) == {"tenant-a": 3, "tenant-b": 1} and policy.time_slice.ToMilliseconds() == 5

    # Another client's change appears without a reload.
    other = re.search(r"alloc-[0-9a-f]{12}", fpgactl(agent, "allocate", "--owner", "other")).group(0)
    page.wait(lambda: page.count(f'div.allocation[data-allocation="{other}"][data-owner="other"]') == 1,
              "fpgactl's allocation", timeout=10)
    page.wait(lambda: page.count(f'.vf[data-allocation="{other}"][data-state="allocated"]') == 1, "its VF in the grid")
    assert page.js("return window.__sameDocument") == 42

    # An error from the API is shown with its message.
    page.select("#reconfigure-pf", "0000:3b:00.1")
    page.type("#reconfigure-count", "999")
    page.click("#reconfigure-dry-run")
    deadline = time.monotonic() + 10
    while page.js("return document.getElementById('error-banner').hidden") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert page.attr("#error-banner", "data-code") == "INVALID_ARGUMENT"
    code, details = grpc_error(node.Reconfigure, pb.ReconfigureRequest(pf_bdf="0000:3b:00.1", vf_count=999, dry_run=True))
    assert page.text("#error-message") == details
    page.click("#error-close")
    page.type("#reconfigure-count", "8")

    # The page keeps working across a restart of the agent.
    if restart:
        restart[0]()
        page.wait(lambda: page.attr("#conn", "data-conn") != "live", "the page to notice the agent is gone")
        agent = restart[1]()
        page.wait(lambda: page.attr("#conn", "data-conn") == "live", "the events after the restart", timeout=20)
        again = re.search(r"alloc-[0-9a-f]{12}", fpgactl(agent, "allocate", "--owner", "after-restart")).group(0)
        page.wait(lambda: page.count(f'div.allocation[data-allocation="{again}"]') == 1, "a change after the restart",
                  timeout=10)
        # The simulated VMs start empty again: plug the VF back in, from the command line this time.
        fpgactl(agent, "attach", allocation, "vm-1")
        page.wait(lambda: page.attr(f'.vf[data-vf="{vf}"]', "data-state") == "attached", "the VF attached by fpgactl")
        assert page.js("return window.__sameDocument") == 42

    # Let the accelerator chart gather half a minute of history, then take the README's picture.
    page.wait(lambda: page.js(
        "return Number(document.querySelector('.accelerator[data-accelerator=\"card-0000:3b/acc0\"] svg.chart')"
        ".dataset.historySeconds) >= 25"), "the chart's history", timeout=40)
    page.js(f"document.querySelector('.vf[data-vf=\"{vf}\"]').click()")
    page.screenshot("dashboard.png")
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    assert not severe, severe
    return agent


@needs_agent
def test_dashboard_in_a_browser(browser):
    """Load the page, see both cards, allocate, attach, reconfigure (plan, then run), switch a
    context, see fpgactl's change live, survive an agent restart; write the screenshots."""
    with tempfile.TemporaryDirectory(prefix="fpga-web-browser-") as directory:
        state = {"agent": start_web_agent(directory, workloads=True)}

        port = state["agent"].http_port

        def start():
            state["agent"] = start_web_agent(directory, workloads=True, http_port=port)
            return state["agent"]

        try:
            run_browser_flow(browser, state["agent"], state["agent"].http.base,
                             restart=(lambda: stop(state["agent"]), start))
        finally:
            stop(state["agent"])


@needs_agent
def test_viewer_page_disables_steering(browser, viewer_agent):
    page = Page(browser, viewer_agent.http.base)
    page.open()
    page.wait(lambda: page.text("#whoami-role") == "viewer", "the role")
    page.wait(lambda: page.count('button[data-action="drain"]') > 0, "the PF buttons")
    enabled = page.js("return Array.from(document.querySelectorAll('[data-min-role]')).filter(e => !e.disabled)"
                      ".map(e => e.id || e.dataset.action)")
    assert enabled == [], enabled
    assert page.element("#allocate-submit").get_attribute("disabled")


@needs_agent
def test_clear_device_health_from_the_page(browser):
    """The linux platform on a sysfs tree: a PF first seen with uncorrectable errors already logged
    is degraded (aer-history); a new fatal error makes it and its VFs unhealthy; an admin clears it
    from the page with a reason (a missing one is refused with the node API's message): healthy
    again, and the audit trail has the call with its reason."""
    from test_device_plugin import _sysfs_tree

    pf, vf = "0000:3b:00.0", "0000:3b:00.4"
    with tempfile.TemporaryDirectory(prefix="fpga-web-health-") as directory:
        sys_root, dev_root, devices = _sysfs_tree(os.path.join(directory, "tree"))
        fatal = os.path.join(devices, pf, "aer_dev_fatal")
        with open(fatal, "w") as f:
            f.write("TOTAL_ERR_FATAL 2\n")
        agent = start_web_agent(directory, config_text="linux:\n  uevents: false\n",
                                extra=["--platform", "linux", "--sysfs-root", sys_root, "--dev-root", dev_root])
        try:
            node = stub(agent)
            page = Page(browser, agent.http.base)
            page.open()
            pf_row = f'.pf[data-pf="{pf}"]'
            # Errors from before the agent saw the card: degraded, like any degraded reason.
            page.wait(lambda: page.attr(pf_row, "data-health") == "degraded", "the PF degraded")
            assert "aer-history" in page.attr(f'{pf_row} .badge[data-health="degraded"]', "title")
            page.wait(lambda: page.count(f'.health-device[data-device="{pf}"] .health-reason[data-kind="aer-history"]') == 1,
                      "the reason in the health panel")
            assert page.count(f'{pf_row} button[data-action="clear-health"]') == 1
            # A new fatal error: the PF and, through it, its VFs are unhealthy.
            with open(fatal, "w") as f:
                f.write("DLP 1\nTOTAL_ERR_FATAL 3\n")
            node.Rescan(pb.RescanRequest(), timeout=30)
            page.wait(lambda: page.attr(pf_row, "data-health") == "unhealthy"
                      and page.attr(f'.vf[data-vf="{vf}"]', "data-health") == "unhealthy", "the PF and its VF unhealthy")
            # The VF's panel offers its PF's clear (the VF is unhealthy only through it).
            page.click(f'.vf[data-vf="{vf}"]')
            page.wait(lambda: page.count(f'#vf-detail button[data-action="clear-health"][data-device="{pf}"]') == 1,
                      "the VF panel's clear button")
            page.click(f'#vf-detail button[data-action="clear-health"][data-device="{pf}"]')
            page.wait(lambda: page.js("return document.getElementById('health-device').value") == pf, "the PF chosen")
            assert page.count('.health-device[data-device="0000:3b:00.4"]') == 0  # listed through its PF only
            # No reason: the node API's refusal, as it words it.
            page.type("#health-reason", "")
            page.click("#health-clear")
            deadline = time.monotonic() + 10
            while page.js("return document.getElementById('error-banner').hidden") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert page.attr("#error-banner", "data-code") == "INVALID_ARGUMENT"
            _, details = grpc_error(node.ClearDeviceHealth, pb.ClearDeviceHealthRequest(device=pf, reason=""))
            assert page.text("#error-message") == details
            page.click("#error-close")
            assert page.attr(pf_row, "data-health") == "unhealthy"
            # With a reason: cleared, the new state in the notice.
            reason = "card reseated, ticket 4711"
            page.type("#health-reason", reason)
            page.clear_notice()
            page.click("#health-clear")
            assert page.notice("device") == pf
            assert page.attr("#notice", "data-health") == "healthy" and "cleared 0000:3b:00.0: now healthy" in page.text("#notice")
            page.wait(lambda: page.attr(pf_row, "data-health") == "healthy"
                      and page.attr(f'.vf[data-vf="{vf}"]', "data-health") == "healthy", "the PF and its VF healthy")
            page.wait(lambda: not page.element("#health-form").is_displayed()
                      and page.count(".health-device") == 0, "nothing left to clear")
            assert page.count(f'{pf_row} button[data-action="clear-health"]') == 0
            pf_health = [p for c in node.GetInventory(pb.GetInventoryRequest()).cards for p in c.pfs if p.bdf == pf][0].health
            assert pf_health.state == pb.HEALTH_STATE_HEALTHY
            # Audited with the reason, the refusal too.
            entries = [e for e in node.GetAuditTrail(pb.GetAuditTrailRequest(limit=100)).entries
                       if e.rpc == "ClearDeviceHealth" and e.transport == "http"]
            assert [e.status for e in entries][-2:] == ["invalidArgument", "ok"], entries
            assert json.loads(entries[-1].request_json)["reason"] == reason
            assert json.loads(entries[-1].request_json)["device"] == pf
        finally:
            stop(agent)


@needs_agent
def test_the_page_says_what_a_reboot_restored(browser):
    """The simulated node kept in simulator.state_file, rebooted between two runs (fpga-agent
    simulator reboot): the page says the host rebooted and, per PF, what was restored; the restore
    operations are in the operations panel with their steps."""
    with tempfile.TemporaryDirectory(prefix="fpga-web-reboot-") as directory:
        hardware = os.path.join(directory, "hardware.json")
        env = {"FPGA_AGENT_SIMULATOR_STATE_FILE": hardware}
        agent = start_web_agent(directory, env=env)
        try:
            node = stub(agent)
            allocation = node.AllocateVF(pb.AllocateVFRequest(
                owner="before-reboot", constraints=pb.AllocationConstraints(pf_bdf="0000:3b:00.0"))).allocation
            assert not node.GetNodeStatus(pb.GetNodeStatusRequest()).layout_restore.rebooted
            page = Page(browser, agent.http.base)
            page.open()
            assert page.text("#layout-restore") == ""
        finally:
            stop(agent)
        result = subprocess.run([str(BIN / "fpga-agent"), "simulator", "reboot", "--state-file", hardware],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and "rebooted the simulated host" in result.stdout, result.stdout + result.stderr
        agent = start_web_agent(directory, env=env)
        try:
            node = stub(agent)
            restore = node.GetNodeStatus(pb.GetNodeStatusRequest()).layout_restore
            assert restore.rebooted and restore.enabled and restore.pfs
            mine = [p for p in restore.pfs if p.pf_bdf == "0000:3b:00.0"][0]
            assert (mine.result, mine.allocations_kept, mine.vfs_bound) == ("restored", 1, 1), mine
            kept = [a for a in node.GetInventory(pb.GetInventoryRequest()).allocations if a.id == allocation.id]
            assert kept and kept[0].vf_bdf == allocation.vf_bdf

            page = Page(browser, agent.http.base)
            page.open()
            page.wait(lambda: page.attr("#restore", "data-rebooted") == "true", "the restore line")
            assert "The host rebooted" in page.text("#restore") and restore.boot_id in page.text("#restore")
            for entry in restore.pfs:
                item = f'#restore .restore-pf[data-pf="{entry.pf_bdf}"]'
                assert page.attr(item, "data-result") == entry.result and page.attr(item, "data-op") == entry.operation_id
                assert (f"restored to {entry.recorded_vfs} VFs (found {entry.found_vfs})" in page.text(item)
                        and entry.operation_id in page.text(item)), page.text(item)
                # Each restore is an operation of the panel, its steps done.
                op = f'#operations .op[data-op="{entry.operation_id}"]'
                page.wait(lambda: page.attr(op, "data-kind") == "restore"
                          and page.attr(op, "data-state") == "OPERATION_STATE_SUCCEEDED", f"{entry.operation_id} listed")
                states = page.js("return Array.from(document.querySelectorAll(arguments[0])).map(e => e.dataset.state)",
                                 f"{op} .op-step")
                assert states and set(states) == {"OPERATION_STATE_SUCCEEDED"}, states
                # Started by the agent itself, not a client.
                assert page.attr(f"{op} .op-by", "data-started-by") == "agent"
            assert "1 allocation kept, 1 VF bound to vfio-pci" in page.text(
                '#restore .restore-pf[data-pf="0000:3b:00.0"]')
            # Its operation id opens the operation.
            page.js(f"document.getElementById('op-{mine.operation_id}').open = false")
            page.click(f'#restore a[data-op="{mine.operation_id}"]')
            page.wait(lambda: page.js(f"return document.getElementById('op-{mine.operation_id}').open"), "the operation open")
        finally:
            stop(agent)
