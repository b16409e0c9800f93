import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import ArgumentParser
import FPGACore
import FPGALinux

/// `fpga-agent sriov …`: one-shot host operations through the Linux platform's code (the same
/// paths the daemon uses), for operators and for tests against a real kernel.
struct SRIOVCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "sriov", abstract: "One-shot SR-IOV operations on this host (linux platform).",
    subcommands: [Discover.self, SetVFs.self, BindVFIO.self, Unbind.self, SetQmax.self])

  /// The Linux platform from the resolved configuration.
  static func platform(_ options: ConfigOptions) throws -> LinuxPlatform {
    let config = try options.resolvedOrExit()
    do {
      return try AgentRuntime.linuxPlatform(config.linux)
    } catch let error as ConfigError {
      throw ValidationError(error.description)
    }
  }

  static func address(_ text: String, _ field: String) throws -> PCIAddress {
    do {
      return try PCIAddress.parse(text, field: field)
    } catch {
      throw ValidationError(error.message)
    }
  }

  /// Runs `body` on the platform and the parsed address; an agent error is printed and exits 1.
  static func perform(
    _ options: ConfigOptions, _ text: String, _ field: String,
    _ body: (LinuxPlatform, PCIAddress) async throws(AgentError) -> String
  ) async throws {
    let platform = try platform(options)
    let address = try address(text, field)
    do {
      print(try await body(platform, address))
    } catch {
      throw fail(error)
    }
  }

  /// Prints an agent error as the daemon would report it and exits 1.
  static func fail(_ error: AgentError) -> ExitCode {
    printError("error: \(error.code.rawValue): \(error.message)\(error.cause.map { " (\($0))" } ?? "")")
    return ExitCode(1)
  }

  struct Discover: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print what the linux platform finds and would manage.")
    @OptionGroup var options: ConfigOptions

    func run() async throws {
      var config = try options.resolvedOrExit()
      config.platform = .linux
      print(try await DryRun.report(config))
    }
  }

  struct SetVFs: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "set-vfs", abstract: "Set a PF's VF count (autoprobe off, through 0, re-read).")
    @OptionGroup var options: ConfigOptions
    @Argument(help: "The PF (DDDD:BB:DD.F).") var pf: String
    @Argument(help: "The VF count wanted.") var count: Int

    func run() async throws {
      try await SRIOVCommand.perform(options, pf, "PF") { (platform, address) throws(AgentError) in
        try await platform.setVFCount(pf: address, to: count)
        return "PF \(address) has \(count) VFs"
      }
    }
  }

  struct BindVFIO: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "bind-vfio", abstract: "Bind a VF to vfio-pci and wait for /dev/vfio/N.")
    @OptionGroup var options: ConfigOptions
    @Argument(help: "The VF (DDDD:BB:DD.F).") var vf: String

    func run() async throws {
      try await SRIOVCommand.perform(options, vf, "VF") { (platform, address) throws(AgentError) in
        "VF \(address) is bound to vfio-pci: \(try await platform.bindToVFIO(vf: address))"
      }
    }
  }

  struct SetQmax: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "set-qmax", abstract: "Set a QDMA function's queue count (qdma/qmax).")
    @OptionGroup var options: ConfigOptions
    @Argument(help: "The function (DDDD:BB:DD.F).") var function: String
    @Argument(help: "Queues, 0-2048.") var qmax: Int

    func run() async throws {
      guard (0...2048).contains(qmax) else { throw ValidationError("qmax must be 0-2048 (QDMA has 2048 queue sets)") }
      try await SRIOVCommand.perform(options, function, "function") { (platform, address) throws(AgentError) in
        try platform.setQmax(pf: address, to: qmax)
        return "\(address) has qmax \(qmax)"
      }
    }
  }

  struct Unbind: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Unbind a VF from its driver and clear driver_override.")
    @OptionGroup var options: ConfigOptions
    @Argument(help: "The VF (DDDD:BB:DD.F).") var vf: String

    func run() async throws {
      try await SRIOVCommand.perform(options, vf, "VF") { (platform, address) throws(AgentError) in
        try platform.unbind(vf: address)
        return "VF \(address) is unbound"
      }
    }
  }
}

func printError(_ line: String) {
  var standardError = StandardError()
  print(line, to: &standardError)
}

struct StandardError: TextOutputStream {
  mutating func write(_ string: String) { SystemCalls.writeStandardError(string) }
}
