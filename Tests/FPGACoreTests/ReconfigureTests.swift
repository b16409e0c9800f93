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

  func fixture(store: MemoryStateStore = MemoryStateStore(), faults: FaultInjection? = nil) async throws -> Fixture {
    let node = SimulatedNode()
    let hypervisor = SimulatedHypervisor(node: node)
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node, blockReportDelay: .milliseconds(50)), clock: StillClock(),
      hypervisor: hypervisor, store: store, faults: faults)
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
}
