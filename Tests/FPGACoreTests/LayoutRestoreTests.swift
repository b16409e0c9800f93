import FPGACore
import FPGASimulator
import Synchronization
import Testing

/// A store that keeps what it held after every commit, so a test can restart an engine from any
/// moment of a run (as a SIGKILL between two commits would leave it).
final class SnapshotStore: StateStore {
  let inner = MemoryStateStore()
  let snapshots = Mutex<[PersistedState]>([])

  func load() throws(AgentError) -> PersistedState { try inner.load() }

  func commit(_ changes: [StoreChange]) async throws(AgentError) {
    try await inner.commit(changes)
    let now = inner.persisted
    snapshots.withLock { $0.append(now) }
  }
}

/// Layouts that survive a host reboot: the simulated kernel's `reboot()` takes every PF back to
/// 0 VFs with a new boot id; an engine started on the same store re-creates what it recorded.
@Suite struct LayoutRestoreTests {
  static let pf0 = PCIAddress("0000:3b:00.0")!
  static let pf1 = PCIAddress("0000:3b:00.1")!

  static func node() -> SimulatedNode {
    SimulatedNode(
      config: SimulatorConfig(cards: [.init(bus: 0x3b, numaNode: 0, enabledVFs: [4, 2, 0, 0], bindToVFIO: false)]))
  }

  /// The agent's start-up sequence (AgentRuntime.run): restore, layouts, scan, recover, reconcile.
  static func start(
    _ node: SimulatedNode, _ store: any StateStore, restoreOnBoot: Bool = true, hypervisor: (any Hypervisor)? = nil
  ) async throws -> (NodeEngine, LayoutRestoreReport) {
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node), clock: StillClock(), hypervisor: hypervisor, store: store)
    let persisted = try await engine.restore()
    let report = await engine.restoreLayouts(persisted, enabled: restoreOnBoot)
    try await engine.rescan()
    for id in await engine.recover(from: persisted) { await engine.waitForOperation(id) }
    await engine.reconcile()
    return (engine, report)
  }

  @Test func aRebootReCreatesTheRecordedLayoutsAndKeepsTheAllocations() async throws {
    let node = Self.node()
    let store = MemoryStateStore()
    let (first, report) = try await Self.start(node, store)
    #expect(!report.rebooted && report.bootID == node.bootID())
    let a = try await first.allocate(AllocateRequest(owner: "a", constraints: .init(pf: Self.pf0))).allocation
    let b = try await first.allocate(AllocateRequest(owner: "b", constraints: .init(pf: Self.pf1))).allocation
    // The operator grows PF1 to 3: the record follows.
    let grow = try await first.reconfigure(ReconfigureRequest(pf: Self.pf1, count: 3))
    await first.waitForOperation(grow.id)
    #expect(store.persisted.layouts[Self.pf0]?.numVFs == 4)
    #expect(store.persisted.layouts[Self.pf1]?.numVFs == 3)
    let before = try await first.snapshot()
    let bootBefore = node.bootID()

    node.reboot()
    #expect(node.scan().pfs.allSatisfy { $0.vfs.isEmpty } && node.bootID() != bootBefore)
    let (second, restored) = try await Self.start(node, store)
    #expect(restored.rebooted && restored.previousBootID == bootBefore)
    #expect(restored.pfs.map(\.result) == [.restored, .restored])
    #expect(restored.pfs.map(\.recorded) == [4, 3] && restored.pfs.map(\.found) == [0, 0])
    #expect(restored.pfs.map(\.allocationsKept) == [1, 1] && restored.pfs.map(\.vfsBound) == [1, 1])
    // The same VFs, the same allocations on them, bound to vfio-pci again.
    let after = try await second.snapshot()
    #expect(after.allocations.map(\.id).sorted() == [a.id, b.id].sorted())
    #expect(after.allocations.first { $0.id == a.id }?.vf == a.vf)
    #expect(after.cards[0].pfs.map(\.function.numVFs) == before.cards[0].pfs.map(\.function.numVFs))
    let scan = node.scan()
    for allocation in [a, b] {
      let vf = scan.pfs.flatMap(\.vfs).first { $0.address == allocation.vf }
      #expect(vf?.driver == "vfio-pci")
    }
    // One journaled operation per PF, kind restore, succeeded; findings and status say so.
    let operations = await second.recentOperations(100).filter { $0.kind == "restore" }
    #expect(operations.count == 2 && operations.allSatisfy { $0.state == .succeeded })
    let status = await second.status()
    #expect(status.findings.contains { $0.hasPrefix("the host rebooted since the last run") })
    #expect(status.layoutRestore?.rebooted == true)
    #expect(await second.endedAllocations.isEmpty)

    // A plain restart (same boot) restores nothing.
    let (_, again) = try await Self.start(node, store)
    #expect(!again.rebooted && again.pfs.isEmpty)
  }

  @Test func withRestoreOffTheRebootEndsTheAllocationsAsBefore() async throws {
    let node = Self.node()
    let store = MemoryStateStore()
    let (first, _) = try await Self.start(node, store)
    let a = try await first.allocate(AllocateRequest(owner: "a", constraints: .init(pf: Self.pf0))).allocation
    node.reboot()
    let (second, report) = try await Self.start(node, store, restoreOnBoot: false)
    #expect(report.rebooted && report.pfs.map(\.result) == [.skipped, .skipped])
    #expect(report.pfs[0].error == "layout.restore_on_boot is off")
    #expect(try await second.snapshot().allocations.isEmpty)
    #expect(await second.status().findings.contains { $0.contains(a.id) && $0.contains("ended") })
    // The layouts found are recorded now: a later reboot restores nothing more.
    #expect(store.persisted.layouts[Self.pf0]?.numVFs == 0)
  }

  @Test func aPFWhoseRestoreFailsIsReportedAndTheOtherIsRestored() async throws {
    let node = Self.node()
    let store = MemoryStateStore()
    let (first, _) = try await Self.start(node, store)
    let a = try await first.allocate(AllocateRequest(owner: "a", constraints: .init(pf: Self.pf0))).allocation
    _ = try await first.allocate(AllocateRequest(owner: "b", constraints: .init(pf: Self.pf1)))
    node.reboot()
    // PF1 comes back without its driver: its VF count cannot be written.
    node.setPFDriver(Self.pf1, nil)
    let (second, report) = try await Self.start(node, store)
    #expect(report.pfs.map(\.result) == [.restored, .failed])
    #expect(report.pfs[1].error?.contains("no driver bound") == true)
    #expect(try await second.snapshot().allocations.map(\.id) == [a.id])
    let problems = await second.status().capabilities.problems
    #expect(problems.contains { $0.contains("PF \(Self.pf1)'s recorded layout (2 VFs) could not be restored") })
    // The failed PF keeps its record for when its cause is fixed.
    #expect(store.persisted.layouts[Self.pf1]?.numVFs == 2)
  }

  @Test func aRestoreKilledHalfwayIsRolledForwardAtTheNextStart() async throws {
    let node = Self.node()
    let store = SnapshotStore()
    let (first, _) = try await Self.start(node, store)
    let a = try await first.allocate(AllocateRequest(owner: "a", constraints: .init(pf: Self.pf0))).allocation
    node.reboot()
    let bootAfter = node.bootID()
    store.snapshots.withLock { $0 = [] }
    _ = try await Self.start(node, store)
    // The moment PF0's write-count step was journaled as running: the agent is killed there,
    // before the kernel wrote anything (PF0 back to 0 VFs, same boot).
    let killed = try #require(
      store.snapshots.withLock { snapshots in
        snapshots.first { state in
          state.operations.contains { operation in
            operation.record.kind == "restore" && operation.record.target == Self.pf0.description
              && operation.journal != nil
              && operation.record.steps.contains { $0.description.hasPrefix("write 4") && $0.state == .running }
          }
        }
      })
    #expect(killed.bootID == bootAfter)
    try await node.writeNumVFs(pf: Self.pf0, "0")
    let (third, report) = try await Self.start(node, MemoryStateStore(killed))
    #expect(!report.rebooted)  // the boot was recorded before the first step
    let restore = try #require(
      await third.recentOperations(100).first { $0.kind == "restore" && $0.target == "\(Self.pf0)" })
    #expect(restore.state == .succeeded && restore.error == nil)
    #expect(node.scan().pfs[0].vfs.count == 4)
    #expect(try await third.snapshot().allocations.map(\.id) == [a.id])
    #expect(await third.endedAllocations.isEmpty)
  }

  @Test func attachmentsToVMsThatNoLongerRunBecomeUnattachedNotEnded() async throws {
    let node = Self.node()
    let store = MemoryStateStore()
    let hypervisor = RecordingHypervisor()
    let (first, _) = try await Self.start(node, store, hypervisor: hypervisor)
    let a = try await first.allocate(AllocateRequest(owner: "a", constraints: .init(pf: Self.pf0))).allocation
    _ = try await first.attach(AttachRequest(allocationID: a.id, vm: "vm1"))
    node.reboot()
    let (second, _) = try await Self.start(node, store, hypervisor: RecordingHypervisor(machines: []))
    let kept = try #require(try await second.snapshot().allocations.first { $0.id == a.id })
    #expect(!kept.attached && kept.vf == a.vf && kept.vm == "vm1")
    #expect(await second.status().findings.contains { $0.contains("since the host rebooted: now unattached") })
  }
}
