import FPGACore
@testable import FPGADRA
import FPGASimulator
import Foundation
import Logging
import Synchronization
import Testing

/// ResourceClaims as a test's table (the API server's role).
final class Claims: ClaimSource, Sendable {
  let table = Mutex<[String: Kube.ResourceClaim]>([:])

  func put(_ claim: Kube.ResourceClaim) {
    table.withLock { $0["\(claim.metadata.namespace ?? "")/\(claim.metadata.name ?? "")"] = claim }
  }

  /// Every status report: (claim uid, driver, the entries sent).
  let reports = Mutex<[(String, String, [Kube.AllocatedDeviceStatus])]>([])
  /// Answers every report with this error when set (an API server refusing the patch).
  let reportFailure = Mutex<KubernetesAPIError?>(nil)

  func resourceClaim(namespace: String, name: String) async throws -> Kube.ResourceClaim {
    guard let claim = table.withLock({ $0["\(namespace)/\(name)"] }) else {
      throw DRAFailure("resourceclaims \"\(name)\" not found")
    }
    return claim
  }

  func reportDevices(_ devices: [Kube.AllocatedDeviceStatus], of claim: ClaimReference, driver: String) async throws {
    reports.withLock { $0.append((claim.uid, driver, devices)) }
    if let failure = reportFailure.withLock({ $0 }) { throw failure }
  }

  static func claim(
    _ name: String, uid: String, devices: [String], driver: String = "qdma.xilinx.com", pool: String = "node-a",
    allocatedAt: String? = nil
  )
    -> Kube.ResourceClaim
  {
    var claim = Kube.ResourceClaim(metadata: .init(name: name, namespace: "ns", uid: uid), status: nil)
    if !devices.isEmpty {
      claim.status = .init(
        allocation: .init(
          devices: .init(
            results: devices.map { .init(request: "vf", driver: driver, pool: pool, device: $0, shareID: nil) },
            config: nil), allocationTimestamp: allocatedAt))
    }
    return claim
  }
}

@Suite struct DRADriverTests {
  func fixture() throws -> (DRASettings, NodeEngine, MemoryStateStore, String) {
    let directory = NSTemporaryDirectory() + "fpga-dra-" + UUID().uuidString.prefix(8)
    let settings = DRASettings(
      driverName: "qdma.xilinx.com", registryDir: directory + "/registry", pluginsDir: directory + "/plugins",
      cdiDir: directory + "/cdi", nodeName: "node-a")
    let store = MemoryStateStore()
    let engine = NodeEngine(
      nodeID: "node-a", platform: SimulatedPlatform(node: SimulatedNode(config: .default)), clock: FixedTestClock(),
      store: store)
    return (settings, engine, store, directory)
  }

  @Test func prepareUnprepareAndTheirFiles() async throws {
    let (settings, engine, store, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    let claims = Claims()
    let driver = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    let vfs = try await engine.snapshot().cards[0].pfs[0].vfs.prefix(2).map {
      DeviceNames.name(of: $0.function.address)
    }
    #expect(vfs == ["vf-0000-3b-00-4", "vf-0000-3b-00-5"])
    claims.put(Claims.claim("gpu-claim", uid: "uid-1", devices: vfs))
    let reference = ClaimReference(namespace: "ns", uid: "uid-1", name: "gpu-claim")

    let first = try #require(try await driver.prepare([reference])["uid-1"]?.get())
    #expect(
      first.map(\.cdiID) == [
        "k8s.qdma.xilinx.com/vf=uid-1-vf-0000-3b-00-4", "k8s.qdma.xilinx.com/vf=uid-1-vf-0000-3b-00-5",
      ])
    var owners = try await engine.snapshot().allocations.map(\.owner)
    #expect(owners == ["claim:ns/gpu-claim/uid-1", "claim:ns/gpu-claim/uid-1"])
    // The CDI spec: one device per VF, vfio nodes, the BDFs in the environment, KubeVirt's file.
    let spec =
      try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: settings.cdiDir + "/k8s.qdma.xilinx.com-vf_uid-1.json")))
      as! [String: Any]
    #expect(spec["cdiVersion"] as? String == "0.5.0" && spec["kind"] as? String == "k8s.qdma.xilinx.com/vf")
    let devices = spec["devices"] as! [[String: Any]]
    #expect(devices.map { $0["name"] as! String } == ["uid-1-vf-0000-3b-00-4", "uid-1-vf-0000-3b-00-5"])
    let edits = devices[0]["containerEdits"] as! [String: Any]
    let nodes = (edits["deviceNodes"] as! [[String: Any]]).map { $0["path"] as! String }
    #expect(nodes[0] == "/dev/vfio/vfio" && nodes[1] == first[0].vfioDevice && nodes[1].hasPrefix("/dev/vfio/"))
    #expect((edits["env"] as! [String]).contains("PCI_RESOURCE_QDMA_XILINX_COM_VF=0000:3b:00.4,0000:3b:00.5"))
    let mount = (edits["mounts"] as! [[String: Any]])[0]
    #expect(
      mount["containerPath"] as? String
        == "/var/run/kubernetes.io/dra-device-attributes/resourceclaims/gpu-claim/vf/qdma.xilinx.com-metadata.json")
    let metadata = try String(contentsOfFile: mount["hostPath"] as! String, encoding: .utf8)
    #expect(metadata.contains(#""resource.kubernetes.io/pciBusID":{"string":"0000:3b:00.4"}"#))

    // The claim's status.devices: one Ready entry per VF, with its address and VFIO group.
    let reported = claims.reports.withLock { $0 }
    #expect(reported.map { "\($0.0) \($0.1)" } == ["uid-1 qdma.xilinx.com"])
    let entries = try #require(reported.first?.2)
    #expect(
      entries.map(\.device) == vfs && entries.allSatisfy { $0.driver == "qdma.xilinx.com" && $0.pool == "node-a" })
    #expect(entries[0].data?["pciBusID"] == .string("0000:3b:00.4"))
    #expect(entries[0].data?["vfioDevice"] == .string(first[0].vfioDevice))
    #expect(entries[0].data?["cdiDeviceID"] == .string(first[0].cdiID))
    let ready = try #require(entries[0].conditions?.first)
    #expect(ready.type == "Ready" && ready.status == "True" && ready.reason == "Prepared")
    #expect(ready.message == "VF 0000:3b:00.4 bound to vfio-pci, \(first[0].vfioDevice)")

    // Prepare again: the same devices, nothing new (and no second report).
    let again = try #require(try await driver.prepare([reference])["uid-1"]?.get())
    #expect(again == first)
    #expect(try await engine.snapshot().allocations.count == 2)
    #expect(claims.reports.withLock { $0.count } == 1)

    // Unprepare: the allocations end, the files go; again, and an unknown claim: fine too.
    let undone = await driver.unprepare([reference, ClaimReference(namespace: "ns", uid: "uid-x", name: "never")])
    #expect(undone["uid-1"] == .some(nil) && undone["uid-x"] == .some(nil))
    owners = try await engine.snapshot().allocations.map(\.owner)
    #expect(owners.isEmpty)
    #expect(!FileManager.default.fileExists(atPath: settings.cdiDir + "/k8s.qdma.xilinx.com-vf_uid-1.json"))
    // The driver's entries are withdrawn (an empty apply), once.
    #expect(claims.reports.withLock { $0.map { "\($0.0) \($0.2.count)" } } == ["uid-1 2", "uid-1 0"])
    #expect(await driver.unprepare([reference])["uid-1"] == .some(nil))
    #expect(claims.reports.withLock { $0.count } == 2)
    // A stale Prepare retry after Unprepare takes nothing.
    let stale = try #require(await driver.prepare([reference])["uid-1"])
    #expect(throws: DRAFailure.self) { try stale.get() }
    #expect(try await engine.snapshot().allocations.isEmpty)

    // The same claim deallocated and allocated again (a standalone claim, another pod): new, so
    // prepared; then unprepared, and its own stale retry refused in turn.
    claims.put(Claims.claim("gpu-claim", uid: "uid-1", devices: vfs, allocatedAt: "2026-11-30T13:00:00Z"))
    let renewed = try #require(try await driver.prepare([reference])["uid-1"]?.get())
    #expect(renewed.map(\.device) == vfs)
    #expect(
      try await engine.snapshot().allocations.map(\.owner) == ["claim:ns/gpu-claim/uid-1", "claim:ns/gpu-claim/uid-1"])
    #expect(await driver.unprepare([reference])["uid-1"] == .some(nil))
    let staleAgain = try #require(await driver.prepare([reference])["uid-1"])
    #expect(throws: DRAFailure.self) { try staleAgain.get() }
    #expect(try await engine.snapshot().allocations.isEmpty)
  }

  /// A tombstone survives a restart with the allocation it buried; one without (a claim never
  /// prepared here) admits only an allocation made over a minute after the Unprepare.
  @Test func tombstonesTellANewAllocationFromAStaleRetry() throws {
    let claim = { (at: String?) in Claims.claim("c", uid: "u", devices: ["vf-0000-3b-00-4"], allocatedAt: at) }
    let key = DRADriver.allocationKey(claim("2026-11-30T12:00:00Z"), driver: "qdma.xilinx.com")
    #expect(key == "at=2026-11-30T12:00:00Z,vf/node-a/vf-0000-3b-00-4/")
    #expect(DRADriver.digest("") == "811c9dc5" && DRADriver.digest("a") == "e40c292c")  // FNV-1a's vectors
    let buried = DRADriver.Tombstone(record: DRADriver.Tombstone(time: 1_800_000_000, allocation: key).record)
    #expect(buried == DRADriver.Tombstone(time: 1_800_000_000, allocation: key))
    #expect(!buried.admits(key, of: claim("2026-11-30T12:00:00Z")))
    let later = claim("2026-11-30T12:05:00Z")
    #expect(buried.admits(DRADriver.allocationKey(later, driver: "qdma.xilinx.com"), of: later))
    // Unprepared without having been prepared here (at 1_800_000_000 = 2027-01-15T08:00:00Z).
    let blind = DRADriver.Tombstone(record: String(format: "%020.6f", 1_800_000_000.0))
    #expect(blind == DRADriver.Tombstone(time: 1_800_000_000, allocation: nil))
    #expect(!blind.admits("any", of: claim("2027-01-15T08:00:30Z")))
    #expect(blind.admits("any", of: claim("2027-01-15T08:01:01Z")))
    #expect(!blind.admits("any", of: claim(nil)))
  }

  /// The status is for people and controllers to read: an API server that refuses it (no RBAC
  /// for `resourceclaims/status`, a deleted claim) fails neither Prepare nor Unprepare.
  @Test func aRefusedStatusReportChangesNothingOnTheNode() async throws {
    let (settings, engine, store, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    let claims = Claims()
    claims.reportFailure.withLock { $0 = KubernetesAPIError(status: 403, message: "forbidden") }
    let driver = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    let vf = try #require(try await engine.snapshot().cards[0].pfs[0].vfs.first?.function.address)
    claims.put(Claims.claim("c", uid: "uid-2", devices: [DeviceNames.name(of: vf)]))
    let reference = ClaimReference(namespace: "ns", uid: "uid-2", name: "c")
    let devices = try #require(try await driver.prepare([reference])["uid-2"]?.get())
    #expect(devices.map(\.vf) == [vf.description])
    #expect(try await engine.snapshot().allocations.map(\.owner) == ["claim:ns/c/uid-2"])
    #expect(FileManager.default.fileExists(atPath: settings.cdiDir + "/k8s.qdma.xilinx.com-vf_uid-2.json"))
    #expect(await driver.figures.statusFailures == 1)
    // The kubelet's next Prepare of the claim reports again; once it went through, no more.
    claims.reportFailure.withLock { $0 = nil }
    #expect(try await driver.prepare([reference])["uid-2"]?.get() == devices)
    #expect(try await driver.prepare([reference])["uid-2"]?.get() == devices)
    #expect(claims.reports.withLock { $0.map(\.2.count) } == [1, 1])
    // A claim already gone when its entries are withdrawn is no failure.
    claims.reportFailure.withLock { $0 = KubernetesAPIError(status: 404, message: "not found") }
    #expect(await driver.unprepare([reference])["uid-2"] == .some(nil))
    #expect(try await engine.snapshot().allocations.isEmpty)
    #expect(claims.reports.withLock { $0.map(\.2.count) } == [1, 1, 0])
    #expect(await driver.figures.statusFailures == 1)
    let figures = await driver.figures
    #expect(figures.prepared == 3 && figures.unprepared == 1 && figures.preparedNow == 0)
  }

  @Test func replacedUnallocatedAndForeignClaimsAreRefused() async throws {
    let (settings, engine, store, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    let claims = Claims()
    let driver = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    claims.put(Claims.claim("replaced", uid: "uid-new", devices: ["vf-0000-3b-00-4"]))
    claims.put(Claims.claim("pending", uid: "uid-p", devices: []))
    claims.put(Claims.claim("elsewhere", uid: "uid-e", devices: ["vf-0000-3b-00-4"], pool: "node-b"))
    let results = await driver.prepare([
      ClaimReference(namespace: "ns", uid: "uid-old", name: "replaced"),
      ClaimReference(namespace: "ns", uid: "uid-p", name: "pending"),
      ClaimReference(namespace: "ns", uid: "uid-e", name: "elsewhere"),
      ClaimReference(namespace: "ns", uid: "uid-m", name: "missing"),
    ])
    func message(_ uid: String) -> String {
      if case .failure(let error) = results[uid] { return error.message }
      return "no error"
    }
    #expect(message("uid-old").contains("got replaced: its uid is uid-new"))
    #expect(message("uid-p").contains("is not allocated to driver qdma.xilinx.com"))
    #expect(message("uid-e").contains("is from pool node-b, not this node's (node-a)"))
    #expect(message("uid-m").contains("cannot read ResourceClaim ns/missing"))
    #expect(try await engine.snapshot().allocations.isEmpty)
  }

  @Test func aRestartRewritesTheSpecsAndUndoesHalfPreparedClaims() async throws {
    let (settings, engine, store, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    let claims = Claims()
    claims.put(Claims.claim("kept", uid: "uid-k", devices: ["vf-0000-3b-00-4"]))
    let first = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    _ = try await first.prepare([ClaimReference(namespace: "ns", uid: "uid-k", name: "kept")])["uid-k"]?.get()
    // A crash between journal steps leaves a started record; /var/run/cdi is wiped at reboot.
    let half = #"{"devices":[],"name":"half","namespace":"ns","state":"started","uid":"uid-h"}"#
    try await store.commit([.putRecord("dra-claim", "uid-h", half)])
    try FileManager.default.removeItem(atPath: settings.cdiDir)
    let second = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    try await second.restore()
    #expect(FileManager.default.fileExists(atPath: settings.cdiDir + "/k8s.qdma.xilinx.com-vf_uid-k.json"))
    #expect(await second.preparedClaims.map(\.uid) == ["uid-k"])
    #expect(try store.load().records["dra-claim"]?.keys.sorted() == ["uid-k"])
  }

  @Test func aHostRebootKeepsAPreparedClaimAndItsSpecFollowsTheVFsNewGroup() async throws {
    let (settings, _, store, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let node = SimulatedNode(config: .default)
    func start() async throws -> NodeEngine {
      let engine = NodeEngine(
        nodeID: "node-a", platform: SimulatedPlatform(node: node), clock: FixedTestClock(), store: store)
      let persisted = try await engine.restore()
      await engine.restoreLayouts(persisted, enabled: true)
      try await engine.rescan()
      await engine.reconcile()
      return engine
    }
    let engine = try await start()
    let claims = Claims()
    claims.put(Claims.claim("kept", uid: "uid-k", devices: ["vf-0000-3b-00-4"]))
    let first = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    let before = try #require(
      try await first.prepare([ClaimReference(namespace: "ns", uid: "uid-k", name: "kept")])["uid-k"]?.get().first)

    // The host reboots (CDI specs live in a tmpfs); before the agent starts, another PF gets a VF
    // first, so the kernel hands the restored VFs other group numbers.
    node.reboot()
    try FileManager.default.removeItem(atPath: settings.cdiDir)
    try await node.writeNumVFs(pf: PCIAddress("0000:d8:00.3")!, "1")
    let after = try await start()
    let allocation = try #require(try await after.snapshot().allocations.first { $0.id == before.allocationID })
    #expect(allocation.vf == PCIAddress("0000:3b:00.4") && "/dev/vfio/\(allocation.iommuGroup)" != before.vfioDevice)
    let second = DRADriver(settings: settings, engine: after, store: store, claims: claims, logger: Logger(label: "t"))
    try await second.restore()
    let spec = try String(contentsOfFile: settings.cdiDir + "/k8s.qdma.xilinx.com-vf_uid-k.json", encoding: .utf8)
    #expect(spec.contains("/dev/vfio/\(allocation.iommuGroup)") && !spec.contains(before.vfioDevice + "\""))
    #expect(await second.preparedClaims.first?.devices.first?.vfioDevice == "/dev/vfio/\(allocation.iommuGroup)")
  }

  @Test func slicesCarryAttributesTaintsAndStayWithinLimits() async throws {
    let (settings, engine, _, directory) = try fixture()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    try await engine.rescan()
    _ = try await engine.drain(.pf(PCIAddress("0000:3b:00.1")!), releaseUnattached: false, meta: RequestMeta())
    _ = try await engine.allocate(AllocateRequest(owner: "tenant", constraints: .init(pf: PCIAddress("0000:3b:00.0"))))
    let devices = SlicePublisher.devices(try await engine.snapshot(), settings: settings)
    #expect(devices.count == 52)
    let first = try #require(devices.first { $0.name == "vf-0000-3b-00-4" })
    #expect(first.attributes?["resource.kubernetes.io/pciBusID"] == .string("0000:3b:00.4"))
    #expect(first.attributes?["qdma.xilinx.com/pf"] == .string("0000:3b:00.0"))
    #expect(first.attributes?["qdma.xilinx.com/vendorID"] == .string("0x10ee"))
    #expect(first.taints?.map(\.key) == ["qdma.xilinx.com/allocated"])
    let drained = devices.filter { $0.attributes?["qdma.xilinx.com/pf"] == .string("0000:3b:00.1") }
    #expect(!drained.isEmpty && drained.allSatisfy { $0.taints?.map(\.key) == ["qdma.xilinx.com/draining"] })
    #expect(
      devices.allSatisfy { ($0.taints ?? []).allSatisfy { ($0.value ?? "").count <= 63 && $0.effect == "NoSchedule" } })
    let reconfiguring = SlicePublisher.devices(
      try await engine.snapshot(), settings: settings, reconfiguring: [PCIAddress("0000:d8:00.0")!])
    #expect(reconfiguring.filter { $0.taints?.first?.value == "PF-0000-d8-00.0-is-being-reconfigured" }.count == 16)
    let chunks = SlicePublisher.chunks(devices)
    #expect(chunks.map(\.count) == [52])
    let many = (0..<200).map { Kube.Device(name: "d\($0)") }
    #expect(SlicePublisher.chunks(many).map(\.count) == [128, 72])
    #expect(
      SlicePublisher.chunks(many + [Kube.Device(name: "t", taints: [.init(key: "k", effect: "NoSchedule")])]).map(
        \.count) == [64, 64, 64, 9])
    #expect(DeviceNames.vf("vf-0000-3b-00-4") == PCIAddress("0000:3b:00.4") && DeviceNames.vf("gpu-0") == nil)
  }
}

final class FixedTestClock: WallClock {
  func now() -> WallTime { WallTime(seconds: 1_800_000_000) }
}

@Suite struct DRAAcceleratorShareTests {
  @Test func aClaimOnAnAcceleratorBecomesAContextAndGoesWithUnprepare() async throws {
    let directory = NSTemporaryDirectory() + "fpga-dra-" + UUID().uuidString.prefix(8)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let settings = DRASettings(
      driverName: "qdma.xilinx.com", registryDir: directory + "/registry", pluginsDir: directory + "/plugins",
      cdiDir: directory + "/cdi", nodeName: "node-a")
    let store = MemoryStateStore()
    let runner = AcceleratorRunner(
      spec: AcceleratorSpec(
        id: "card-0000:3b/acc0", cardID: "card-0000:3b", nominalSwitchCost: .microseconds(20),
        policy: .init(slice: .milliseconds(10), overcommitLimit: 3)),
      control: SimulatedAccelerator(fixed: .microseconds(5), bandwidth: 1_000_000_000))
    let engine = NodeEngine(
      nodeID: "node-a", platform: SimulatedPlatform(node: SimulatedNode(config: .default)), clock: FixedTestClock(),
      store: store, accelerators: [runner])
    _ = try await engine.restore()
    try await engine.rescan()
    defer { Task { await engine.close() } }
    // Published: one shared device with a capacity of guest slots.
    let devices = SlicePublisher.devices(try await engine.snapshot(), settings: settings)
    let shared = try #require(devices.first { $0.name == "acc-0000-3b-0" })
    #expect(shared.allowMultipleAllocations == true && shared.capacity?["guests"]?.value == "3")
    #expect(shared.attributes?["qdma.xilinx.com/kind"] == .string("accelerator"))
    #expect(DeviceNames.accelerator("acc-0000-3b-0") == "card-0000:3b/acc0")

    let claims = Claims()
    var claim = Claims.claim("share", uid: "uid-s", devices: ["acc-0000-3b-0"])
    claim.status?.allocation?.devices?.config = [
      .init(
        requests: ["vf"],
        opaque: .init(
          driver: "qdma.xilinx.com", parameters: .object(["function": .string("fft"), "weight": .number(3)])))
    ]
    claims.put(claim)
    let driver = DRADriver(settings: settings, engine: engine, store: store, claims: claims, logger: Logger(label: "t"))
    let reference = ClaimReference(namespace: "ns", uid: "uid-s", name: "share")
    let prepared = try #require(try await driver.prepare([reference])["uid-s"]?.get())
    let contexts = await engine.listContexts().map(\.0)
    #expect(
      contexts.count == 1 && contexts[0].guest == "claim-uid-s" && contexts[0].function == "fft"
        && contexts[0].weight == 3)
    #expect(prepared[0].contextID == contexts[0].id)
    let spec = try String(contentsOfFile: settings.cdiDir + "/k8s.qdma.xilinx.com-vf_uid-s.json", encoding: .utf8)
    #expect(spec.contains("FPGA_CONTEXT=\(contexts[0].id)") && spec.contains("FPGA_ACCELERATOR=card-0000:3b/acc0"))
    #expect(await driver.unprepare([reference])["uid-s"] == .some(nil))
    #expect(await engine.listContexts().isEmpty)
  }
}
