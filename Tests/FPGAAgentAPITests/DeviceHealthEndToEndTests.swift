import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
import FPGAAgentRuntime
import FPGACore
import FPGACtlCommands
import FPGALinux
import FPGATestSupport
@testable import FPGADevicePlugin
import Foundation
import Synchronization
import Testing
import SwiftProtobuf
import GRPCCore

/// Device health on a kernel-faithful fake tree, with uevents fed through the same seam as the
/// kernel's netlink socket: AER counters, a device that leaves the bus and comes back.
@Suite struct DeviceHealthEndToEndTests {
  static func tree() throws -> FakeKernelSysfs {
    let tree = try FakeKernelSysfs(pfs: [
      .init("0000:3b:00.0", device: 0x903f, vfDevice: 0xa03f, totalVFs: 8, offset: 4),
      .init("0000:3b:00.1", device: 0x913f, vfDevice: 0xa13f, totalVFs: 8, offset: 67),
    ])
    for pf in ["0000:3b:00.0", "0000:3b:00.1"] {
      try tree.write(.device(PCIAddress(pf)!, "sriov_drivers_autoprobe"), "0")
      try tree.write(.device(PCIAddress(pf)!, "sriov_numvfs"), "2")
    }
    return tree
  }

  /// Writes a device attribute the fake kernel does not model (AER counters).
  static func put(_ tree: FakeKernelSysfs, _ address: String, _ file: String, _ text: String) throws {
    try text.write(toFile: tree.sysRoot + "/bus/pci/devices/\(address)/\(file)", atomically: true, encoding: .utf8)
  }

  static func aer(fatal: Int, nonfatal: Int = 0, correctable: Int = 0) -> [(String, String)] {
    [
      ("aer_dev_fatal", "Undefined 0\nDLP \(fatal)\nTOTAL_ERR_FATAL \(fatal)\n"),
      ("aer_dev_nonfatal", "Undefined 0\nPoisonTLPBlocked \(nonfatal)\nTOTAL_ERR_NONFATAL \(nonfatal)\n"),
      ("aer_dev_correctable", "RxErr \(correctable)\nTOTAL_ERR_COR \(correctable)\n"),
    ]
  }

  /// Polls until `condition` holds (the rescan a uevent starts runs on its own task).
  func eventually(_ what: String, _ condition: () async throws -> Bool) async throws {
    for _ in 0..<2000 {
      if try await condition() { return }
      try await Task.sleep(for: .milliseconds(5))
    }
    Issue.record("never: \(what)")
  }

  @Test func errorsAndASurpriseRemovalAreSeenThroughUevents() async throws {
    let tree = try Self.tree()
    for (file, text) in Self.aer(fatal: 0) { try Self.put(tree, "0000:3b:00.1", file, text) }
    try Self.put(tree, "0000:3b:00.1", "current_link_width", "16")
    try Self.put(tree, "0000:3b:00.1", "max_link_width", "16")
    let uevents = FakeUevents()
    try await TestAgent.with(
      configure: { config in
        config.platform = .linux
        config.linux.sysfsRoot = tree.sysRoot
        config.linux.devRoot = tree.devRoot
      }, uevents: uevents
    ) { agent in
      try await eventually("the agent listens to uevents") { uevents.isListening }
      try await agent.withClient { node, _ in
        var inventory = try await node.getInventory(.init())
        #expect(inventory.cards[0].pfs.map(\.health.state) == [.healthy, .healthy])
        #expect(inventory.cards[0].pfs[1].readings.aerFatal == 0 && inventory.cards[0].pfs[1].readings.linkWidth == 16)
        let kept = try await node.allocateVF(
          .with {
            $0.owner = "tenant"; $0.constraints.pfBdf = "0000:3b:00.0"
          })

        // PF1 logs an uncorrectable fatal error and trains at x4: the kernel says "change".
        for (file, text) in Self.aer(fatal: 1) { try Self.put(tree, "0000:3b:00.1", file, text) }
        try Self.put(tree, "0000:3b:00.1", "current_link_width", "4")
        uevents.send(
          Uevent(
            action: "change", devpath: "/devices/pci0000:00/0000:3b:00.1", subsystem: "pci",
            pciSlot: PCIAddress("0000:3b:00.1")))
        try await eventually("PF1 unhealthy") {
          try await node.getInventory(.init()).cards[0].pfs[1].health.state == .unhealthy
        }
        inventory = try await node.getInventory(.init())
        let pf1 = inventory.cards[0].pfs[1]
        #expect(Set(pf1.health.reasons.map(\.kind)) == ["aer-fatal", "link-width"])
        #expect(pf1.health.reasons.first { $0.kind == "aer-fatal" }?.detail == "1 uncorrectable fatal error (AER)")
        // Its VFs are unhealthy through it, and never handed out.
        #expect(pf1.vfs.allSatisfy { $0.health.state == .unhealthy && $0.state == .unhealthy })
        #expect(pf1.vfs[0].health.reasons.contains { $0.kind == "parent" && $0.detail.contains("0000:3b:00.1") })
        let refused = await rpcFailure {
          _ = try await node.allocateVF(
            .with {
              $0.owner = "t"; $0.constraints.pfBdf = "0000:3b:00.1"
            })
        }
        #expect(refused?.0 == .resourceExhausted)
        let status = await fpgactlStatus(agent)
        #expect(status.contains("DEGRADED"))
        #expect(
          status.contains("PF 0000:3b:00.1 is unhealthy since")
            && status.contains("aer-fatal: 1 uncorrectable fatal error"))

        // PF0 falls off the bus while its VF is allocated: gone, the allocation ends with why.
        let hidden = tree.directory + "/hidden"
        try FileManager.default.createDirectory(atPath: hidden, withIntermediateDirectories: true)
        let links = try FileManager.default.contentsOfDirectory(atPath: tree.sysRoot + "/bus/pci/devices")
          .filter { name in
            name == "0000:3b:00.0"
              || ((try? FileManager.default.destinationOfSymbolicLink(
                atPath: tree.sysRoot + "/bus/pci/devices/\(name)/physfn"))?
                .hasSuffix("0000:3b:00.0") ?? false)
          }
        for name in links {
          try FileManager.default.moveItem(
            atPath: tree.sysRoot + "/bus/pci/devices/\(name)", toPath: hidden + "/\(name)")
        }
        uevents.send(
          Uevent(
            action: "remove", devpath: "/devices/pci0000:00/0000:3b:00.0", subsystem: "pci",
            pciSlot: PCIAddress("0000:3b:00.0")))
        try await eventually("PF0 gone") { try await node.getInventory(.init()).allocations.isEmpty }
        inventory = try await node.getInventory(.init())
        #expect(inventory.cards[0].pfs.map(\.bdf) == ["0000:3b:00.1"])
        let ended = try #require(inventory.endedAllocations.first)
        #expect(ended.allocation.id == kept.allocation.id && ended.allocation.owner == "tenant")
        #expect(ended.reason.contains("PF 0000:3b:00.0 is gone from the PCI bus"))
        let gone = try await node.getNodeStatus(.init())
        #expect(gone.problems.contains { $0.hasPrefix("PF 0000:3b:00.0 is gone from the PCI bus since") })
        #expect(gone.findings.contains { $0.contains(kept.allocation.id) && $0.contains("is gone") })
        // The audit trail says the agent ended it, and why.
        let audit = try String(contentsOfFile: agent.directory + "/state/audit.log", encoding: .utf8)
        #expect(
          audit.split(separator: "\n").contains { line in
            line.contains(#""rpc":"AllocationEnded""#) && line.contains(kept.allocation.id)
              && line.contains("is gone from the PCI bus")
              && line.contains(#""identity":"agent""#)
          }, "\(audit)")

        // Hot-added back: managed again, healthy (the counters start afresh).
        for name in links {
          try FileManager.default.moveItem(
            atPath: hidden + "/\(name)", toPath: tree.sysRoot + "/bus/pci/devices/\(name)")
        }
        uevents.send(
          Uevent(
            action: "add", devpath: "/devices/pci0000:00/0000:3b:00.0", subsystem: "pci",
            pciSlot: PCIAddress("0000:3b:00.0")))
        try await eventually("PF0 back") { try await node.getInventory(.init()).cards[0].pfs.count == 2 }
        let back = try await node.getInventory(.init()).cards[0].pfs[0]
        #expect(back.bdf == "0000:3b:00.0" && back.health.state == .healthy && back.vfs.count == 2)
        #expect(try await !node.getNodeStatus(.init()).problems.contains { $0.contains("0000:3b:00.0") })
        _ = try await node.allocateVF(
          .with {
            $0.owner = "again"; $0.constraints.pfBdf = "0000:3b:00.0"
          })
      }
    }
  }

  func fpgactlStatus(_ agent: TestAgent) async -> String {
    let out = Mutex<[String]>([])
    let console = Console(out: { line in out.withLock { $0.append(line) } }, err: { _ in })
    _ = await Console.$current.withValue(console) {
      await FPGACtl.execute(["status", "--server", "127.0.0.1:\(agent.port)"])
    }
    return out.withLock { $0.joined(separator: "\n") }
  }
}

/// The kubelet sees the VFs of an unhealthy PF as Unhealthy; the other PF's stay Healthy.
@Suite struct DevicePluginHealthTests {
  @Test func vfsOfAnUnhealthyPFAreUnhealthyForTheKubelet() async throws {
    let tree = try DeviceHealthEndToEndTests.tree()
    for (file, text) in DeviceHealthEndToEndTests.aer(fatal: 0) {
      try DeviceHealthEndToEndTests.put(tree, "0000:3b:00.1", file, text)
    }
    let engine = NodeEngine(nodeID: "n", platform: LinuxPlatform(sysfs: tree), clock: FixedClock())
    try await engine.rescan()
    let pool = DevicePluginPool(resourceName: "xilinx.com/qdma-vf", pfs: [])
    func health() async throws -> [String: String] {
      Dictionary(
        uniqueKeysWithValues: DevicePluginService.devices(try await engine.snapshot(), pool: pool).map {
          ($0.id, $0.health)
        })
    }
    #expect(Set(try await health().values) == ["Healthy"])
    for (file, text) in DeviceHealthEndToEndTests.aer(fatal: 0, nonfatal: 2) {
      try DeviceHealthEndToEndTests.put(tree, "0000:3b:00.1", file, text)
    }
    try await engine.rescan()
    let after = try await health()
    let pf1VFs = try await engine.snapshot().cards[0].pfs[1].vfs.map(\.function.address.description)
    #expect(pf1VFs.count == 2 && pf1VFs.allSatisfy { after[$0] == "Unhealthy" })
    #expect(after.filter { $0.value == "Healthy" }.count == 2)
  }
}

/// Config space: a VF reads vendor and device 0xffff by the SR-IOV specification, which is not a
/// device gone; all ones in the class code dword is.
@Suite struct ConfigSpaceHealthTests {
  @Test func aVFsAllOnesIdsAreNormalButAnAllOnesClassIsNot() async throws {
    let tree = try DeviceHealthEndToEndTests.tree()
    let engine = NodeEngine(nodeID: "n", platform: LinuxPlatform(sysfs: tree), clock: FixedClock())
    try await engine.rescan()
    let vf = try await engine.snapshot().cards[0].pfs[0].vfs[0].function.address
    let path = tree.sysRoot + "/bus/pci/devices/\(vf)/config"
    try Data([0xff, 0xff, 0xff, 0xff, 0x06, 0x04, 0x10, 0x00, 0x02, 0x02, 0x08, 0x01]).write(
      to: URL(fileURLWithPath: path))
    try await engine.rescan()
    #expect(try await engine.snapshot().cards[0].pfs[0].vfs[0].function.health.state == .healthy)
    try Data(repeating: 0xff, count: 64).write(to: URL(fileURLWithPath: path))
    try await engine.rescan()
    let gone = try await engine.snapshot().cards[0].pfs[0].vfs[0].function.health
    #expect(gone.state == .unhealthy && gone.reasons.map(\.kind) == ["config-unreadable"])
  }
}

/// A VF recorded as attached whose VFIO group no process holds: degraded, with the VM named;
/// healthy again once a VMM holds it.
@Suite struct VFIOHolderHealthTests {
  @Test func anAttachedVFNobodyHoldsIsDegraded() async throws {
    let tree = try DeviceHealthEndToEndTests.tree()
    let platform = LinuxPlatform(sysfs: tree, holders: ProcVFIOHolders(procRoot: tree.procRoot, devRoot: tree.devRoot))
    let vf = PCIAddress("0000:3b:00.4")!
    _ = try await platform.bindToVFIO(vf: vf)
    let group = try #require(try await platform.discover().pfs[0].vfs.first { $0.address == vf }?.iommuGroup)
    let store = MemoryStateStore()
    try await store.commit([
      .putAllocation(
        Allocation(
          id: "alloc-000000000001", vf: vf, pf: PCIAddress("0000:3b:00.0")!, owner: "t", vm: "vm-9",
          idempotencyKey: nil,
          createdAt: WallTime(seconds: 1), numaNode: 0, iommuGroup: group, attached: true,
          deviceID: "alloc-000000000001"))
    ])
    let engine = NodeEngine(nodeID: "n", platform: platform, clock: FixedClock(), store: store)
    _ = try await engine.restore()
    try await engine.rescan()
    var health = try #require(try await engine.snapshot().cards[0].pfs[0].vfs.first { $0.function.address == vf })
      .function.health
    #expect(health.state == .degraded && health.reasons.map(\.kind) == ["vfio-holder"], "\(health)")
    #expect(health.summary.contains("attached to vm-9"))
    tree.hold(vf.description)
    try await engine.rescan()
    health = try #require(try await engine.snapshot().cards[0].pfs[0].vfs.first { $0.function.address == vf }).function
      .health
    #expect(health.state == .healthy, "\(health)")
  }
}
