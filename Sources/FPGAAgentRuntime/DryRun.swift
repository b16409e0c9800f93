import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
public import FPGAAgentConfig
import FPGACore
import FPGALinux
import FPGASimulator

/// `fpga-agent --dry-run`: what the agent finds and would manage, without writing anything.
public enum DryRun {
  public static func report(_ config: AgentConfig) async throws -> String {
    let platform: any NodePlatform
    var header: String
    switch config.platform {
    case .simulated:
      platform = SimulatedPlatform(node: SimulatedNode(config: SimulatorConfig(cards: config.simulator.cards)))
      header = "platform simulated"
    default:
      platform = try AgentRuntime.linuxPlatform(config.linux)
      header = "platform linux, sysfs root \(config.linux.sysfsRoot), device root \(config.linux.devRoot)"
    }
    let capabilities = await platform.capabilities()
    let node = try await platform.discover()
    var lines = [
      header,
      "IOMMU \(capabilities.iommu ? "yes" : "no"), vfio-pci \(capabilities.vfioPCI ? "loaded" : "not loaded"), "
        + "QDMA driver \(capabilities.qdmaDriver ?? "none")",
    ]
    lines += capabilities.problems.map { "problem: " + $0 }
    lines.append("would manage \(node.pfs.count) PF\(node.pfs.count == 1 ? "" : "s"):")
    for pf in node.pfs {
      let f = pf.function
      lines.append(
        "  PF \(f.address)  \(hex(Int(f.vendorID), width: 4)):\(hex(Int(f.deviceID), width: 4))  driver \(f.driver ?? "none")  "
          + "VFs \(f.numVFs)/\(f.totalVFs)  offset \(f.vfOffset) stride \(f.vfStride)  autoprobe \(f.driversAutoprobe ? 1 : 0)  "
          + "NUMA \(f.numaNode)  qmax \(f.qmax)")
      for vf in pf.vfs {
        lines.append(
          "    VF \(vf.index) \(vf.address)  driver \(vf.driver ?? "none")  override \(vf.driverOverride ?? "none")  "
            + "IOMMU group \(vf.iommuGroup)  \(vf.vfioDevice ?? "no /dev/vfio node")")
      }
    }
    lines.append("dry run: nothing was written")
    return lines.joined(separator: "\n")
  }
}
