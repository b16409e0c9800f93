"""A structure-aware fuzz test of the node API: Hypothesis builds every request message of every
RPC of fpga.agent.v1.NodeAgent from its descriptor (so a field added to the .proto is fuzzed
without touching this file) and sends it, as the admin, to the real agent binary.

For each request: the agent stays alive, the status is never UNKNOWN or INTERNAL, and a refused
request (any status but OK) changes nothing: the inventory revision and the highest
orchestrator epoch are the same before and after. The health check still answers SERVING after
each RPC's examples.

Bounded for CI: FPGA_FUZZ_EXAMPLES examples per RPC (default 60), derandomized (the same
examples every run), and FPGA_FUZZ_BUDGET seconds overall (default 240) after which the remaining
examples are skipped. Run it longer locally, e.g.
    FPGA_FUZZ_EXAMPLES=2000 FPGA_FUZZ_BUDGET=3600 python3 -m pytest -q tests/interop/test_fuzz.py
and FPGA_FUZZ_SEED=N to explore other examples than the derandomized ones.
"""
import os
import signal
import tempfile
import time

import grpc
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import start_agent
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc

EXAMPLES = int(os.environ.get("FPGA_FUZZ_EXAMPLES", "60"))
BUDGET = float(os.environ.get("FPGA_FUZZ_BUDGET", "240"))
SEED = os.environ.get("FPGA_FUZZ_SEED")
SERVICE = pb.DESCRIPTOR.services_by_name["NodeAgent"]
METHODS = list(SERVICE.methods)
ACCELERATOR = "card-0000:3b/acc0"
# Background work would add revisions of its own: no periodic rescans, accelerator figures
# refreshed only by the requests themselves, no workload generator (conftest).
CONFIG = "rescan_interval_seconds: 0\nsharing:\n  metrics_interval_seconds: 3600\n"

# Values a field may take that the agent has to think about: limits, their neighbours, sizes.
INTERESTING_INTS = [
    0, 1, -1, 2, -2, 3, 7, 63, 64, 65, 99, 100, 255, 256, 999, 1000, 1001, 1023, 1024, 4095, 4096, 4097,
    10_000, 10_001, 65_535, 65_536, 100_000, 999_999_999, 1_000_000_000, -999_999_999, -1_000_000_000,
    2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**62, -(2**62), 2**63 - 1, -(2**63), 2**64 - 1,
    315_576_000_000, -315_576_000_000,
]
# Strings that are hostile (paths, NUL, control characters, format strings, very long,
# unicode) or almost valid; the fixture adds the ids the agent really has.
HOSTILE_STRINGS = [
    "", " ", "a", "-", ".", "..", "-rf", "../../../../etc/passwd", "/dev/vfio/0", "vm-1/../..", "..%2f..%2f",
    "x\x00y", "\x00", "\n", "\t\r", "%n%s%x%d", "' OR '1'='1", "${jndi:ldap://x}", "\u202egnp.exe", "ü", "😀" * 10,
    "\uffff", "\U0010ffff", "A" * 64, "A" * 65, "A" * 128, "A" * 129, "a" * 10_000, "b" * 300_000,
    "card-0000:3b", "card-0000:3B", "card-ffff:ff", "card-", "card-0000:3b/acc0", "card-0000:3b/acc1",
    "card-0000:3b/acc99999999999999999999", "card-0000:3b/acc-1", "0000:3b:00.0", "0000:3b:00.1", "0000:3b:00.4",
    "0000:3B:00.0", "ffff:ff:1f.7", "0000:3b:00.0\x00", "0000:3b:00.0/../../..", "alloc-000000000000",
    "op-000000000000", "ctx-000000000000", "alloc-", "vm-1", "vm-2", "tenant-a", "key-1", "pf:0000:3b:00.0",
]
KNOWN_STRINGS = []  # filled by the fixture: ids of this agent's allocations, contexts, operations


def int_strategy(low, high):
    edges = [value for value in INTERESTING_INTS if low <= value <= high] + [low, high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


INT_RANGES = {
    pbd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), pbd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), pbd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), pbd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), pbd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), pbd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def string_strategy():
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    return st.one_of(st.sampled_from(HOSTILE_STRINGS + KNOWN_STRINGS), text)


def scalar_strategy(field):
    kind = field.type
    if kind in INT_RANGES:
        return int_strategy(*INT_RANGES[kind])
    if kind == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == pbd.FieldDescriptor.TYPE_STRING:
        return string_strategy()
    if kind == pbd.FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff" * 1000]))
    if kind in (pbd.FieldDescriptor.TYPE_DOUBLE, pbd.FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32 if kind == pbd.FieldDescriptor.TYPE_FLOAT else 64))
    if kind == pbd.FieldDescriptor.TYPE_ENUM:
        # Open enums: every known value, and numbers the agent has never heard of.
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), int_strategy(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name} (type {kind})")


def value_strategy(field, depth):
    if field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    return scalar_strategy(field)


def is_map(field):
    return field.type == pbd.FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def field_strategy(field, depth):
    if is_map(field):
        entry = field.message_type
        keys = value_strategy(entry.fields_by_name["key"], depth)
        values = value_strategy(entry.fields_by_name["value"], depth)
        return st.dictionaries(keys, values, max_size=4) | st.sampled_from([{}])
    if field.is_repeated:
        return st.lists(value_strategy(field, depth), max_size=3)
    return value_strategy(field, depth)


def duration_strategy(cls):
    """google.protobuf.Duration with any seconds and nanos, valid or not (negative nanos,
    nanos of the other sign than seconds, nanos past a second, seconds near 2^63)."""
    seconds = int_strategy(-(2**63), 2**63 - 1)
    nanos = int_strategy(-(2**31), 2**31 - 1)
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


def message_strategy(descriptor, depth=0):
    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Duration":
        return duration_strategy(cls)
    if depth > 4:
        return st.just(cls())
    # Each field absent (None) or set; fields of a oneof overwrite one another, as on the wire.
    fields = {field.name: st.none() | field_strategy(field, depth) for field in descriptor.fields}
    return st.fixed_dictionaries(fields).map(lambda values: build(cls, values))


def build(cls, values):
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if field.is_repeated or field.message_type else None
        if is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            for item in value:
                target.add().CopyFrom(item) if field.type == pbd.FieldDescriptor.TYPE_MESSAGE else target.append(item)
        elif field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
            target.SetInParent()
        else:
            setattr(message, name, value)
    return message


def identity(data):
    return data


class Fuzzer:
    """One agent, one channel, and the checks made around every request."""

    def __init__(self, agent):
        self.agent = agent
        self.channel = grpc.insecure_channel(agent.tcp, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.node = rpc.NodeAgentStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.started = time.monotonic()
        self.examples = 0
        self.skipped = 0
        self.codes = {}

    def mark(self):
        status = self.node.GetNodeStatus(pb.GetNodeStatusRequest(), timeout=30)
        return status.revision, status.orchestrator_epoch

    def send(self, method, payload):
        """Sends serialized bytes; returns (code, reply bytes or None, details)."""
        path = f"/{SERVICE.full_name}/{method.name}"
        try:
            if method.server_streaming:
                call = self.channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)(
                    payload, timeout=60)
                try:
                    return grpc.StatusCode.OK, next(call), ""
                except StopIteration:
                    return grpc.StatusCode.OK, None, ""
                finally:
                    call.cancel()
            reply = self.channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)(
                payload, timeout=60)
            return grpc.StatusCode.OK, reply, ""
        except grpc.RpcError as error:
            return error.code(), None, error.details()

    def check(self, method, payload, shown):
        if time.monotonic() - self.started > BUDGET:
            self.skipped += 1
            return
        self.examples += 1
        before = self.mark()
        code, reply, details = self.send(method, payload)
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        assert self.agent.process.poll() is None, f"the agent died on {method.name}({shown})"
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
            f"{method.name}({shown}) -> {code.name}: {details}")
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method.name}({shown}) hung"
        if code != grpc.StatusCode.OK:
            after = self.mark()
            assert after == before, (
                f"refused {method.name}({shown}) -> {code.name} ({details}) changed the node: "
                f"(revision, epoch) {before} -> {after}")
            inventory = self.node.GetInventory(pb.GetInventoryRequest(), timeout=30)
            assert inventory.revision == before[0]
        elif method.output_type.full_name == "fpga.agent.v1.Operation" and reply:
            self.settle(pb.Operation.FromString(reply))

    def settle(self, operation):
        """Waits for a started operation to end, so its steps' revisions are not taken for the
        next request's."""
        if operation.state not in (pb.OPERATION_STATE_RUNNING, pb.OPERATION_STATE_PENDING):
            return
        for record in self.node.WatchOperation(pb.WatchOperationRequest(id=operation.id), timeout=120):
            if record.state not in (pb.OPERATION_STATE_RUNNING, pb.OPERATION_STATE_PENDING):
                return

    def serving(self):
        reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def fuzzer():
    with tempfile.TemporaryDirectory(prefix="fpga-fuzz-") as directory:
        agent = start_agent(directory, config_text=CONFIG)
        fuzzer = Fuzzer(agent)
        node = fuzzer.node
        # Real ids, so that requests reach past the id checks into the engine.
        allocation = node.AllocateVF(pb.AllocateVFRequest(owner="fuzz", vm="vm-1"), timeout=30).allocation
        attached = node.AllocateVF(pb.AllocateVFRequest(owner="fuzz"), timeout=30).allocation
        node.AttachVF(pb.AttachVFRequest(allocation_id=attached.id, vm="vm-1"), timeout=30)
        context = node.RegisterContext(pb.RegisterContextRequest(
            context=pb.Context(accelerator_id=ACCELERATOR, guest="vm-1", function="fft")), timeout=30).context
        plan = node.Reconfigure(pb.ReconfigureRequest(pf_bdf="0000:3b:00.0", vf_count=2, dry_run=True), timeout=30)
        KNOWN_STRINGS[:] = [allocation.id, attached.id, context.id, plan.id, attached.vf_bdf, allocation.vf_bdf]
        yield fuzzer
        print(f"\nfuzz: {fuzzer.examples} requests in {time.monotonic() - fuzzer.started:.0f} s "
              f"({fuzzer.skipped} skipped past the budget), statuses {dict(sorted(fuzzer.codes.items()))}")
        alive = agent.process.poll() is None
        if alive:
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=60)
        assert alive, "the agent died: " + open(os.path.join(directory, "agent.log")).read()[-4000:]


def settings_for_ci(test):
    configured = settings(
        max_examples=EXAMPLES, derandomize=SEED is None, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])(test)
    return seed(int(SEED))(configured) if SEED is not None else configured


def test_time_slice_near_two_to_the_62_is_refused(fuzzer):
    """The regression: a time slice of 2^62 s overflowed the nanoseconds of the idempotency
    fingerprint and killed the agent. Now INVALID_ARGUMENT naming the field and its range, with
    or without a key and an epoch, and nothing changes."""
    node = fuzzer.node
    for seconds, nanos in [(2**62, 0), (2**63 - 1, 999_999_999), (-(2**63), 0), (10, 1), (0, 99_999), (0, -5),
                           (1, -1), (0, 10**9)]:
        for meta in [pb.RequestMeta(), pb.RequestMeta(idempotency_key=f"slice-{seconds}-{nanos}", orchestrator_epoch=2**63)]:
            before = fuzzer.mark()
            with pytest.raises(grpc.RpcError) as refused:
                node.SetSharingPolicy(pb.SetSharingPolicyRequest(meta=meta, policy=pb.SharingPolicy(
                    accelerator_id=ACCELERATOR, time_slice={"seconds": seconds, "nanos": nanos}, overcommit_limit=64)),
                    timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "policy.time_slice" in refused.value.details()
            assert fuzzer.mark() == before
    # The edges themselves are accepted.
    for seconds, nanos in [(0, 100_000), (10, 0)]:
        reply = node.SetSharingPolicy(pb.SetSharingPolicyRequest(policy=pb.SharingPolicy(
            accelerator_id=ACCELERATOR, time_slice={"seconds": seconds, "nanos": nanos}, overcommit_limit=64)), timeout=30)
        assert (reply.policy.time_slice.seconds, reply.policy.time_slice.nanos) == (seconds, nanos)
    assert fuzzer.agent.process.poll() is None and fuzzer.serving()


@pytest.mark.parametrize("method", METHODS, ids=[method.name for method in METHODS])
def test_fuzz_every_rpc(fuzzer, method):
    """Every RPC, unary or streaming, with requests built from its input message's descriptor."""

    @settings_for_ci
    @given(message_strategy(method.input_type))
    def run(request):
        fuzzer.check(method, request.SerializeToString(), str(request)[:2000])

    run()
    assert fuzzer.agent.process.poll() is None
    assert fuzzer.serving(), f"health is not SERVING after fuzzing {method.name}"


@pytest.mark.parametrize("method", METHODS, ids=[method.name for method in METHODS])
def test_fuzz_raw_bytes(fuzzer, method):
    """Bytes that are not the message, or are it cut short or with unknown fields: refused
    (INVALID_ARGUMENT) or read, never a crash or UNKNOWN/INTERNAL."""
    valid = message_strategy(method.input_type).map(lambda message: message.SerializeToString())
    mangled = st.one_of(
        st.binary(max_size=64),
        st.tuples(valid, st.integers(0, 64)).map(lambda pair: pair[0][: max(0, len(pair[0]) - pair[1])]),
        st.tuples(valid, st.binary(max_size=16)).map(lambda pair: pair[0] + pair[1]),
        # Unknown fields: number 1000 as a varint, a length-delimited field past the end.
        st.sampled_from([b"\xc0\x3e\x01", b"\xc2\x3e\xff\xff\xff\xff\x0f", b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 10]),
    )

    @settings(max_examples=max(5, EXAMPLES // 4), derandomize=SEED is None, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mangled)
    def run(payload):
        fuzzer.check(method, payload, payload[:200].hex())

    run()
    assert fuzzer.serving()
