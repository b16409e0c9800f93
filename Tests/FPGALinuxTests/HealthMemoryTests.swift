import FPGACore
import FPGALinux
import FPGATestSupport
import Foundation
import Testing

/// Health judgements that survive a restart of the agent (an engine started again on the same
/// store), an operator's clear, and a device re-enumerated (its counters reset). AER counters
/// are files the test writes into the kernel-faithful fake tree, read by the real LinuxPlatform.
@Suite struct HealthMemoryTests {
  static let pf0 = PCIAddress("0000:3b:00.0")!
  static let pf1 = PCIAddress("0000:3b:00.1")!

  static func tree() throws -> FakeKernelSysfs {
    let tree = try FakeKernelSysfs(pfs: [
      .init("0000:3b:00.0", device: 0x903f, vfDevice: 0xa03f, totalVFs: 8, offset: 4),
      .init("0000:3b:00.1", device: 0x913f, vfDevice: 0xa13f, totalVFs: 8, offset: 67),
    ])
    for pf in [pf0, pf1] {
      try tree.write(.device(pf, "sriov_drivers_autoprobe"), "0")
      try tree.write(.device(pf, "sriov_numvfs"), "2")
    }
    return tree
  }

  static func aer(_ tree: FakeKernelSysfs, _ device: PCIAddress, fatal: Int, nonfatal: Int = 0) throws {
    let folder = tree.sysRoot + "/bus/pci/devices/\(device)/"
    try "DLP \(fatal)\nTOTAL_ERR_FATAL \(fatal)\n".write(
      toFile: folder + "aer_dev_fatal", atomically: true, encoding: .utf8)
    try "PoisonTLPBlocked \(nonfatal)\nTOTAL_ERR_NONFATAL \(nonfatal)\n".write(
      toFile: folder + "aer_dev_nonfatal", atomically: true, encoding: .utf8)
  }

  /// A start of the agent on `store`: restore, layouts, first scan (as AgentRuntime.run).
  static func start(_ tree: FakeKernelSysfs, _ store: MemoryStateStore) async throws -> NodeEngine {
    let engine = NodeEngine(
      nodeID: "n", platform: LinuxPlatform(sysfs: tree, holders: NoHolders()), clock: FixedClock(), store: store)
    let persisted = try await engine.restore()
    await engine.restoreLayouts(persisted, enabled: true)
    try await engine.rescan()
    await engine.reconcile()
    return engine
  }

  static func health(_ engine: NodeEngine, _ device: PCIAddress) async throws -> DeviceHealth {
    let snapshot = try await engine.snapshot()
    for pf in snapshot.cards.flatMap(\.pfs) {
      if pf.function.address == device { return pf.function.health }
      if let vf = pf.vfs.first(where: { $0.function.address == device }) { return vf.function.health }
    }
    throw AgentError(.notFound, "\(device)")
  }

  @Test func anUnhealthyDeviceStaysUnhealthyAcrossARestartUntilCleared() async throws {
    let tree = try Self.tree()
    try Self.aer(tree, Self.pf1, fatal: 0)
    let store = MemoryStateStore()
    let first = try await Self.start(tree, store)
    #expect(try await Self.health(first, Self.pf1).state == .healthy)

    // An uncorrectable fatal error while the agent runs: PF1 and its VFs are unhealthy.
    try Self.aer(tree, Self.pf1, fatal: 1)
    try await first.rescan()
    #expect(try await Self.health(first, Self.pf1).state == .unhealthy)
    #expect(store.persisted.health[Self.pf1]?.health.state == .unhealthy)
    let refused = await #expect(throws: AgentError.self) {
      try await first.allocate(AllocateRequest(owner: "t", constraints: .init(pf: Self.pf1)))
    }
    #expect(refused?.code == .resourceExhausted)

    // The agent restarts (an upgrade): same counters, the same judgement, still not allocated.
    let second = try await Self.start(tree, store)
    let after = try await Self.health(second, Self.pf1)
    #expect(after.state == .unhealthy && after.reasons.map(\.kind) == ["aer-fatal"])
    await #expect(throws: AgentError.self) {
      try await second.allocate(AllocateRequest(owner: "t", constraints: .init(pf: Self.pf1)))
    }

    // An operator accepts the error: healthy, allocatable, and so after another restart.
    let cleared = try await second.clearHealth(Self.pf1, reason: "reseated", meta: RequestMeta())
    #expect(cleared.0.state == .healthy && !cleared.replayed)
    _ = try await second.allocate(AllocateRequest(owner: "t", constraints: .init(pf: Self.pf1)))
    let third = try await Self.start(tree, store)
    #expect(try await Self.health(third, Self.pf1).state == .healthy)

    // A new error after the clear counts from the new baseline.
    try Self.aer(tree, Self.pf1, fatal: 3)
    try await third.rescan()
    #expect(try await Self.health(third, Self.pf1).reasons.first?.detail.hasPrefix("2 uncorrectable fatal") == true)

    // Re-enumerated (the counters went down): judged afresh, healthy.
    try Self.aer(tree, Self.pf1, fatal: 0)
    try await third.rescan()
    #expect(try await Self.health(third, Self.pf1).state == .healthy)
  }

  @Test func errorsLoggedBeforeTheAgentFirstSawADeviceMakeItDegradedUntilCleared() async throws {
    let tree = try Self.tree()
    try Self.aer(tree, Self.pf0, fatal: 2, nonfatal: 1)
    let store = MemoryStateStore()
    let first = try await Self.start(tree, store)
    let health = try await Self.health(first, Self.pf0)
    #expect(health.state == .degraded && health.reasons.map(\.kind) == ["aer-history"])
    #expect(
      health.reasons[0].detail.hasPrefix(
        "2 uncorrectable fatal and 1 uncorrectable non-fatal errors (AER) logged before the agent first saw it"))
    // Degraded is still allocatable.
    _ = try await first.allocate(AllocateRequest(owner: "t", constraints: .init(pf: Self.pf0)))
    // Remembered across a restart, not re-based to "healthy".
    let second = try await Self.start(tree, store)
    #expect(try await Self.health(second, Self.pf0).reasons.map(\.kind) == ["aer-history"])
    _ = try await second.clearHealth(Self.pf0, reason: "known history", meta: RequestMeta(idempotencyKey: "k1"))
    #expect(try await Self.health(second, Self.pf0).state == .healthy)
    // A retry with the same key replays; the judgement is not cleared twice.
    let replay = try await second.clearHealth(
      Self.pf0, reason: "known history", meta: RequestMeta(idempotencyKey: "k1"))
    #expect(replay.replayed)
  }

  @Test func aClearNamesAnExistingDevice() async throws {
    let tree = try Self.tree()
    let engine = try await Self.start(tree, MemoryStateStore())
    let error = await #expect(throws: AgentError.self) {
      try await engine.clearHealth(PCIAddress("0000:3b:07.0")!, reason: "x", meta: RequestMeta())
    }
    #expect(error?.code == .notFound)
  }

  @Test func aRebootOfTheHostJudgesEveryDeviceAfresh() async throws {
    let tree = try Self.tree()
    try Self.aer(tree, Self.pf1, fatal: 0)
    let store = MemoryStateStore()
    let first = try await Self.start(tree, store)
    try Self.aer(tree, Self.pf1, fatal: 1)
    try await first.rescan()
    #expect(try await Self.health(first, Self.pf1).state == .unhealthy)
    tree.reboot()
    try Self.aer(tree, Self.pf1, fatal: 0)  // the kernel's counters start again
    let second = try await Self.start(tree, store)
    #expect(try await Self.health(second, Self.pf1).state == .healthy)
    // And the layout came back: 2 VFs on each PF.
    #expect(try await second.snapshot().cards[0].pfs.map(\.function.numVFs) == [2, 2])
  }
}

/// No process holds any VFIO group.
struct NoHolders: VFIOHolderFinding {
  func holders(ofGroup group: Int) -> [String] { [] }
}
