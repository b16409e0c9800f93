import FPGACore
@testable import FPGADRA
import FPGASimulator
import Foundation
import Logging
import Synchronization
import Testing

/// The simulated platform with a gate on VF count writes: a test parks a growth in the middle
/// of its re-layout, sends other Prepares, then lets it go.
final class ParkedPlatform: NodePlatform, @unchecked Sendable {
  let inner: SimulatedPlatform
  /// A pthread mutex (NSLock): ThreadSanitizer follows its hand-over, not Synchronization.Mutex's.
  private let gate = Gate()

  final class Gate: @unchecked Sendable {
    private let lock = NSLock()
    private var state: (armed: Bool, parked: [CheckedContinuation<Void, Never>], writes: [Int]) = (false, [], [])
    func withLock<T>(_ body: (inout (armed: Bool, parked: [CheckedContinuation<Void, Never>], writes: [Int])) -> T) -> T
    {
      lock.lock()
      defer { lock.unlock() }
      return body(&state)
    }
  }

  init(_ inner: SimulatedPlatform) { self.inner = inner }

  func arm() { gate.withLock { $0.armed = true } }
  var parkedCount: Int { gate.withLock { $0.parked.count } }
  var writes: [Int] { gate.withLock { $0.writes } }
  func release() {
    let waiting = gate.withLock { state -> [CheckedContinuation<Void, Never>] in
      state.armed = false
      defer { state.parked = [] }
      return state.parked
    }
    for continuation in waiting { continuation.resume() }
  }

  func discover() async throws(AgentError) -> DiscoveredNode { try await inner.discover() }
  func capabilities() async -> PlatformCapabilities { await inner.capabilities() }
  func prepareForPassthrough(vf: PCIAddress) async throws(AgentError) -> String {
    try await inner.prepareForPassthrough(vf: vf)
  }
  func vfHolders(pf: PCIAddress) async -> [PCIAddress: String] { await inner.vfHolders(pf: pf) }
  func setVFCount(
    pf: PCIAddress, to count: Int, whileBlocked: @escaping @Sendable (String) async -> Void
  ) async throws(AgentError) {
    await withCheckedContinuation { continuation in
      let park = gate.withLock { state -> Bool in
        state.writes.append(count)
        if state.armed { state.parked.append(continuation) }
        return state.armed
      }
      if !park { continuation.resume() }
    }
    try await inner.setVFCount(pf: pf, to: count, whileBlocked: whileBlocked)
  }
}

@Suite struct GrowthTests {
  static let pf0 = PCIAddress("0000:3b:00.0")!

  func fixture(mailbox: Bool = true, policy: GrowthPolicy = GrowthPolicy(maxVFs: 8)) throws -> (
    DRADriver, NodeEngine, SimulatedNode, ParkedPlatform, Claims, DRASettings, String
  ) {
    let directory = NSTemporaryDirectory() + "fpga-grow-" + UUID().uuidString.prefix(8)
    var settings = DRASettings(
      driverName: "qdma.xilinx.com", registryDir: directory + "/registry", pluginsDir: directory + "/plugins",
      cdiDir: directory + "/cdi", nodeName: "node-a")
    settings.growth = policy
    let node = SimulatedNode(
      config: SimulatorConfig(cards: [
        .init(bus: 0x3b, numaNode: 0, enabledVFs: [2, 0, 0, 0], bindToVFIO: false, mailbox: mailbox)
      ]))
    let platform = ParkedPlatform(SimulatedPlatform(node: node))
    let store = MemoryStateStore()
    let engine = NodeEngine(nodeID: "node-a", platform: platform, clock: FixedTestClock(), store: store)
    let claims = Claims()
    let driver = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    return (driver, engine, node, platform, claims, settings, directory)
  }

  @Test func theSlicesOfferThePotentialVFsOfAPFThatMayGrow() async throws {
    let (driver, engine, _, _, _, settings, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    let snapshot = try await engine.snapshot()
    let growable = await driver.growablePFs(snapshot)
    #expect(growable[Self.pf0] == 8)
    let devices = SlicePublisher.devices(snapshot, settings: settings, growable: growable)
    let onPF0 = devices.filter { $0.attributes?["qdma.xilinx.com/pf"] == .string("0000:3b:00.0") }
    #expect(onPF0.count == 8)
    let potential = try #require(onPF0.first { $0.name == "vf-0000-3b-00-6" })
    #expect(potential.attributes?["qdma.xilinx.com/created"] == .flag(false))
    #expect(potential.attributes?["qdma.xilinx.com/vfIndex"] == .int(2))
    #expect(potential.attributes?["resource.kubernetes.io/pciBusID"] == .string("0000:3b:00.6"))
    #expect(potential.attributes?["qdma.xilinx.com/numaNode"] == .int(0))
    #expect(potential.attributes?["qdma.xilinx.com/iommuGroup"] == nil)
    let real = try #require(onPF0.first { $0.name == "vf-0000-3b-00-4" })
    #expect(real.attributes?["qdma.xilinx.com/created"] == .flag(true))
    // Outside grow_pfs, nothing is offered.
    var narrow = settings
    narrow.growth = GrowthPolicy(pfs: [PCIAddress("0000:3b:00.1")!])
    let other = DRADriver(
      settings: narrow, engine: engine, store: MemoryStateStore(), claims: Claims(), logger: Logger(label: "t"))
    #expect(await other.growablePFs(snapshot)[Self.pf0] == nil)
  }

  @Test func aClaimOnAPotentialVFGrowsThePFOnceAndPrepares() async throws {
    let (driver, engine, node, platform, claims, _, directory) = try fixture(
      policy: GrowthPolicy(maxVFs: 8, step: 2))
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    claims.put(Claims.claim("a", uid: "uid-a", devices: ["vf-0000-3b-00-6"]))
    claims.put(Claims.claim("b", uid: "uid-b", devices: ["vf-0000-3b-00-7"]))
    platform.arm()
    let first = Task { await driver.prepare([ClaimReference(namespace: "ns", uid: "uid-a", name: "a")]) }
    // Parked in the growth's first count write.
    while platform.parkedCount == 0 { await Task.yield() }
    let second = Task { await driver.prepare([ClaimReference(namespace: "ns", uid: "uid-b", name: "b")]) }
    // The kubelet retries the first claim's Prepare while its growth runs: it joins it.
    let retry = Task { await driver.prepare([ClaimReference(namespace: "ns", uid: "uid-a", name: "a")]) }
    while true {
      let waiters = await driver.growthWaiters
      let joined = await driver.isJoined("uid-a")
      if waiters >= 1 && joined { break }
      await Task.yield()
    }
    platform.release()
    let a = try #require(try await first.value["uid-a"]?.get().first)
    let b = try #require(try await second.value["uid-b"]?.get().first)
    #expect(try await retry.value["uid-a"]?.get().first == a)
    #expect(a.vf == "0000:3b:00.6" && b.vf == "0000:3b:00.7")
    // One growth, 2 → 4 (step 2), journaled as a reconfiguration started by DRA.
    #expect(node.scan().pfs[0].vfs.count == 4)
    #expect(platform.writes == [0, 4])
    let operations = await engine.recentOperations(10).filter { $0.kind == "reconfigure" }
    #expect(operations.count == 1 && operations[0].state == .succeeded)
    #expect(operations[0].startedBy == "dra claim ns/a")
    #expect(await driver.growth.grown == 1)
    // Both VFs bound to vfio-pci, each owned by its claim.
    let vfs = node.scan().pfs[0].vfs
    #expect(
      vfs.filter { $0.driver == "vfio-pci" }.map(\.address.description).sorted() == ["0000:3b:00.6", "0000:3b:00.7"])
  }

  @Test func aRefusedGrowthFailsThePrepareAndLeavesThePFAsItWas() async throws {
    let (driver, engine, node, _, claims, settings, directory) = try fixture(mailbox: false)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    claims.put(Claims.claim("a", uid: "uid-a", devices: ["vf-0000-3b-00-6"]))
    let result = await driver.prepare([ClaimReference(namespace: "ns", uid: "uid-a", name: "a")])["uid-a"]
    guard case .failure(let error) = result else {
      Issue.record("the Prepare succeeded")
      return
    }
    #expect(error.message.contains("PF 0000:3b:00.0 could not grow"))
    #expect(node.scan().pfs[0].vfs.count == 2)
    #expect(try await engine.snapshot().allocations.isEmpty)
    #expect(await driver.growth.failed == 1)
    // The pool stops offering what cannot be made.
    let snapshot = try await engine.snapshot()
    #expect(await driver.growablePFs(snapshot)[Self.pf0] == nil)
    let devices = SlicePublisher.devices(snapshot, settings: settings, growable: await driver.growablePFs(snapshot))
    #expect(!devices.contains { $0.name == "vf-0000-3b-00-6" })
    // A second claim is refused at once, naming why.
    claims.put(Claims.claim("b", uid: "uid-b", devices: ["vf-0000-3b-00-6"]))
    let again = await driver.prepare([ClaimReference(namespace: "ns", uid: "uid-b", name: "b")])["uid-b"]
    guard case .failure(let refused) = again else {
      Issue.record("the second Prepare succeeded")
      return
    }
    #expect(refused.message.contains("its last growth failed"))
  }

  @Test func aVFHeldByAProcessTheAgentCannotPauseKeepsThePFFromGrowing() async throws {
    let (driver, engine, node, _, claims, _, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    _ = try await engine.prepareForPassthrough(vf: PCIAddress("0000:3b:00.4")!)
    try node.hold(vf: PCIAddress("0000:3b:00.4")!, by: "qemu-unmanaged")
    #expect(await driver.growablePFs(try await engine.snapshot())[Self.pf0] == nil)
    claims.put(Claims.claim("a", uid: "uid-a", devices: ["vf-0000-3b-00-6"]))
    let result = await driver.prepare([ClaimReference(namespace: "ns", uid: "uid-a", name: "a")])["uid-a"]
    guard case .failure(let error) = result else {
      Issue.record("the Prepare succeeded")
      return
    }
    #expect(error.message.contains("cannot grow now") && error.message.contains("qemu-unmanaged"))
    #expect(node.scan().pfs[0].vfs.count == 2)
  }
}
