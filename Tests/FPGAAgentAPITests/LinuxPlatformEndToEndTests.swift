import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
import FPGAAgentRuntime
import FPGACore
import FPGALinux
import FPGATestSupport
import GRPCCore
import Testing
import SwiftProtobuf

/// The gRPC API with `platform: linux` on a kernel-faithful fake sysfs tree.
@Suite struct LinuxPlatformEndToEndTests {
  /// A QDMA card with 4 VFs on PF0 (2 bound to vfio-pci) and PF1 without VFs.
  static func tree() throws -> FakeKernelSysfs {
    let tree = try FakeKernelSysfs(pfs: [
      .init("0000:3b:00.0", device: 0x903f, vfDevice: 0xa03f, totalVFs: 64, offset: 4),
      .init("0000:3b:00.1", device: 0x913f, vfDevice: 0xa13f, totalVFs: 60, offset: 67),
    ])
    let pf0 = PCIAddress("0000:3b:00.0")!
    try tree.write(.device(pf0, "sriov_drivers_autoprobe"), "0")
    try tree.write(.device(pf0, "sriov_numvfs"), "4")
    for vf in ["0000:3b:00.6", "0000:3b:00.7"] {
      try tree.write(.device(PCIAddress(vf)!, "driver_override"), "vfio-pci")
      try tree.write(.driversProbe, vf)
    }
    return tree
  }

  static func onTree(_ tree: FakeKernelSysfs) -> (inout AgentConfig) -> Void {
    { config in
      config.platform = .linux
      config.linux.sysfsRoot = tree.sysRoot
      config.linux.devRoot = tree.devRoot
    }
  }

  @Test func inventoryAllocationAndErrorsOnATreeTheAgentHasNeverSeen() async throws {
    let tree = try Self.tree()
    try await TestAgent.with(configure: Self.onTree(tree)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let status = try await nodeAgent.getNodeStatus(.init())
        #expect(status.capabilities.platform == "linux")
        #expect(status.capabilities.iommu && status.capabilities.vfioPci)
        #expect(status.capabilities.qdmaDriver == "qdma-pf")
        #expect(status.health == .serving && status.problems.isEmpty)
        #expect(status.pfs == 2 && status.vfsEnabled == 4 && status.vfsTotal == 124)

        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.cards.map(\.id) == ["card-0000:3b"])
        #expect(inventory.cards[0].model == "Xilinx QDMA Gen3 x16")
        let pf = inventory.cards[0].pfs[0]
        #expect(pf.vfs.map(\.bdf) == ["0000:3b:00.4", "0000:3b:00.5", "0000:3b:00.6", "0000:3b:00.7"])
        #expect(pf.vfs.map(\.driver) == ["", "", "vfio-pci", "vfio-pci"])
        #expect(pf.vfs[2].vfioDevice == "/dev/vfio/\(pf.vfs[2].iommuGroup)")
        #expect(!pf.driversAutoprobe)

        // vfio-pci-bound VFs go first.
        let first = try await nodeAgent.allocateVF(.with { $0.owner = "t" })
        #expect(first.allocation.vfBdf == "0000:3b:00.6")
        let second = try await nodeAgent.allocateVF(.with { $0.owner = "t" })
        #expect(second.allocation.vfBdf == "0000:3b:00.7")
        let third = try await nodeAgent.allocateVF(.with { $0.owner = "t" })
        #expect(third.allocation.vfBdf == "0000:3b:00.4")

        #expect(
          await rpcFailure {
            _ = try await nodeAgent.allocateVF(
              .with {
                $0.owner = "t"; $0.constraints.pfBdf = "0000:3b:00.1"
              })
          }?.0 == .resourceExhausted)
        #expect(
          await rpcFailure {
            _ = try await nodeAgent.allocateVF(
              .with {
                $0.owner = "t"; $0.constraints.pfBdf = "0000:3b:00.0/../x"
              })
          }?.0 == .invalidArgument)
        #expect(
          await rpcFailure {
            _ = try await nodeAgent.allocateVF(
              .with {
                $0.owner = "t"; $0.constraints.pfBdf = "0000:01:00.0"
              })
          }?.0 == .notFound)
        #expect(
          await rpcFailure { _ = try await nodeAgent.releaseVF(.with { $0.allocationID = "alloc-ffffffffffff" }) }?.0
            == .notFound)
        #expect(tree.writes.count == 6, "serving and allocating wrote nothing to sysfs")
      }
    }
  }

  @Test func aRescanTurnsSysfsChangesIntoDeltas() async throws {
    let tree = try Self.tree()
    try await TestAgent.with(configure: Self.onTree(tree)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let allocation = try await nodeAgent.allocateVF(.with { $0.owner = "t" })
        let events = try await nodeAgent.watchInventory(.with { $0.fromRevision = allocation.revision }) { response in
          var events: [Fpga_Agent_V1_InventoryEvent] = []
          // Someone removes the VFs behind the agent's back.
          let pf0 = PCIAddress("0000:3b:00.0")!
          try tree.write(.device(pf0, "sriov_numvfs"), "0")
          let rescan = try await nodeAgent.rescan(.init())
          #expect(rescan.changed && rescan.revision == allocation.revision + 1)
          #expect(try await !nodeAgent.rescan(.init()).changed, "nothing new on a second scan")
          for try await event in response.messages {
            events.append(event)
            break
          }
          return events
        }
        let changes = events[0].delta.changes
        #expect(changes.contains { $0.allocationRemoved == allocation.allocation.id })
        #expect(changes.filter { !$0.vfRemoved.isEmpty }.count == 4)
        #expect(changes.contains { $0.pfUpdated.bdf == "0000:3b:00.0" && $0.pfUpdated.numVfs == 0 })
        #expect(try await nodeAgent.getNodeStatus(.init()).vfsEnabled == 0)
      }
    }
  }

  @Test func aHostWithoutIOMMUOrVFIOIsReportedPlainly() async throws {
    let tree = try FakeKernelSysfs(pfs: [.init("0000:3b:00.0")], drivers: ["qdma-pf"], iommu: false)
    try await TestAgent.with(configure: Self.onTree(tree)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let status = try await nodeAgent.getNodeStatus(.init())
        #expect(status.health == .degraded)
        #expect(status.problems.count == 2)
        #expect(!status.capabilities.iommu && !status.capabilities.vfioPci)
      }
    }
  }

  @Test func dryRunPrintsWhatItWouldManage() async throws {
    let tree = try Self.tree()
    var config = AgentConfig()
    Self.onTree(tree)(&config)
    let report = try await DryRun.report(config)
    let groups = try tree.list(.iommuGroups)
    #expect(
      report.hasPrefix(
        """
        platform linux, sysfs root \(tree.sysRoot), device root \(tree.devRoot)
        IOMMU yes, vfio-pci loaded, QDMA driver qdma-pf
        would manage 2 PFs:
          PF 0000:3b:00.0  10ee:903f  driver qdma-pf  VFs 4/64  offset 4 stride 1  autoprobe 0  NUMA 0  qmax 0
            VF 0 0000:3b:00.4  driver none  override none  IOMMU group 22  no /dev/vfio node
        """))
    #expect(report.hasSuffix("dry run: nothing was written"))
    #expect(!groups.isEmpty)
    #expect(tree.writes.count == 6, "nothing written")
  }
}
