"""A bounded, randomized concurrency stress test of the node API over gRPC, then invariant checks.

Twelve client threads, each with its own channel and a fixed random seed (printed), hammer one
agent on its simulated default node with a mix of mutating requests that race on purpose:

- AllocateVF without a key, with a key of its own (retried), and with keys SHARED by every thread
  (the key names a 100 ms time bucket, its request is derived from the key alone, so all threads
  that use a key send identical requests; each use fires two at once);
- ReleaseVF of any allocation seen by any thread, sometimes twice at once on the same id;
- AttachVF / DetachVF to the simulated VMs vm-1 (4 root ports) and vm-2 (2 root ports);
- DrainDevice (release_unattached) / UndrainDevice of one PF;
- Reconfigure of one PF, a dry run and two real ones at once, small VF counts; operations are
  followed with WatchOperation and GetOperation;
- RegisterContext, two or three identical requests at once for the same guest and accelerator;
- MoveContext and DeleteContext at once on the same context; SwitchContext at the next slice
  (NOW switches, including to the loaded context, are covered by the core tests).

A WatchInventory stream from revision 0 runs meanwhile and records every event.

Every RPC has a deadline. A status that the request cannot legitimately get (UNKNOWN, INTERNAL,
DEADLINE_EXCEEDED, and anything not listed for the method in ALLOWED) is a failure. Each thread
stops after RPC_BUDGET calls or LOAD_SECONDS, whichever comes first. Then, once every operation
has ended, the inventory must satisfy:

1. no VF appears in two allocations;
2. every allocation can be released (detached first when attached); afterwards none is left;
3. a VF is allocated/attached exactly when an allocation names it, and shows that allocation
   (and each VM's occupied root ports match the allocations attached to it);
4. at most one allocation per idempotency key (and every answer to a key names one allocation);
5. the watch stream is gap-free: revisions strictly increase, a delta is exactly previous + 1
   unless a resync snapshot came in between, and the stream's view matches the inventory;
6. contexts are unique per guest on each accelerator (and match the guests it binds).

All violations are collected and reported together; the summary of calls per method and status
is printed (shown by pytest with the failure, or with -s).

Knobs: FPGA_STRESS_SEED (base seed, default 20250101).
"""
import collections
import hashlib
import os
import random
import threading
import time
import traceback

import grpc
import pytest

from conftest import BIN
from fpga.agent.v1 import agent_pb2 as pb
from fpga.agent.v1 import agent_pb2_grpc as rpc

pytestmark = pytest.mark.skipif(
    not (BIN / "fpga-agent").exists(), reason=f"{BIN / 'fpga-agent'} is not built (swift build)")

THREADS = 12
RPC_BUDGET = 190  # per thread: 12 x 190 = 2,280 calls of load at most (a burst may overshoot by 2)
LOAD_SECONDS = 40.0  # per thread, whatever its count
DEADLINE = 30.0  # every unary call and every WatchOperation stream
WATCH_DEADLINE = 300.0  # the WatchInventory stream lives through the whole test; cancelled at the end
BASE_SEED = int(os.environ.get("FPGA_STRESS_SEED", "20250101"))
DRAIN_PF = "0000:d8:00.1"
RECONF_PF = "0000:3b:00.3"
RECONF_COUNTS = (0, 1, 2, 4, 6)
VMS = ("vm-1", "vm-2")
GUESTS = tuple(f"stress-guest-{i}" for i in range(6))
KEY_BUCKET_SECONDS = 0.1

C = grpc.StatusCode
ALLOWED = {
    "AllocateVF": {C.OK, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION, C.ABORTED},
    "ReleaseVF": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED},
    "AttachVF": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED, C.RESOURCE_EXHAUSTED},
    "DetachVF": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED},
    "DrainDevice": {C.OK, C.ABORTED},
    "UndrainDevice": {C.OK, C.ABORTED},
    "Reconfigure": {C.OK, C.ABORTED, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
    "GetOperation": {C.OK},
    "WatchOperation": {C.OK},
    "RegisterContext": {C.OK, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION, C.ABORTED},
    "MoveContext": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED, C.ABORTED},
    "DeleteContext": {C.OK, C.NOT_FOUND, C.ABORTED},
    "SwitchContext": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED},
    "GetInventory": {C.OK},
    "GetNodeStatus": {C.OK},
    "ListContexts": {C.OK},
}
# Every request this test sends is well-formed and every key is only ever used with one request,
# so INVALID_ARGUMENT is legitimate nowhere. The one UNAVAILABLE the agent gives on purpose: a VF
# asked for on a PF under reconfiguration.
SPECIAL = {("AllocateVF", C.UNAVAILABLE): "is being reconfigured"}
HELD = {pb.VF_STATE_ALLOCATED, pb.VF_STATE_ATTACHED, pb.VF_STATE_DETACHING}
TERMINAL = {pb.OPERATION_STATE_SUCCEEDED, pb.OPERATION_STATE_FAILED, pb.OPERATION_STATE_PLANNED}


def vf_state(value):
    return pb.VFState.Name(value)


def op_state(value):
    return pb.OperationState.Name(value)


class Recorder:
    """Counts every call's status; keeps the ones the request could not legitimately get."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.unexpected = []
        self.observed = []  # invariant violations seen while the load ran
        self.crashes = []  # exceptions in the test's own code

    def record(self, method, code, details, who):
        allowed = code in ALLOWED[method] or (
            (method, code) in SPECIAL and SPECIAL[(method, code)] in (details or ""))
        with self.lock:
            self.counts[(method, code.name)] += 1
            if not allowed:
                self.unexpected.append(f"{who}: {method} -> {code.name}: {details}")

    def observe(self, text):
        with self.lock:
            self.observed.append(text)


class World:
    """What the threads have seen, shared so that they race on each other's objects."""

    def __init__(self, accelerators):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.accelerators = accelerators
        self.allocations = {}  # id -> the VM it was made for ("" when none)
        self.attached = set()
        self.contexts = {}  # id -> (accelerator, guest)
        self.key_answers = collections.defaultdict(set)  # idempotency key -> {(allocation id, VF)}
        self.key_senders = collections.defaultdict(set)  # shared key -> the threads that sent it
        self.operations = {}  # id -> kind
        self.own_keys = 0

    def saw_allocation(self, key, allocation):
        with self.lock:
            self.allocations.setdefault(allocation.id, allocation.vm)
            if key:
                self.key_answers[key].add((allocation.id, allocation.vf_bdf))

    def forget_allocation(self, allocation_id):
        with self.lock:
            self.allocations.pop(allocation_id, None)
            self.attached.discard(allocation_id)

    def pick_allocation(self, rng, attached_first=False):
        with self.lock:
            if attached_first and self.attached and rng.random() < 0.8:
                chosen = rng.choice(sorted(self.attached))
            elif self.allocations:
                chosen = rng.choice(list(self.allocations))
            else:
                return None, ""
            return chosen, self.allocations.get(chosen, "")

    def pick_context(self, rng):
        with self.lock:
            if not self.contexts:
                return None, None
            chosen = rng.choice(list(self.contexts))
            return chosen, self.contexts[chosen]


class Client:
    """One channel; every call has a deadline and its status recorded."""

    def __init__(self, target, name, recorder):
        self.channel = grpc.insecure_channel(target)
        self.stub = rpc.NodeAgentStub(self.channel)
        self.name = name
        self.recorder = recorder
        self.rpcs = 0

    def call(self, method, request):
        return self.many([(method, request)])[0]

    def many(self, calls):
        """Sends the calls at once; returns (code, reply or None, details) for each, in order."""
        futures = [(method, getattr(self.stub, method).future(request, timeout=DEADLINE)) for method, request in calls]
        self.rpcs += len(calls)
        results = []
        for method, future in futures:
            try:
                reply = future.result()
                self.recorder.record(method, C.OK, "", self.name)
                results.append((C.OK, reply, ""))
            except grpc.RpcError as error:
                self.recorder.record(method, error.code(), error.details(), self.name)
                results.append((error.code(), None, error.details()))
        return results

    def watch_operation(self, operation_id):
        """Follows an operation to its end; returns its last state seen, None when the call failed."""
        self.rpcs += 1
        last = None
        try:
            for operation in self.stub.WatchOperation(pb.WatchOperationRequest(id=operation_id), timeout=DEADLINE):
                last = operation.state
        except grpc.RpcError as error:
            self.recorder.record("WatchOperation", error.code(), error.details(), self.name)
            return None
        self.recorder.record("WatchOperation", C.OK, "", self.name)
        return last

    def close(self):
        self.channel.close()


def constraint_choices():
    return [
        None,
        pb.AllocationConstraints(numa_node=0),
        pb.AllocationConstraints(numa_node=1),
        pb.AllocationConstraints(pf_bdf=DRAIN_PF),
        pb.AllocationConstraints(pf_bdf=RECONF_PF),
        pb.AllocationConstraints(card_id="card-0000:d8"),
    ]


def shared_request(key):
    """The one request every thread sends with `key`: derived from the key alone."""
    digest = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    vm = ["", "vm-1", "vm-2"][digest % 3]
    choices = constraint_choices()
    constraints = choices[(digest >> 8) % len(choices)]
    return pb.AllocateVFRequest(
        meta=pb.RequestMeta(idempotency_key=key), owner="stress-shared", vm=vm, constraints=constraints)


def context_request(accelerator, index):
    """The one registration of guest `index` on `accelerator` (identical whoever sends it)."""
    return pb.RegisterContextRequest(context=pb.Context(
        accelerator_id=accelerator, guest=GUESTS[index], function="stress-fn",
        parameters={"slot": str(index)}, saved_state_bytes=4096 * (index + 1), weight=index % 3 + 1))


class Worker:
    def __init__(self, index, target, world, recorder):
        self.index = index
        self.seed = BASE_SEED * 1000 + index
        self.rng = random.Random(self.seed)
        self.world = world
        self.recorder = recorder
        self.client = Client(target, f"thread-{index}", recorder)
        self.elapsed = 0.0
        self.operations = collections.Counter()
        self.ops = [
            (self.allocate_plain, 12), (self.allocate_own_key, 6), (self.allocate_shared_key, 10),
            (self.release, 12), (self.release_race, 5), (self.attach, 9), (self.detach, 9),
            (self.drain, 2), (self.undrain, 3), (self.reconfigure_race, 2), (self.get_operation, 2),
            (self.register_race, 6), (self.move_delete_race, 4), (self.switch, 4), (self.read, 3),
        ]

    def run(self):
        start = time.monotonic()
        stop = start + LOAD_SECONDS
        functions, weights = zip(*self.ops)
        try:
            while self.client.rpcs < RPC_BUDGET and time.monotonic() < stop:
                operation = self.rng.choices(functions, weights)[0]
                self.operations[operation.__name__] += 1
                operation()
        except Exception:
            self.recorder.crashes.append(f"thread-{self.index}: {traceback.format_exc()}")
        finally:
            self.elapsed = time.monotonic() - start
            self.client.close()

    # Allocation

    def allocate_plain(self):
        request = pb.AllocateVFRequest(
            owner=f"stress-{self.index}", vm=self.rng.choice(["", "", "vm-1", "vm-2"]),
            constraints=self.rng.choice(constraint_choices()))
        code, reply, _ = self.client.call("AllocateVF", request)
        if code == C.OK:
            self.world.saw_allocation("", reply.allocation)

    def allocate_own_key(self):
        with self.world.lock:
            self.world.own_keys += 1
            key = f"own-{self.index}-{self.world.own_keys}"
        request = pb.AllocateVFRequest(
            meta=pb.RequestMeta(idempotency_key=key), owner=f"stress-{self.index}",
            vm=self.rng.choice(["", "vm-1", "vm-2"]), constraints=self.rng.choice(constraint_choices()))
        code, reply, _ = self.client.call("AllocateVF", request)
        if code != C.OK:
            return
        self.world.saw_allocation(key, reply.allocation)
        if self.rng.random() < 0.5:
            again_code, again, _ = self.client.call("AllocateVF", request)
            if again_code == C.OK:
                self.world.saw_allocation(key, again.allocation)
                if not again.replayed or again.allocation.id != reply.allocation.id:
                    self.recorder.observe(
                        f"4: a retry of AllocateVF key {key} answered allocation {again.allocation.id} "
                        f"(replayed={again.replayed}) after the first call answered {reply.allocation.id}")

    def allocate_shared_key(self):
        # Every thread in the same 100 ms bucket uses the same key with the same request.
        bucket = int((time.monotonic() - self.world.t0) / KEY_BUCKET_SECONDS)
        key = f"shared-{bucket}"
        request = shared_request(key)
        with self.world.lock:
            self.world.key_senders[key].add(self.index)
        for code, reply, _ in self.client.many([("AllocateVF", request), ("AllocateVF", request)]):
            if code == C.OK:
                self.world.saw_allocation(key, reply.allocation)

    def release(self):
        allocation_id, _ = self.world.pick_allocation(self.rng)
        if allocation_id is None:
            return self.allocate_plain()
        code, _, _ = self.client.call("ReleaseVF", pb.ReleaseVFRequest(allocation_id=allocation_id))
        if code in (C.OK, C.NOT_FOUND):
            self.world.forget_allocation(allocation_id)

    def release_race(self):
        allocation_id, _ = self.world.pick_allocation(self.rng)
        if allocation_id is None:
            return self.allocate_plain()
        request = pb.ReleaseVFRequest(allocation_id=allocation_id)
        results = self.client.many([("ReleaseVF", request), ("ReleaseVF", request)])
        if any(code in (C.OK, C.NOT_FOUND) for code, _, _ in results):
            self.world.forget_allocation(allocation_id)

    def attach(self):
        allocation_id, made_for = self.world.pick_allocation(self.rng)
        if allocation_id is None:
            return self.allocate_plain()
        vm = made_for or self.rng.choice(VMS)
        code, _, _ = self.client.call("AttachVF", pb.AttachVFRequest(allocation_id=allocation_id, vm=vm))
        if code == C.OK:
            with self.world.lock:
                if allocation_id in self.world.allocations:
                    self.world.attached.add(allocation_id)
        elif code == C.NOT_FOUND:
            self.world.forget_allocation(allocation_id)

    def detach(self):
        allocation_id, _ = self.world.pick_allocation(self.rng, attached_first=True)
        if allocation_id is None:
            return self.allocate_plain()
        code, _, _ = self.client.call("DetachVF", pb.DetachVFRequest(allocation_id=allocation_id))
        if code == C.OK:
            with self.world.lock:
                self.world.attached.discard(allocation_id)
        elif code == C.NOT_FOUND:
            self.world.forget_allocation(allocation_id)

    # Draining and reconfiguration

    def drain(self):
        code, reply, _ = self.client.call(
            "DrainDevice", pb.DrainDeviceRequest(device=DRAIN_PF, release_unattached=True))
        if code == C.OK:
            with self.world.lock:
                self.world.operations[reply.id] = "drain"

    def undrain(self):
        self.client.call("UndrainDevice", pb.UndrainDeviceRequest(device=DRAIN_PF))

    def reconfigure_race(self):
        first, second = self.rng.choice(RECONF_COUNTS), self.rng.choice(RECONF_COUNTS)
        strategy = self.rng.choice([pb.RECONFIGURE_STRATEGY_UNSPECIFIED, pb.RECONFIGURE_STRATEGY_UNSPECIFIED,
                                    pb.RECONFIGURE_STRATEGY_DETACH_REATTACH])
        calls = [
            ("Reconfigure", pb.ReconfigureRequest(pf_bdf=RECONF_PF, vf_count=first, strategy=strategy, dry_run=True)),
            ("Reconfigure", pb.ReconfigureRequest(pf_bdf=RECONF_PF, vf_count=first, strategy=strategy)),
            ("Reconfigure", pb.ReconfigureRequest(pf_bdf=RECONF_PF, vf_count=second, strategy=strategy)),
        ]
        started = []
        for number, (code, reply, _) in enumerate(self.client.many(calls)):
            if code != C.OK:
                continue
            if number == 0:
                if reply.state != pb.OPERATION_STATE_PLANNED:
                    self.recorder.observe(
                        f"dry-run Reconfigure of {RECONF_PF} answered operation {reply.id} in state {op_state(reply.state)}")
            else:
                started.append(reply.id)
                with self.world.lock:
                    self.world.operations[reply.id] = "reconfigure"
        if started and self.rng.random() < 0.5:
            last = self.client.watch_operation(started[0])
            if last is not None and last not in TERMINAL:
                self.recorder.observe(f"WatchOperation of {started[0]} ended in state {op_state(last)}, not a final one")

    def get_operation(self):
        with self.world.lock:
            operations = list(self.world.operations)
        if not operations:
            return self.reconfigure_race()
        self.client.call("GetOperation", pb.GetOperationRequest(id=self.rng.choice(operations)))

    # Contexts

    def register_race(self):
        accelerator = self.rng.choice(self.world.accelerators)
        index = self.rng.randrange(len(GUESTS))
        request = context_request(accelerator, index)
        created = set()
        for code, reply, _ in self.client.many([("RegisterContext", request)] * self.rng.choice([2, 3])):
            if code == C.OK:
                with self.world.lock:
                    self.world.contexts[reply.context.id] = (accelerator, GUESTS[index])
                created.add(reply.context.id)
        if len(created) > 1:
            # Identical registrations answered with different contexts: are both there now?
            code, listed, _ = self.client.call(
                "ListContexts", pb.ListContextsRequest(accelerator_id=accelerator, guest=GUESTS[index]))
            if code == C.OK and len(listed.contexts) > 1:
                self.recorder.observe(
                    f"6: identical concurrent RegisterContext calls for guest {GUESTS[index]} on {accelerator} "
                    f"created {sorted(created)}; ListContexts then showed {len(listed.contexts)} contexts for the pair: "
                    f"{sorted(c.id for c in listed.contexts)}")

    def move_delete_race(self):
        context_id, known = self.world.pick_context(self.rng)
        if context_id is None:
            return self.register_race()
        accelerator, guest = known
        target = self.rng.choice([a for a in self.world.accelerators if a != accelerator])
        calls = [("MoveContext", pb.MoveContextRequest(context_id=context_id, accelerator_id=target)),
                 ("DeleteContext", pb.DeleteContextRequest(context_id=context_id))]
        self.rng.shuffle(calls)
        results = dict((method, code) for (method, _), (code, _, _) in zip(calls, self.client.many(calls)))
        with self.world.lock:
            if results["DeleteContext"] in (C.OK, C.NOT_FOUND):
                self.world.contexts.pop(context_id, None)
            elif results["MoveContext"] == C.OK and context_id in self.world.contexts:
                self.world.contexts[context_id] = (target, guest)

    def switch(self):
        context_id, _ = self.world.pick_context(self.rng)
        if context_id is None:
            return self.register_race()
        timing = self.rng.choice([pb.SWITCH_TIMING_NEXT_SLICE, pb.SWITCH_TIMING_UNSPECIFIED])
        code, _, _ = self.client.call("SwitchContext", pb.SwitchContextRequest(context_id=context_id, timing=timing))
        if code == C.NOT_FOUND:
            with self.world.lock:
                self.world.contexts.pop(context_id, None)

    def read(self):
        choice = self.rng.randrange(3)
        if choice == 0:
            self.client.call("GetInventory", pb.GetInventoryRequest())
        elif choice == 1:
            self.client.call("GetNodeStatus", pb.GetNodeStatusRequest())
        else:
            code, reply, _ = self.client.call("ListContexts", pb.ListContextsRequest())
            if code == C.OK:
                with self.world.lock:
                    for context in reply.contexts:
                        self.world.contexts.setdefault(context.id, (context.accelerator_id, context.guest))


class Watcher:
    """WatchInventory from revision 0: every event's revision, kind and resync flag, and the set
    of allocation ids the stream's view holds after each event."""

    def __init__(self, target):
        self.channel = grpc.insecure_channel(target)
        self.events = []  # (revision, "snapshot" | "delta", resync)
        self.view_at = {}  # revision -> frozenset of allocation ids
        self.ended = None  # (code, details) when the stream ended on its own
        self.crash = None
        self.cancelled = False
        self.lock = threading.Lock()
        self.stream = rpc.NodeAgentStub(self.channel).WatchInventory(
            pb.WatchInventoryRequest(from_revision=0), timeout=WATCH_DEADLINE)
        self.thread = threading.Thread(target=self.run, name="watcher", daemon=True)
        self.thread.start()

    def run(self):
        view = set()
        try:
            for event in self.stream:
                kind = event.WhichOneof("event")
                if kind == "snapshot":
                    view = {a.id for a in event.snapshot.allocations}
                else:
                    for change in event.delta.changes:
                        which = change.WhichOneof("change")
                        if which == "allocation_updated":
                            view.add(change.allocation_updated.id)
                        elif which == "allocation_removed":
                            view.discard(change.allocation_removed)
                with self.lock:
                    self.events.append((event.revision, kind, event.resync))
                    self.view_at[event.revision] = frozenset(view)
            self.ended = ("OK", "the stream ended")
        except grpc.RpcError as error:
            if not (self.cancelled and error.code() == C.CANCELLED):
                self.ended = (error.code().name, error.details())
        except Exception:
            self.crash = traceback.format_exc()

    @property
    def revision(self):
        with self.lock:
            return self.events[-1][0] if self.events else 0

    def wait_for(self, revision, seconds=30.0):
        """Waits (bounded) until the stream has reached `revision`; True when it has."""
        deadline = time.monotonic() + seconds
        while self.revision < revision and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        return self.revision >= revision

    def close(self):
        self.cancelled = True
        self.stream.cancel()
        self.thread.join(timeout=10)
        self.channel.close()


# Checks on the quiescent node


def check_allocations(inventory):
    """Invariants 1, 3 and 4 on one inventory."""
    problems = []
    allocations = {}
    for allocation in inventory.allocations:
        if allocation.id in allocations:
            problems.append(f"1: allocation {allocation.id} is listed twice in the inventory")
        allocations[allocation.id] = allocation
    by_vf = collections.defaultdict(list)
    for allocation in inventory.allocations:
        by_vf[allocation.vf_bdf].append(allocation.id)
    for vf, ids in sorted(by_vf.items()):
        if len(ids) > 1:
            problems.append(f"1: VF {vf} appears in {len(ids)} allocations: {', '.join(sorted(ids))}")

    vfs = {vf.bdf: vf for card in inventory.cards for pf in card.pfs for vf in pf.vfs}
    for bdf, vf in sorted(vfs.items()):
        if vf.state not in HELD and not vf.allocation_id:
            continue
        if not vf.allocation_id:
            problems.append(f"3: VF {bdf} is {vf_state(vf.state)} but names no allocation")
        elif vf.allocation_id not in allocations:
            problems.append(
                f"3: VF {bdf} is {vf_state(vf.state)} and names allocation {vf.allocation_id}, which the inventory does not list")
        elif allocations[vf.allocation_id].vf_bdf != bdf:
            problems.append(
                f"3: VF {bdf} names allocation {vf.allocation_id}, which holds VF {allocations[vf.allocation_id].vf_bdf}")
        elif vf.state not in HELD:
            problems.append(f"3: VF {bdf} names allocation {vf.allocation_id} but is {vf_state(vf.state)}")
    for allocation in inventory.allocations:
        vf = vfs.get(allocation.vf_bdf)
        if vf is None:
            problems.append(f"3: allocation {allocation.id} holds VF {allocation.vf_bdf}, which is not in the inventory")
            continue
        if vf.allocation_id != allocation.id:
            problems.append(
                f"3: allocation {allocation.id} holds VF {allocation.vf_bdf}, but the VF shows allocation "
                f"{vf.allocation_id or '(none)'} and state {vf_state(vf.state)}")
            continue
        expected = (pb.VF_STATE_DETACHING if allocation.detaching
                    else pb.VF_STATE_ATTACHED if allocation.attached else pb.VF_STATE_ALLOCATED)
        if vf.state != expected:
            problems.append(
                f"3: allocation {allocation.id} (attached={allocation.attached}, detaching={allocation.detaching}) "
                f"holds VF {allocation.vf_bdf}, which is {vf_state(vf.state)}, not {vf_state(expected)}")
    for vm in inventory.vms:
        occupied = vm.root_ports - vm.free_root_ports
        here = sorted(a.id for a in inventory.allocations if (a.attached or a.detaching) and a.vm == vm.name)
        if occupied != len(here):
            problems.append(
                f"3: VM {vm.name} has {occupied} of {vm.root_ports} root ports occupied but {len(here)} allocations "
                f"attached to it: {', '.join(here) or '(none)'}")

    by_key = collections.defaultdict(list)
    for allocation in inventory.allocations:
        if allocation.idempotency_key:
            by_key[allocation.idempotency_key].append(allocation)
    for key, held in sorted(by_key.items()):
        if len(held) > 1:
            problems.append(
                f"4: idempotency key {key} is carried by {len(held)} allocations: "
                + ", ".join(f"{a.id} (VF {a.vf_bdf})" for a in sorted(held, key=lambda a: a.id)))
    return problems


def check_contexts(inventory, contexts):
    """Invariant 6: one context per guest and accelerator, and the accelerators bind exactly the
    guests that have a context on them."""
    problems = []
    pairs = collections.defaultdict(list)
    for context in contexts:
        pairs[(context.accelerator_id, context.guest)].append(context.id)
    for (accelerator, guest), ids in sorted(pairs.items()):
        if len(ids) > 1:
            problems.append(f"6: guest {guest} has {len(ids)} contexts on {accelerator}: {', '.join(sorted(ids))}")
    known = {a.id for a in inventory.accelerators}
    for context in contexts:
        if context.accelerator_id not in known:
            problems.append(f"6: context {context.id} of {context.guest} is on unknown accelerator {context.accelerator_id}")
    for accelerator in inventory.accelerators:
        bound = [g.guest for g in accelerator.guests]
        duplicates = sorted(g for g, n in collections.Counter(bound).items() if n > 1)
        if duplicates:
            problems.append(f"6: accelerator {accelerator.id} lists guests more than once: {duplicates}")
        with_context = {guest for (a, guest) in pairs if a == accelerator.id}
        for guest in sorted(set(bound) - with_context):
            problems.append(f"6: accelerator {accelerator.id} binds guest {guest}, which has no context on it")
        for guest in sorted(with_context - set(bound)):
            ids = ", ".join(sorted(pairs[(accelerator.id, guest)]))
            problems.append(
                f"6: context {ids} of guest {guest} is on accelerator {accelerator.id}, which does not bind {guest}")
    return problems


def check_watch(watcher, inventory_revisions):
    """Invariant 5: gap-free revisions; the stream's allocations equal the inventory's at the
    revisions given ({revision: set of allocation ids})."""
    problems = []
    with watcher.lock:
        events = list(watcher.events)
        view_at = dict(watcher.view_at)
    if watcher.crash:
        problems.append(f"test error in the watcher thread: {watcher.crash}")
    if watcher.ended:
        problems.append(f"5: the WatchInventory stream ended before the test cancelled it: {watcher.ended[0]} {watcher.ended[1]}")
    if not events:
        return problems + ["5: the WatchInventory stream sent no event"]
    revision, kind, resync = events[0]
    if kind != "snapshot" or resync:
        problems.append(f"5: the stream from revision 0 began with a {kind} (resync={resync}), not a snapshot")
    gaps = []
    for position, (revision, kind, resync) in enumerate(events[1:], start=1):
        previous = events[position - 1][0]
        if kind == "delta" and revision != previous + 1:
            gaps.append(f"event {position}: delta at revision {revision} after revision {previous}")
        elif kind == "snapshot" and not resync:
            gaps.append(f"event {position}: snapshot at revision {revision} without resync")
        elif kind == "snapshot" and revision <= previous:
            gaps.append(f"event {position}: resync snapshot at revision {revision} after revision {previous}")
    if gaps:
        problems.append(f"5: {len(gaps)} gaps or reorderings in the watch stream: " + "; ".join(gaps[:10])
                        + ("; ..." if len(gaps) > 10 else ""))
    for revision, expected in sorted(inventory_revisions.items()):
        if revision not in view_at:
            if events[-1][0] < revision:
                problems.append(f"5: the watch stream never reached revision {revision} (it is at {events[-1][0]})")
            else:
                print(f"note: revision {revision} was jumped over by a resync snapshot; its view is not compared")
            continue
        seen = view_at[revision]
        if seen != expected:
            problems.append(
                f"5: at revision {revision} the stream's view holds allocations the inventory does not "
                f"{sorted(seen - expected)} and misses {sorted(expected - seen)}")
    return problems


def wait_for_operations(client, operations):
    """Follows every operation to its end; returns the problems (one not ending is one)."""
    problems = []
    for operation_id, kind in sorted(operations.items()):
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline:
            state = client.watch_operation(operation_id)
            if state in TERMINAL:
                break
            time.sleep(0.5)
        if state not in TERMINAL:
            problems.append(
                f"operation {operation_id} ({kind}) has not ended 60 s after the load stopped: "
                f"state {op_state(state) if state is not None else 'unknown'}")
    return problems


def release_everything(client, inventory):
    """Invariant 2: detach what is attached, release every allocation; none may be left.

    The node is quiescent by now, so nothing should be in flight: an ABORTED answer gets one
    retry after a second, then counts as a failure."""
    problems = []

    def finish(allocation, detach=True):
        """Detaches (when attached) and releases; returns (method, code, details) of the first failure."""
        if detach and (allocation.attached or allocation.detaching):
            code, _, details = client.call("DetachVF", pb.DetachVFRequest(allocation_id=allocation.id))
            if code != C.OK:
                return "DetachVF", code, details
        code, _, details = client.call("ReleaseVF", pb.ReleaseVFRequest(allocation_id=allocation.id))
        return None if code == C.OK else ("ReleaseVF", code, details)

    failed = {}
    for allocation in sorted(inventory.allocations, key=lambda a: a.id):
        failure = finish(allocation)
        if failure:
            failed[allocation.id] = (allocation, failure)
    if any(code == C.ABORTED for _, (_, code, _) in failed.values()):
        time.sleep(1)
        for allocation_id, (allocation, failure) in list(failed.items()):
            if failure[1] == C.ABORTED:
                retried = finish(allocation, detach=failure[0] == "DetachVF")
                if retried:
                    failed[allocation_id] = (allocation, retried)
                else:
                    del failed[allocation_id]
    groups = collections.defaultdict(list)
    for allocation_id, (allocation, (method, code, details)) in sorted(failed.items()):
        groups[(method, code.name, details.replace(allocation_id, "<id>"))].append(allocation)
    for (method, code, details), allocations in sorted(groups.items()):
        problems.append(
            f"2: {len(allocations)} allocations cannot be released on the quiescent node: {method} -> {code}: "
            f"\"{details}\" for " + ", ".join(
                f"{a.id} (VF {a.vf_bdf}, key {a.idempotency_key or '-'}, attached={a.attached})" for a in allocations))
    code, after, details = client.call("GetInventory", pb.GetInventoryRequest())
    if code != C.OK:
        return problems + [f"2: GetInventory after the releases -> {code.name}: {details}"], None
    if after.allocations:
        problems.append(
            f"2: after releasing every allocation the node still has {len(after.allocations)}: "
            + ", ".join(f"{a.id} (VF {a.vf_bdf}, key {a.idempotency_key or '-'})" for a in after.allocations))
    left = {a.id for a in after.allocations}
    held = sorted(f"{vf.bdf} ({vf_state(vf.state)}, {vf.allocation_id or 'no allocation'})"
                  for card in after.cards for pf in card.pfs for vf in pf.vfs
                  if (vf.state in HELD or vf.allocation_id) and vf.allocation_id not in left)
    if held:
        problems.append(f"2: after the releases these VFs are held with no allocation left to name them: {', '.join(held)}")
    for vm in after.vms:
        if vm.free_root_ports != vm.root_ports:
            problems.append(
                f"2: after every detach VM {vm.name} still has {vm.root_ports - vm.free_root_ports} root ports occupied")
    return problems, after


def print_summary(recorder, workers, watcher, world, seconds):
    print(f"\n=== stress summary: {THREADS} threads, {seconds:.1f} s of load, base seed {BASE_SEED} ===")
    for worker in workers:
        print(f"thread-{worker.index:2d} seed {worker.seed}: {worker.client.rpcs} RPCs in {worker.elapsed:.1f} s; "
              + ", ".join(f"{name} {count}" for name, count in sorted(worker.operations.items())))
    methods = sorted({method for method, _ in recorder.counts})
    total = sum(recorder.counts.values())
    print(f"calls per method and status ({total} in all, load and checks):")
    for method in methods:
        statuses = sorted((code, n) for (m, code), n in recorder.counts.items() if m == method)
        print(f"  {method:16s} " + ", ".join(f"{code} {n}" for code, n in statuses))
    senders = dict(world.key_senders)
    print(f"shared idempotency keys: {len(senders)} used, {sum(1 for s in senders.values() if len(s) > 1)} of them "
          f"by two or more threads (each use sends two identical AllocateVF at once)")
    resyncs = sum(1 for _, kind, resync in watcher.events if kind == "snapshot" and resync)
    print(f"watch stream: {len(watcher.events)} events, last revision {watcher.revision}, {resyncs} resync snapshots")


def test_randomized_concurrent_load_keeps_the_invariants(agent):
    setup = Client(agent.tcp, "setup", Recorder())
    inventory = setup.stub.GetInventory(pb.GetInventoryRequest(), timeout=DEADLINE)
    accelerators = sorted(a.id for a in inventory.accelerators)
    assert len(accelerators) >= 2, f"the simulated node should have accelerators, has {accelerators}"
    assert {vm.name for vm in inventory.vms} >= set(VMS), f"the simulated node should have {VMS}"
    pfs = {pf.bdf for card in inventory.cards for pf in card.pfs}
    assert {DRAIN_PF, RECONF_PF} <= pfs
    setup.close()

    recorder = Recorder()
    world = World(accelerators)
    watcher = Watcher(agent.tcp)
    assert watcher.wait_for(inventory.revision, seconds=30), "the WatchInventory stream sent nothing"
    workers = [Worker(index, agent.tcp, world, recorder) for index in range(THREADS)]
    for worker in workers:
        print(f"thread-{worker.index} seed {worker.seed}")
    threads = [threading.Thread(target=worker.run, name=f"stress-{worker.index}") for worker in workers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    # LOAD_SECONDS, plus a few calls' deadlines: a thread still alive after that is stuck in a
    # call that its deadline did not end.
    give_up = started + LOAD_SECONDS + 3 * DEADLINE
    for thread in threads:
        thread.join(timeout=max(0.0, give_up - time.monotonic()))
    load_seconds = time.monotonic() - started
    problems = [f"thread {t.name} is still running {load_seconds:.0f} s after the load began" for t in threads if t.is_alive()]

    if agent.process.poll() is not None:
        log = open(os.path.join(agent.directory, "agent.log")).read()
        print_summary(recorder, workers, watcher, world, load_seconds)
        pytest.fail(f"fpga-agent exited with status {agent.process.returncode} under the load; log tail:\n{log[-4000:]}")

    checker = Client(agent.tcp, "checks", recorder)
    problems += wait_for_operations(checker, dict(world.operations))

    code, before, details = checker.call("GetInventory", pb.GetInventoryRequest())
    assert code == C.OK, f"GetInventory after the load -> {code.name}: {details}"
    code, listed, details = checker.call("ListContexts", pb.ListContextsRequest())
    assert code == C.OK, f"ListContexts after the load -> {code.name}: {details}"
    print(f"after the load: revision {before.revision}, {len(before.allocations)} allocations, "
          f"{len(listed.contexts)} contexts, {len(world.operations)} operations started")

    problems += check_allocations(before)
    answers = dict(world.key_answers)
    for key, seen in sorted(answers.items()):
        if len({allocation_id for allocation_id, _ in seen}) > 1:
            problems.append(
                f"4: AllocateVF calls with idempotency key {key} were answered with {len(seen)} different allocations: "
                + ", ".join(f"{a} (VF {vf})" for a, vf in sorted(seen)))
    for allocation in before.allocations:
        key = allocation.idempotency_key
        named = {allocation_id for allocation_id, _ in answers.get(key, ())}
        if key and allocation.id not in named:
            problems.append(
                f"4: allocation {allocation.id} (VF {allocation.vf_bdf}) carries idempotency key {key}, but no AllocateVF "
                f"with that key was answered with it (answers named: {', '.join(sorted(named)) or 'none'})")
    context_problems = check_contexts(before, listed.contexts)
    if any("bind" in text for text in context_problems):
        # The accelerators' guest lists are refreshed every metrics interval (2 s by default):
        # only a mismatch that outlives a refresh counts.
        time.sleep(2.5)
        code, again, _ = checker.call("GetInventory", pb.GetInventoryRequest())
        code2, relisted, _ = checker.call("ListContexts", pb.ListContextsRequest())
        if code == C.OK and code2 == C.OK:
            lasting = set(check_contexts(again, relisted.contexts))
            context_problems = [text for text in context_problems if "bind" not in text or text in lasting]
    problems += context_problems

    release_problems, after = release_everything(checker, before)
    problems += release_problems

    # The watch stream must have reached both inventories, with the same allocations.
    revisions = {before.revision: {a.id for a in before.allocations}}
    if after is not None:
        revisions[after.revision] = {a.id for a in after.allocations}
    watcher.wait_for(max(revisions), seconds=30)
    problems += check_watch(watcher, revisions)
    watcher.close()
    checker.close()

    # The final state's violations first, then what the threads saw during the load.
    problems = [f"test error: {text}" for text in recorder.crashes] + problems + recorder.observed
    problems += [f"unexpected status: {text}" for text in recorder.unexpected]
    # Grouped by invariant (the leading number), each group in the order found.
    problems.sort(key=lambda text: int(text[0]) if text[0].isdigit() else 0 if not text.startswith("unexpected") else 9)
    print_summary(recorder, workers, watcher, world, load_seconds)
    if agent.process.poll() is not None:
        problems.append(f"fpga-agent exited with status {agent.process.returncode} during the checks")
    if problems:
        print(f"\n{len(problems)} problems:")
        for problem in problems:
            print("  " + problem)
    shown, per_group = [], collections.Counter()
    for problem in problems:
        group = problem.split(":", 1)[0]
        per_group[group] += 1
        if per_group[group] <= 12:
            shown.append(problem)
    shown += [f"... and {n - 12} more '{group}:' lines (all printed on stdout)" for group, n in per_group.items() if n > 12]
    assert not problems, f"{len(problems)} invariant violations or unexpected statuses:\n" + "\n".join(shown)
