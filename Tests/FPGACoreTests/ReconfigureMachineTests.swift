import FPGACore
import FPGASimulator
import Testing

/// The reconfiguration's transition table, driven by hand: no engine, no simulator, no store.
/// The live run and recovery share it, so these cases cover both.
@Suite struct ReconfigureMachineTests {
  let pf = PCIAddress("0000:3b:00.0")!
  let t = WallTime(seconds: 1_800_000_000)

  /// plan, pause a (vm-1), detach b (vm-2), write 0, write 2, verify, bind a, bind b, resume a,
  /// reattach b, commit.
  func machine() -> ReconfigureMachine {
    let actions: [ReconfigureAction] = [
      .init(kind: .plan, count: 2),
      .init(kind: .pause, allocationID: "alloc-a", vm: "vm-1", vf: PCIAddress("0000:3b:00.4")),
      .init(kind: .detach, allocationID: "alloc-b", vm: "vm-2", vf: PCIAddress("0000:3b:00.5")),
      .init(kind: .writeZero), .init(kind: .writeCount, count: 2), .init(kind: .verify, count: 2),
      .init(kind: .bind, vf: PCIAddress("0000:3b:00.4")), .init(kind: .bind, vf: PCIAddress("0000:3b:00.5")),
      .init(kind: .resume, allocationID: "alloc-a", vm: "vm-1", vf: PCIAddress("0000:3b:00.4")),
      .init(kind: .reattach, allocationID: "alloc-b", vm: "vm-2", vf: PCIAddress("0000:3b:00.5")),
      .init(kind: .commit),
    ]
    var record = OperationRecord(
      id: "op-1", kind: "reconfigure", target: pf.description, state: .running,
      steps: actions.map { .init(description: $0.kind.rawValue, state: .pending) }, createdAt: t)
    record.steps[0].state = .succeeded
    return ReconfigureMachine(
      record: record, journal: ReconfigureJournal(pf: pf, from: 4, to: 2, strategy: .auto, actions: actions))
  }

  /// Runs steps until `stop` (a kind) is next, returning the kinds run.
  @discardableResult
  func run(_ machine: inout ReconfigureMachine, until stop: ReconfigureAction.Kind? = nil) -> [ReconfigureAction.Kind] {
    var kinds: [ReconfigureAction.Kind] = []
    while true {
      var probe = machine
      guard case .run(_, let action) = probe.start(at: t), action.kind != stop else { return kinds }
      machine = probe
      machine.succeeded(at: t)
      kinds.append(action.kind)
    }
  }

  @Test func aSmoothRunGoesThroughEveryStepAndEnds() {
    var m = machine()
    let kinds = run(&m)
    #expect(kinds == [.pause, .detach, .writeZero, .writeCount, .verify, .bind, .bind, .resume, .reattach, .commit])
    #expect(m.record.state == .succeeded && m.isFinished)
    #expect(m.stored.journal == nil)
    var done = m
    #expect(done.start(at: t) == .finished)
  }

  @Test func aFailureBeforeTheCountWriteRollsBackWhatHappened() {
    var m = machine()
    run(&m, until: .detach)
    guard case .run(_, let action) = m.start(at: t) else {
      Issue.record("no step")
      return
    }
    #expect(action.kind == .detach)
    m.failed("the guest did not acknowledge the unplug", at: t)
    #expect(m.journal.rollingBack)
    #expect(m.record.error?.contains("rolled back") == true)
    // The uncertain detach is undone tolerantly (bind, re-attach), then the pause (resume).
    #expect(m.journal.actions.suffix(4).map(\.tolerant) == [true, true, false, false])
    let undo = run(&m)
    #expect(undo == [.bind, .reattach, .resume, .commit])
    #expect(m.record.state == .failed)
    #expect(m.record.steps.filter { $0.error == "skipped: rolled back" }.count == 8)
  }

  @Test func aFailedZeroWriteCountsAsBegunAndRestoresTheOldCount() {
    var m = machine()
    run(&m, until: .writeZero)
    _ = m.start(at: t)
    m.failed("EIO", at: t)
    #expect(m.record.error?.contains("restored 4 VFs") == true)
    #expect(run(&m) == [.writeCount, .verify, .bind, .resume, .bind, .reattach, .commit])
  }

  @Test func aFailedCountWriteRestoresTheOldCount() {
    var m = machine()
    run(&m, until: .writeCount)
    _ = m.start(at: t)
    m.failed("ENOMEM", at: t)
    #expect(m.record.error?.contains("restored 4 VFs") == true)
    var next = m
    guard case .run(_, let action) = next.start(at: t) else {
      Issue.record("no step")
      return
    }
    #expect(action.kind == .writeCount && action.count == 4)
    #expect(run(&m) == [.writeCount, .verify, .bind, .resume, .bind, .reattach, .commit])
    #expect(m.record.state == .failed)
  }

  @Test func aFailedUndoIsNotedAndTheRollbackGoesOn() {
    var m = machine()
    run(&m, until: .detach)
    _ = m.start(at: t)
    m.failed("timeout", at: t)
    _ = m.start(at: t)  // bind (tolerant)
    m.failed("busy", at: t)
    #expect(run(&m) == [.reattach, .resume, .commit])
    #expect(m.record.state == .failed)
  }

  @Test func recoveryBeforeTheCountWriteRollsBackAndRerunsTheUncertainStep() {
    var m = machine()
    run(&m, until: .detach)
    _ = m.start(at: t)  // the detach was running when the agent died
    let recovered = ReconfigureMachine(recovering: m.stored)
    #expect(recovered?.journal.rollingBack == true)
    var r = recovered!
    // The uncertain detach is undone tolerantly, the pause for sure.
    let steps = r.journal.actions.suffix(4)
    #expect(steps.map(\.kind) == [.bind, .reattach, .resume, .commit])
    #expect(steps.map(\.tolerant) == [true, true, false, false])
    #expect(run(&r) == [.bind, .reattach, .resume, .commit])
  }

  @Test func recoveryAfterTheCountWriteRollsForward() {
    var m = machine()
    run(&m, until: .writeCount)
    _ = m.start(at: t)  // the count write was running
    var r = ReconfigureMachine(recovering: m.stored)!
    #expect(!r.journal.rollingBack && r.record.error == nil)
    #expect(run(&r) == [.writeCount, .verify, .bind, .bind, .resume, .reattach, .commit])
    #expect(r.record.state == .succeeded)
  }

  @Test func anEndedOperationNeedsNoRecovery() {
    var m = machine()
    run(&m)
    #expect(ReconfigureMachine(recovering: m.stored) == nil)
  }

  @Test func aBlockedWriteIsShownOnTheRunningStep() {
    var m = machine()
    run(&m, until: .writeZero)
    _ = m.start(at: t)
    m.waiting("VF 0000:3b:00.6 is held by pid 7")
    #expect(m.record.steps[3].error == "waiting: VF 0000:3b:00.6 is held by pid 7")
    m.succeeded(at: t)
    #expect(m.record.steps[3].error == nil)
  }
}

/// A shutdown stops a reconfiguration at its step without calling it failed; the next start
/// takes it up from the journal.
@Suite struct ShutdownTests {
  @Test func closeStopsAnOperationMidStepAndTheNextStartTakesItUp() async throws {
    let pf = PCIAddress("0000:3b:00.0")!
    let store = MemoryStateStore()
    let node = SimulatedNode()
    let silent = SimulatedHypervisor(node: node, vms: [.init(name: "silent", acknowledgesUnplug: false)])
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node), clock: StillClock(), hypervisor: silent, store: store,
      detachTimeout: .seconds(3600))
    _ = try await engine.restore()
    try await engine.rescan()
    let allocation = try await engine.allocate(AllocateRequest(owner: "o", vm: "silent", constraints: .init(pf: pf)))
      .allocation
    _ = try await engine.attach(AttachRequest(allocationID: allocation.id, vm: "silent"))
    let record = try await engine.reconfigure(ReconfigureRequest(pf: pf, count: 0, strategy: .detachReattach))
    for await update in try await engine.watchOperation(record.id)
    where update.steps.contains(where: { $0.state == .running && $0.description.hasPrefix("detach") }) {
      break
    }
    await engine.close()  // returns although the guest never acknowledges
    let stored = try #require(store.persisted.operations.first { $0.record.id == record.id })
    #expect(stored.journal != nil)
    #expect(stored.record.state == .running)
    #expect(stored.record.steps.contains { $0.state == .running && $0.description.hasPrefix("detach") })

    let again = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node), clock: StillClock(),
      hypervisor: SimulatedHypervisor(node: node), store: store)
    let persisted = try await again.restore()
    try await again.rescan()
    #expect(await again.recover(from: persisted) == [record.id])
    await again.waitForOperation(record.id)
    let finished = try await again.operation(record.id)
    #expect(finished.state == .failed)
    #expect(finished.error?.contains("rolled back at restart") == true)
  }
}
