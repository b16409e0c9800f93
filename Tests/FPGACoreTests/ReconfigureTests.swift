import FPGACore
import FPGASimulator
import Testing

/// Reconfiguration on the simulated node with simulated VMs: a plugged VF holds its
/// /dev/vfio/N open, so the simulated kernel blocks a write of 0 until every VF is released,
/// as vfio-pci does. vm-1's VMM can pause VFIO devices, vm-2's cannot.
@Suite struct ReconfigureTests {
  let pf = PCIAddress("0000:3b:00.0")!

  struct Fixture {
    let engine: NodeEngine
    let node: SimulatedNode
    let hypervisor: SimulatedHypervisor
    let store: MemoryStateStore
    /// Attached to vm-1 (index 0), attached to vm-2 (index 1), unattached (index 2).
    let paused: Allocation
    let replugged: Allocation
    let idle: Allocation
  }

  func fixture(
    store: MemoryStateStore = MemoryStateStore(), faults: FaultInjection? = nil, refusingResumeIn: Set<String> = []
  ) async throws -> Fixture {
    let node = SimulatedNode()
    let hypervisor = SimulatedHypervisor(node: node)
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node, blockReportDelay: .milliseconds(50)), clock: StillClock(),
      hypervisor: ResumeRefusingHypervisor(hypervisor, refusingIn: refusingResumeIn), store: store, faults: faults)
    try await engine.rescan()
    var made: [Allocation] = []
    for vm in ["vm-1", "vm-2", nil] {
      let result = try await engine.allocate(AllocateRequest(owner: "team", vm: vm, constraints: .init(pf: pf)))
      if let vm { _ = try await engine.attach(AttachRequest(allocationID: result.allocation.id, vm: vm)) }
      made.append(result.allocation)
    }
    return Fixture(
      engine: engine, node: node, hypervisor: hypervisor, store: store, paused: made[0], replugged: made[1],
      idle: made[2])
  }

  func numVFs(_ node: SimulatedNode) -> Int {
    node.scan().pfs.first { $0.function.address == pf }!.function.numVFs
  }

  @Test func theDryRunTellsWhatEachGuestSeesAndChangesNothing() async throws {
    let f = try await fixture()
    let writes = f.node.writeLog.count
    let plan = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2, dryRun: true))
    #expect(plan.state == .planned)
    #expect(
      plan.impacts.map { "\($0.allocationID) \($0.outcome) \($0.guestSees)" } == [
        "\(f.paused.id) kept-paused pause", "\(f.replugged.id) kept-reattached unplug and replug",
        "\(f.idle.id) lost nothing",
      ])
    #expect(
      plan.steps.map(\.description).map { String($0.prefix(while: { $0 != " " })) } == [
        "plan", "pause", "detach", "write", "write", "end", "verify", "bind", "bind", "resume", "re-attach", "commit",
      ])
    #expect(f.node.writeLog.count == writes)
    #expect(numVFs(f.node) == 16)
    #expect(f.store.persisted.operations.isEmpty)
  }

  @Test func autoPausesWhereItCanAndReplugsElsewhere() async throws {
    let f = try await fixture()
    let started = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2))
    await f.engine.waitForOperation(started.id)
    let done = try await f.engine.operation(started.id)
    #expect(done.state == .succeeded, "\(done)")
    #expect(done.steps.allSatisfy { $0.state == .succeeded })
    #expect(numVFs(f.node) == 2)
    let snapshot = try await f.engine.snapshot()
    let byID = Dictionary(uniqueKeysWithValues: snapshot.allocations.map { ($0.id, $0) })
    #expect(byID[f.paused.id]?.attached == true && byID[f.paused.id]?.vm == "vm-1")
    #expect(byID[f.replugged.id]?.attached == true && byID[f.replugged.id]?.vm == "vm-2")
    #expect(byID[f.idle.id] == nil)
    #expect(byID[f.paused.id]?.lastRelayout == Relayout(how: .paused, operationID: started.id, at: StillClock().now()))
    #expect(byID[f.replugged.id]?.lastRelayout?.how == .replugged)
    // Both VFs are open in their VMs again (the simulated kernel says who holds what).
    #expect(Set(f.node.holders(of: pf).map(\.vm)) == ["vm-1", "vm-2"])
    // The store agrees, and the journal is closed.
    #expect(Set(f.store.persisted.allocations.map(\.id)) == [f.paused.id, f.replugged.id])
    #expect(f.store.persisted.operations.last?.journal == nil)
    // The PF is free for the next change.
    #expect(try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 8, dryRun: true)).state == .planned)
  }

  @Test func detachReattachUnplugsEveryGuest() async throws {
    let f = try await fixture()
    let started = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 4, strategy: .detachReattach))
    #expect(started.impacts.filter { $0.guestSees == "unplug and replug" }.count == 2)
    await f.engine.waitForOperation(started.id)
    #expect(try await f.engine.operation(started.id).state == .succeeded)
    #expect(numVFs(f.node) == 4)
    #expect(try await f.engine.snapshot().allocations.count == 3)  // the idle one's VF index 2 < 4
  }

  @Test func pauseAndRefuseIfDisruptiveRefuseWhatTheyMust() async throws {
    let f = try await fixture()
    for strategy in [ReconfigureStrategy.pause, .refuseIfDisruptive] {
      await #expect {
        _ = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2, strategy: strategy))
      } throws: { error in
        let error = error as! AgentError
        return error.code == .failedPrecondition && error.message.contains("VM vm-2 holds \(f.replugged.id)")
      }
    }
    #expect(numVFs(f.node) == 16)
    _ = try await f.engine.detach(DetachRequest(allocationID: f.replugged.id))
    let started = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 3, strategy: .refuseIfDisruptive))
    await f.engine.waitForOperation(started.id)
    #expect(try await f.engine.operation(started.id).state == .succeeded)
    #expect(numVFs(f.node) == 3)
  }

  @Test func aFailedCountWriteRestoresTheOldLayoutAndEveryGuest() async throws {
    let f = try await fixture(faults: FaultInjection(effect: .fail, kind: .writeCount) { _ in fatalError() })
    let started = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2))
    await f.engine.waitForOperation(started.id)
    let done = try await f.engine.operation(started.id)
    #expect(done.state == .failed)
    #expect(done.error?.contains("restored 16 VFs") == true)
    #expect(numVFs(f.node) == 16)
    let allocations = try await f.engine.snapshot().allocations
    #expect(Set(allocations.map(\.id)) == [f.paused.id, f.replugged.id, f.idle.id])
    #expect(allocations.filter(\.attached).count == 2)
    #expect(Set(f.node.holders(of: pf).map(\.vm)) == ["vm-1", "vm-2"])
  }

  @Test func aFailureBeforeAnyCountWriteRollsBack() async throws {
    let f = try await fixture(faults: FaultInjection(effect: .fail, kind: .detach) { _ in fatalError() })
    let started = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2))
    await f.engine.waitForOperation(started.id)
    let done = try await f.engine.operation(started.id)
    #expect(done.state == .failed)
    #expect(
      done.steps.contains {
        $0.description.hasPrefix("roll back: resume device \(f.paused.id)") && $0.state == .succeeded
      })
    #expect(numVFs(f.node) == 16)
    #expect(!f.node.writeLog.contains { $0.hasSuffix("sriov_numvfs=0") })
    #expect(try await f.engine.snapshot().allocations.filter(\.attached).count == 2)
  }

  /// A VF a VM holds outside the agent's knowledge (cold-plugged): the write of 0 blocks; the
  /// agent keeps answering, shows who holds what, and finishes once the holder lets go.
  @Test func aBlockedWriteIsReportedAndCompletesWhenTheHolderLetsGo() async throws {
    let node = SimulatedNode()
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node, blockReportDelay: .milliseconds(20)), clock: StillClock())
    try await engine.rescan()
    let cold = node.scan().pfs.first { $0.function.address == pf }!.vfs[5].address
    _ = try await SimulatedPlatform(node: node).prepareForPassthrough(vf: cold)
    try node.hold(vf: cold, by: "cold-vm")
    let plan = try await engine.reconfigure(ReconfigureRequest(pf: pf, count: 1, dryRun: true))
    #expect(
      plan.steps.contains {
        $0.description.contains("the kernel will block it until VF \(cold) is released by VM cold-vm")
      })
    let started = try await engine.reconfigure(ReconfigureRequest(pf: pf, count: 1))
    var waiting: String?
    for _ in 0..<500 where waiting == nil {
      try await Task.sleep(for: .milliseconds(10))
      waiting = try await engine.operation(started.id).steps.first { $0.state == .running }?.error
    }
    #expect(waiting?.contains("VF \(cold) held by VM cold-vm") == true)
    #expect(await engine.status().revision > 0)  // still answering
    node.release(vf: cold)
    await engine.waitForOperation(started.id)
    #expect(try await engine.operation(started.id).state == .succeeded)
    #expect(numVFs(node) == 1)
  }

  /// What a crash right after the write of 0 leaves: the next start rolls forward.
  @Test func anOperationCutAfterTheWriteOfZeroIsRolledForwardAtStart() async throws {
    let store = MemoryStateStore()
    let f = try await fixture(store: store)
    let plan = try await f.engine.reconfigure(
      ReconfigureRequest(pf: pf, count: 2, strategy: .detachReattach, dryRun: true))
    // Replay the first steps by hand on the "hardware", as the dead agent had done.
    try await f.hypervisor.detach(deviceID: f.paused.id, from: "vm-1", timeout: .seconds(1))
    try await f.hypervisor.detach(deviceID: f.replugged.id, from: "vm-2", timeout: .seconds(1))
    try await SimulatedPlatform(node: f.node).setVFCount(pf: pf, to: 0) { _ in }
    var record = plan
    record.state = .running
    for index in record.steps.indices { record.steps[index].state = index <= 3 ? .succeeded : .pending }
    record.steps[4].state = .running  // write 2: unknown whether it happened
    let actions: [ReconfigureAction] = [
      .init(kind: .plan), .init(kind: .detach, allocationID: f.paused.id, vm: "vm-1", vf: f.paused.vf),
      .init(kind: .detach, allocationID: f.replugged.id, vm: "vm-2", vf: f.replugged.vf), .init(kind: .writeZero),
      .init(kind: .writeCount, count: 2), .init(kind: .release, allocationID: f.idle.id, vf: f.idle.vf),
      .init(kind: .verify, count: 2), .init(kind: .bind, vf: f.paused.vf), .init(kind: .bind, vf: f.replugged.vf),
      .init(kind: .reattach, allocationID: f.paused.id, vm: "vm-1", vf: f.paused.vf),
      .init(kind: .reattach, allocationID: f.replugged.id, vm: "vm-2", vf: f.replugged.vf), .init(kind: .commit),
    ]
    #expect(actions.count == record.steps.count)
    var detached = [f.paused, f.replugged]
    for index in detached.indices {
      detached[index].attached = false
      detached[index].deviceID = nil
      detached[index].rootPort = nil
    }
    try await store.commit(
      detached.map { .putAllocation($0) } + [
        .putOperation(
          StoredOperation(
            record: record,
            journal: ReconfigureJournal(pf: pf, from: 16, to: 2, strategy: .detachReattach, actions: actions)))
      ])

    let restarted = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: f.node), clock: StillClock(), hypervisor: f.hypervisor,
      store: store)
    let persisted = try await restarted.restore()
    try await restarted.rescan()
    let taken = await restarted.recover(from: persisted)
    #expect(taken == [plan.id])
    await restarted.waitForOperation(plan.id)
    #expect(try await restarted.operation(plan.id).state == .succeeded)
    #expect(numVFs(f.node) == 2)
    let allocations = try await restarted.snapshot().allocations
    #expect(Set(allocations.filter(\.attached).map(\.id)) == [f.paused.id, f.replugged.id])
    #expect(allocations.count == 2)
    #expect(store.persisted.operations.allSatisfy { $0.journal == nil })
    #expect(await restarted.reconcile().isEmpty)
  }

  /// The VMM refuses to resume the paused device (its new VF differs, is missing, or is not
  /// bound to vfio-pci): that device alone is unplugged and plugged again, journaled as steps of
  /// the operation, which still succeeds; the other guest is untouched by the fallback.
  @Test func aRefusedResumeFallsBackToAReplugOfThatDeviceOnly() async throws {
    let store = MemoryStateStore()
    let f = try await fixture(store: store, refusingResumeIn: ["vm-1"])
    let started = try await f.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2))
    await f.engine.waitForOperation(started.id)
    let done = try await f.engine.operation(started.id)
    #expect(done.state == .succeeded, "\(done)")
    #expect(done.error == nil)
    let resume = try #require(done.steps.first { $0.description.hasPrefix("resume device \(f.paused.id)") })
    #expect(resume.state == .failed)
    #expect(resume.error?.contains("the device is unplugged and plugged again instead") == true)
    let fallback = done.steps.filter { $0.description.hasPrefix("fall back: ") }
    #expect(fallback.map(\.state) == [.succeeded, .succeeded, .succeeded])
    #expect(fallback.first?.description.contains("detach \(f.paused.id)") == true)
    #expect(fallback.last?.description.contains("re-attach \(f.paused.id)") == true)
    #expect(done.steps.last?.description == "commit")
    let snapshot = try await f.engine.snapshot()
    let byID = Dictionary(uniqueKeysWithValues: snapshot.allocations.map { ($0.id, $0) })
    let relaid = try #require(byID[f.paused.id])
    #expect(relaid.attached && relaid.vm == "vm-1")
    #expect(relaid.lastRelayout?.how == .replugFallback)
    #expect(relaid.lastRelayout?.detail?.contains("refused by test") == true)
    #expect(byID[f.replugged.id]?.lastRelayout?.how == .replugged)
    #expect(Set(f.node.holders(of: pf).map(\.vm)) == ["vm-1", "vm-2"])
    // What a restart would read agrees.
    #expect(store.persisted.allocations.first { $0.id == f.paused.id }?.lastRelayout?.how == .replugFallback)
    #expect(store.persisted.operations.last?.journal == nil)
  }

  /// A crash inside the fallback (after its detach): the next start carries on with the replug.
  @Test func aCrashDuringTheFallbackIsRolledForwardWithTheReplug() throws {
    let a = "alloc-1"
    let vf = PCIAddress("0000:3b:00.1")!
    let actions: [ReconfigureAction] = [
      .init(kind: .plan), .init(kind: .pause, allocationID: a, vm: "vm-1", vf: vf), .init(kind: .writeZero),
      .init(kind: .writeCount, count: 2), .init(kind: .verify, count: 2), .init(kind: .bind, vf: vf),
      .init(kind: .resume, allocationID: a, vm: "vm-1", vf: vf), .init(kind: .commit),
    ]
    let record = OperationRecord(
      id: "op-1", kind: "reconfigure", target: pf.description, state: .running,
      steps: actions.map { .init(description: $0.kind.rawValue, state: .pending) }, impacts: [],
      createdAt: StillClock().now())
    var machine = ReconfigureMachine(
      record: record, journal: ReconfigureJournal(pf: pf, from: 16, to: 2, strategy: .auto, actions: actions))
    for _ in 0..<6 {
      guard case .run = machine.start(at: StillClock().now()) else { Issue.record("ended early"); return }
      machine.succeeded(at: StillClock().now())
    }
    guard case .run(let index, let action) = machine.start(at: StillClock().now()) else { return }
    #expect(index == 6 && action.kind == .resume)
    machine.failed("host device missing; the device stays paused", at: StillClock().now())
    #expect(
      machine.journal.actions.map(\.kind) == actions.map(\.kind).dropLast() + [.detach, .bind, .reattach, .commit])
    #expect(machine.journal.replacedResumes == [6])
    guard case .run(let detach, _) = machine.start(at: StillClock().now()) else { return }
    #expect(detach == 7)
    machine.succeeded(at: StillClock().now())
    // The agent dies here; the journal is what a restart reads.
    let restarted = try #require(ReconfigureMachine(recovering: machine.stored))
    #expect(!restarted.journal.rollingBack)
    var resumed = restarted
    var kinds: [ReconfigureAction.Kind] = []
    while case .run(_, let next) = resumed.start(at: StillClock().now()) {
      kinds.append(next.kind)
      resumed.succeeded(at: StillClock().now())
    }
    #expect(kinds == [.bind, .reattach, .commit])
    #expect(resumed.record.state == .succeeded)
  }
}

/// The simulated hypervisor, with a VMM that refuses to resume paused devices in some VMs.
final class ResumeRefusingHypervisor: Hypervisor {
  let inner: SimulatedHypervisor
  let refusing: Set<String>

  init(_ inner: SimulatedHypervisor, refusingIn vms: Set<String>) {
    self.inner = inner
    self.refusing = vms
  }

  var passesThroughVFIO: Bool { inner.passesThroughVFIO }
  func machines() async -> [VirtualMachineInfo] { await inner.machines() }
  func attach(vf: PCIAddress, to vm: String, deviceID: String) async throws(AgentError) -> String {
    try await inner.attach(vf: vf, to: vm, deviceID: deviceID)
  }
  func detach(deviceID: String, from vm: String, timeout: Duration) async throws(AgentError) {
    try await inner.detach(deviceID: deviceID, from: vm, timeout: timeout)
  }
  func pluggedDevices() async -> [PluggedDevice] { await inner.pluggedDevices() }
  func pause(deviceID: String, in vm: String) async throws(AgentError) {
    try await inner.pause(deviceID: deviceID, in: vm)
  }
  func resume(deviceID: String, in vm: String) async throws(AgentError) {
    if refusing.contains(vm) {
      throw AgentError(.failedPrecondition, "x-vfio-resume of \(deviceID) refused by test; the device stays paused")
    }
    try await inner.resume(deviceID: deviceID, in: vm)
  }
}
