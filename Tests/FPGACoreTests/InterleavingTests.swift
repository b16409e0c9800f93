import FPGACore
import FPGASimulator
import Testing

/// Each test parks request A at a seam (store commit, sysfs, QMP, accelerator), sends request B
/// while A is in flight, then lets A go on, and checks that the node is as if the two had run
/// one after the other. No sleeping: every wait is on a gate or a task.
@Suite struct InterleavingTests {
  let pf = PCIAddress("0000:3b:00.0")!
  let acc0 = GatedNode.accelerators[0]
  let acc1 = GatedNode.accelerators[1]

  static func puts(_ changes: [StoreChange], _ match: (StoreChange) -> Bool) -> Bool { changes.contains(where: match) }

  static func isPutAllocation(_ change: StoreChange) -> Bool {
    if case .putAllocation = change { true } else { false }
  }

  static func isSetDrain(_ change: StoreChange) -> Bool {
    if case .setDrain = change { true } else { false }
  }

  static func isPutContext(_ change: StoreChange) -> Bool {
    if case .putContext = change { true } else { false }
  }

  // MARK: Idempotency keys

  @Test func retriesWithOneKeyWhileTheFirstIsInFlightGetItsResultAndLeakNothing() async throws {
    let n = try await GatedNode()
    n.store.gate.park { Self.puts($0, Self.isPutAllocation) }
    let request = AllocateRequest(meta: .init(idempotencyKey: "job-1"), owner: "o", constraints: .init(pf: pf))
    let first = Task { try await n.engine.allocate(request) }
    await n.store.gate.parked()
    let retries = (0..<15).map { _ in Task { try await n.engine.allocate(request) } }
    n.store.gate.open()
    let original = try await first.value
    for retry in retries {
      let replay = try await retry.value
      #expect(replay.allocation.id == original.allocation.id)
      #expect(replay.replayed)
    }
    let allocations = try await n.engine.snapshot().allocations
    #expect(allocations.map(\.id) == [original.allocation.id])
    let released = try await n.engine.release(ReleaseRequest(allocationID: original.allocation.id))
    #expect(released.allocation.id == original.allocation.id)
    #expect(try await n.engine.snapshot().allocations.isEmpty)
  }

  @Test func aFailedFirstRequestLetsTheWaitingRetryRunItself() async throws {
    let n = try await GatedNode()
    n.store.gate.park { Self.puts($0, Self.isPutAllocation) }
    let request = AllocateRequest(meta: .init(idempotencyKey: "job-2"), owner: "o")
    let first = Task { try await n.engine.allocate(request) }
    await n.store.gate.parked()
    n.store.inner.failNext(1)
    let retry = Task { try await n.engine.allocate(request) }
    n.store.gate.open()
    await #expect(throws: AgentError.self) { try await first.value }
    let result = try await retry.value
    #expect(!result.replayed)
    #expect(try await n.engine.snapshot().allocations.map(\.id) == [result.allocation.id])
  }

  @Test func aKeyInFlightForAnotherRequestIsInvalidArgumentAtOnce() async throws {
    let n = try await GatedNode()
    n.store.gate.park { Self.puts($0, Self.isPutAllocation) }
    let first = Task { try await n.engine.allocate(AllocateRequest(meta: .init(idempotencyKey: "k"), owner: "a")) }
    await n.store.gate.parked()
    await #expect(throws: AgentError.self) {
      try await n.engine.allocate(AllocateRequest(meta: .init(idempotencyKey: "k"), owner: "b"))
    }
    n.store.gate.open()
    _ = try await first.value
    #expect(try await n.engine.snapshot().allocations.count == 1)
  }

  @Test func everyMutationHonoursItsKey() async throws {
    let n = try await GatedNode()
    let meta = RequestMeta(idempotencyKey: "same")
    _ = try await n.engine.drain(.pf(pf), releaseUnattached: false, meta: .init())
    _ = try await n.engine.undrain(.pf(pf), meta: meta)
    await expectInvalid { _ = try await n.engine.undrain(.pf(PCIAddress("0000:3b:00.1")!), meta: meta) }
    let (context, _) = try await n.engine.registerContext(
      .init(meta: meta, acceleratorID: acc0, guest: "vm-1", function: "fft"))
    let (again, replayed) = try await n.engine.registerContext(
      .init(meta: meta, acceleratorID: acc0, guest: "vm-1", function: "fft"))
    #expect(again == context && replayed)
    await expectInvalid {
      _ = try await n.engine.registerContext(.init(meta: meta, acceleratorID: acc0, guest: "vm-2", function: "fft"))
    }
    _ = try await n.engine.setSharingPolicy(acceleratorID: acc0, policy: .init(overcommitLimit: 3), meta: meta)
    await expectInvalid {
      _ = try await n.engine.setSharingPolicy(acceleratorID: acc0, policy: .init(overcommitLimit: 5), meta: meta)
    }
    _ = try await n.engine.moveContext(context.id, to: acc1, meta: meta)
    await expectInvalid { _ = try await n.engine.moveContext(context.id, to: acc0, meta: meta) }
    _ = try await n.engine.switchContext(context.id, now: false, meta: meta)
    await expectInvalid { _ = try await n.engine.switchContext(context.id, now: true, meta: meta) }
    try await n.engine.deleteContext(context.id, meta: meta)
    try await n.engine.deleteContext(context.id, meta: meta)  // a retry: done already
    await expectInvalid { try await n.engine.deleteContext("ctx-000000000000", meta: meta) }
    let plan = try await n.engine.reconfigure(ReconfigureRequest(meta: meta, pf: pf, count: 4, dryRun: true))
    let replan = try await n.engine.reconfigure(ReconfigureRequest(meta: meta, pf: pf, count: 4, dryRun: true))
    #expect(plan.id == replan.id)
    await expectInvalid {
      _ = try await n.engine.reconfigure(ReconfigureRequest(meta: meta, pf: pf, count: 2, dryRun: true))
    }
  }

  @Test func plansNeverPushARealOperationOutOfReach() async throws {
    let n = try await GatedNode()
    let first = try await n.engine.reconfigure(
      ReconfigureRequest(meta: .init(idempotencyKey: "grow"), pf: pf, count: 8))
    await n.engine.waitForOperation(first.id)
    for count in 0..<1030 {
      _ = try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: count % 8, dryRun: true))
    }
    let since = try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 4))  // another change since
    await n.engine.waitForOperation(since.id)
    #expect(numVFs(n) == 4)
    let retry = try await n.engine.reconfigure(
      ReconfigureRequest(meta: .init(idempotencyKey: "grow"), pf: pf, count: 8))
    #expect(retry.id == first.id)
    #expect(retry.state == .succeeded)
  }

  // MARK: Reconfiguration

  @Test func aSecondReconfigurationOfThePFIsRefusedWhileTheFirstPlans() async throws {
    let n = try await GatedNode()
    n.platform.gate.park { $0 == "vfHolders" }
    let first = Task { try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 8)) }
    await n.platform.gate.parked()
    await #expect(throws: AgentError.self) { try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2)) }
    n.platform.gate.open()
    let record = try await first.value
    await n.engine.waitForOperation(record.id)
    #expect(try await n.engine.operation(record.id).state == .succeeded)
    #expect(numVFs(n) == 8)
  }

  @Test func noAllocationLandsOnAPFWhileItsReconfigurationPlans() async throws {
    let n = try await GatedNode()
    n.platform.gate.park { $0 == "vfHolders" }
    let first = Task { try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 0)) }
    await n.platform.gate.parked()
    await #expect(throws: AgentError.self) {
      try await n.engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf)))
    }
    let elsewhere = try await n.engine.allocate(AllocateRequest(owner: "o"))
    #expect(elsewhere.allocation.pf != pf)
    n.platform.gate.open()
    let record = try await first.value
    await n.engine.waitForOperation(record.id)
    #expect(try await n.engine.operation(record.id).state == .succeeded)
    #expect(try await n.engine.snapshot().allocations.map(\.id) == [elsewhere.allocation.id])
  }

  @Test func anAllocationInFlightIsNeverLeftOutOfAReconfigurationsImpacts() async throws {
    let n = try await GatedNode()
    n.store.gate.park { Self.puts($0, Self.isPutAllocation) }
    let allocating = Task { try await n.engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf))) }
    await n.store.gate.parked()
    await #expect(throws: AgentError.self) { try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 0)) }
    n.store.gate.open()
    let allocation = try await allocating.value.allocation
    let plan = try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 0, dryRun: true))
    #expect(plan.impacts.map(\.allocationID) == [allocation.id])
  }

  @Test func noAttachPlugsAVFOfAPFWhoseReconfigurationPlans() async throws {
    let n = try await GatedNode()
    let allocation = try await n.engine.allocate(AllocateRequest(owner: "o", vm: "vm-2", constraints: .init(pf: pf)))
      .allocation
    n.platform.gate.park { $0 == "vfHolders" }
    let first = Task { try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 0)) }
    await n.platform.gate.parked()
    await #expect(throws: AgentError.self) {
      try await n.engine.attach(AttachRequest(allocationID: allocation.id, vm: "vm-2"))
    }
    n.platform.gate.open()
    let record = try await first.value
    await n.engine.waitForOperation(record.id)
    let done = try await n.engine.operation(record.id)
    #expect(done.state == .succeeded)
    #expect(done.impacts.map { "\($0.allocationID) \($0.outcome)" } == ["\(allocation.id) lost"])
    #expect(try await n.engine.snapshot().allocations.isEmpty)
  }

  @Test func anAttachEndingDuringAReconfigurationLeavesThePFReserved() async throws {
    let n = try await GatedNode()
    let other = try await n.engine.allocate(
      AllocateRequest(owner: "o", vm: "vm-2", constraints: .init(pf: PCIAddress("0000:3b:00.1")!))
    ).allocation
    n.platform.gate.park { $0 == "setVFCount" }
    let record = try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 6))
    await n.platform.gate.parked()
    _ = try await n.engine.attach(AttachRequest(allocationID: other.id, vm: "vm-2"))  // on another PF: fine
    await #expect(throws: AgentError.self) {
      try await n.engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf)))
    }
    await #expect(throws: AgentError.self) { try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2)) }
    n.platform.gate.open()
    await n.engine.waitForOperation(record.id)
    #expect(try await n.engine.operation(record.id).state == .succeeded)
  }

  // MARK: Attach, detach, release

  @Test func releaseWhileAttachingIsAbortedAndTheAttachmentStands() async throws {
    let n = try await GatedNode()
    let allocation = try await n.engine.allocate(AllocateRequest(owner: "o", vm: "vm-1")).allocation
    n.hypervisor.gate.park { $0 == "attach" }
    let attaching = Task { try await n.engine.attach(AttachRequest(allocationID: allocation.id, vm: "vm-1")) }
    await n.hypervisor.gate.parked()
    await #expect(throws: AgentError.self) { try await n.engine.release(ReleaseRequest(allocationID: allocation.id)) }
    n.hypervisor.gate.open()
    #expect(try await attaching.value.allocation.attached)
    #expect(try await n.engine.snapshot().allocations.first?.attached == true)
  }

  @Test func releaseWhileDetachingIsAbortedThenSucceeds() async throws {
    let n = try await GatedNode()
    let allocation = try await n.engine.allocate(AllocateRequest(owner: "o", vm: "vm-1")).allocation
    _ = try await n.engine.attach(AttachRequest(allocationID: allocation.id, vm: "vm-1"))
    n.hypervisor.gate.park { $0 == "detach" }
    let detaching = Task { try await n.engine.detach(DetachRequest(allocationID: allocation.id)) }
    await n.hypervisor.gate.parked()
    await #expect(throws: AgentError.self) { try await n.engine.release(ReleaseRequest(allocationID: allocation.id)) }
    n.hypervisor.gate.open()
    _ = try await detaching.value
    _ = try await n.engine.release(ReleaseRequest(allocationID: allocation.id))
    #expect(try await n.engine.snapshot().allocations.isEmpty)
  }

  // MARK: Drains

  @Test func noAllocationIsAcknowledgedOnAPFWhileItsDrainIsWritten() async throws {
    let n = try await GatedNode()
    let idle = try await n.engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf))).allocation
    n.store.gate.park { Self.puts($0, Self.isSetDrain) }
    let draining = Task { try await n.engine.drain(.pf(pf), releaseUnattached: true, meta: .init()) }
    await n.store.gate.parked()
    await #expect(throws: AgentError.self) {
      try await n.engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf)))
    }
    n.store.gate.open()
    let record = try await draining.value
    #expect(record.impacts.map { "\($0.allocationID) \($0.outcome)" } == ["\(idle.id) lost"])
    #expect(try await n.engine.snapshot().allocations.filter { $0.pf == pf }.isEmpty)
  }

  // MARK: Contexts

  @Test func identicalRegistrationsAtOnceLeaveOneContext() async throws {
    let n = try await GatedNode()
    n.store.gate.park { Self.puts($0, Self.isPutContext) }
    let request = NodeEngine.RegisterContextRequest(acceleratorID: acc0, guest: "vm-1", function: "fft")
    let first = Task { try await n.engine.registerContext(request) }
    await n.store.gate.parked()
    for _ in 0..<3 {
      await #expect(throws: AgentError.self) { try await n.engine.registerContext(request) }
    }
    n.store.gate.open()
    let (record, replayed) = try await first.value
    #expect(!replayed)
    let (again, replay) = try await n.engine.registerContext(request)
    #expect(again == record && replay)
    #expect(await n.engine.listContexts().map(\.0.id) == [record.id])
  }

  @Test func aDeletionRacingAMoveNeverBringsTheContextBack() async throws {
    let n = try await GatedNode()
    let (record, _) = try await n.engine.registerContext(.init(acceleratorID: acc0, guest: "vm-1", function: "fft"))
    n.store.gate.park { Self.puts($0, Self.isPutContext) }
    let moving = Task { try await n.engine.moveContext(record.id, to: acc1, meta: .init()) }
    await n.store.gate.parked()
    await #expect(throws: AgentError.self) { try await n.engine.deleteContext(record.id, meta: .init()) }
    n.store.gate.open()
    _ = try await moving.value
    try await n.engine.deleteContext(record.id, meta: .init())
    #expect(await n.engine.listContexts().isEmpty)
    #expect(n.store.persisted.contexts.isEmpty)
  }

  @Test func aSwitchToTheLoadedContextReturns() async throws {
    let n = try await GatedNode()
    let (record, _) = try await n.engine.registerContext(.init(acceleratorID: acc0, guest: "vm-1", function: "fft"))
    _ = try await n.engine.switchContext(record.id, now: true, meta: .init())
    let again = try await n.engine.switchContext(record.id, now: true, meta: .init())
    #expect(again == .zero)
  }

  // MARK: Fencing

  @Test func aRefusedRequestRaisesNoEpoch() async throws {
    let n = try await GatedNode()
    await #expect(throws: AgentError.self) {
      try await n.engine.release(
        ReleaseRequest(meta: .init(orchestratorEpoch: .max), allocationID: "alloc-000000000000"))
    }
    #expect(await n.engine.highestEpoch == 0)
    #expect(n.store.persisted.epoch == 0)
    _ = try await n.engine.allocate(AllocateRequest(meta: .init(orchestratorEpoch: .max), owner: "o"))
    #expect(await n.engine.highestEpoch == .max)
    #expect(n.store.persisted.epoch == .max)
  }

  @Test func aStaleRetryIsRefusedEvenWhenItsKeyIsKnown() async throws {
    let n = try await GatedNode()
    let request = AllocateRequest(meta: .init(idempotencyKey: "k", orchestratorEpoch: 2), owner: "o")
    _ = try await n.engine.allocate(request)
    _ = try await n.engine.allocate(AllocateRequest(meta: .init(orchestratorEpoch: 3), owner: "o"))
    await #expect(throws: AgentError.self) { try await n.engine.allocate(request) }
  }

  func numVFs(_ n: GatedNode) -> Int? {
    n.node.scan().pfs.first { $0.function.address == pf }?.function.numVFs
  }

  func expectInvalid(_ body: () async throws -> Void) async {
    do {
      try await body()
      Issue.record("expected INVALID_ARGUMENT, got success")
    } catch let error as AgentError {
      #expect(error.code == .invalidArgument, "\(error)")
    } catch {
      Issue.record("unexpected \(error)")
    }
  }
}
