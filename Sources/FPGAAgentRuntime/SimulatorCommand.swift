import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import ArgumentParser
import FPGASimulator
import Foundation

/// `fpga-agent simulator …`: what happens to the simulated node's hardware between two runs of
/// the agent, kept in `simulator.state_file`.
struct SimulatorCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "simulator", abstract: "Act on the simulated node's cards kept in simulator.state_file.",
    subcommands: [Reboot.self])

  struct Reboot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Reboot the simulated host: every PF loses its VFs and the boot id changes.",
      discussion: """
        Run it while the agent is stopped (a running agent writes the file again at its next \
        change). At its next start the agent sees the new boot id and restores the recorded VF \
        layouts (layout.restore_on_boot), as after a real reboot.
        """)

    @Option(name: .customLong("state-file"), help: "The agent's simulator.state_file.")
    var stateFile: String

    func run() async throws {
      let text: String?
      do {
        text = try SystemCalls.readFile(stateFile)
      } catch {
        throw ValidationError("\(error)")
      }
      guard let text else {
        throw ValidationError(
          "\(stateFile) does not exist: the agent writes it when simulator.state_file is set; start it once first")
      }
      let hardware: SimulatedNode.Hardware
      do {
        hardware = try JSONDecoder().decode(SimulatedNode.Hardware.self, from: Data(text.utf8))
      } catch {
        throw ValidationError("\(stateFile) is not a simulated node's state (\(error))")
      }
      let node = SimulatedNode(config: SimulatorConfig(cards: []), hardware: hardware) { _ in }
      let before = node.bootID() ?? "none"
      node.reboot()
      do {
        let data = try JSONEncoder().encode(node.hardware)
        try SystemCalls.writeFileAtomically(stateFile, String(decoding: data, as: UTF8.self))
      } catch {
        printError("error: \(stateFile) could not be written: \(error)")
        throw ExitCode(1)
      }
      print(
        "rebooted the simulated host in \(stateFile): every PF has 0 VFs, boot id \(before) → \(node.bootID() ?? "?")")
    }
  }
}
