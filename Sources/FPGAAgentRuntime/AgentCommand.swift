import ArgumentParser
import FPGACore
import Logging

/// `fpga-agent`: runs the node agent. Configuration comes from `--config FILE`, then the
/// `FPGA_AGENT_*` environment, then these flags.
public struct AgentCommand: AsyncParsableCommand {
  public static let configuration = CommandConfiguration(
    commandName: "fpga-agent",
    abstract: "Per-node agent for PCIe FPGA cards: SR-IOV VFs for VMs, over gRPC.",
    discussion: """
      With no arguments it serves a simulated node (two QDMA cards) on 127.0.0.1:50051 and a
      Unix socket. Each flag overrides the config file and the FPGA_AGENT_* environment.
      """,
    version: AgentRuntime.version)

  @Option(name: .long, help: "YAML configuration file (env FPGA_AGENT_CONFIG).")
  var config: String?

  @Option(name: .long, help: "TCP address HOST:PORT to serve on; empty disables TCP.")
  var listen: String?

  @Option(name: .customLong("unix-socket"), help: "Unix socket path to serve on; empty disables it.")
  var unixSocket: String?

  @Option(name: .long, help: "simulated or linux.")
  var platform: String?

  @Option(name: .customLong("state-dir"), help: "Directory for durable state.")
  var stateDir: String?

  @Option(name: .customLong("node-id"), help: "This node's id (default: kept in the state directory).")
  var nodeID: String?

  @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical.")
  var logLevel: String?

  @Option(name: .customLong("log-format"), help: "text or json.")
  var logFormat: String?

  @Flag(name: .customLong("check-config"), help: "Validate the configuration, print it, and exit.")
  var checkConfig = false

  public init() {}

  /// The configuration from every source, validated.
  public func resolvedConfig(environment: [String: String]) throws -> AgentConfig {
    var resolved = AgentConfig()
    if let path = config ?? environment["FPGA_AGENT_CONFIG"] {
      guard let text = try SystemCalls.readFile(path) else {
        throw ConfigError(problems: ["config file \(path) does not exist"])
      }
      try ConfigLoader.apply(yaml: text, source: path, to: &resolved)
    }
    try ConfigLoader.apply(environment: environment, to: &resolved)
    if let listen { resolved.server.listen = listen }
    if let unixSocket { resolved.server.unixSocket = unixSocket }
    if let platform { resolved.platform = platform }
    if let stateDir { resolved.stateDir = stateDir }
    if let nodeID { resolved.nodeID = nodeID }
    if let logLevel { resolved.log.level = logLevel }
    if let logFormat { resolved.log.format = logFormat }
    try resolved.validate()
    return resolved
  }

  public func run() async throws {
    SystemCalls.lineBufferOutput()
    let resolved: AgentConfig
    do {
      resolved = try resolvedConfig(environment: SystemCalls.environment())
    } catch let error as ConfigError {
      throw ValidationError(error.description)
    }
    if checkConfig {
      print("configuration is valid:")
      print(resolved.summary)
      return
    }
    let level = Logger.Level(rawValue: resolved.log.level) ?? .info
    let format = AgentLogHandler.Format(rawValue: resolved.log.format) ?? .text
    LoggingSystem.bootstrap { label in AgentLogHandler(label: label, level: level, format: format) }
    let logger = Logger(label: "fpga-agent")
    let runtime: AgentRuntime
    do {
      runtime = try AgentRuntime(config: resolved, logger: logger, handleSignals: true)
    } catch let error as ConfigError {
      throw ValidationError(error.description)
    } catch let error as SystemCalls.Failure {
      logger.critical("cannot start", metadata: ["fpga.error": "\(error)"])
      throw ExitCode(1)
    }
    logger.info(
      "fpga-agent starting",
      metadata: [
        "fpga.version": "\(AgentRuntime.version)", "fpga.listen": "\(resolved.server.listen)",
        "fpga.unix_socket": "\(resolved.server.unixSocket)", "fpga.platform": "\(resolved.platform)",
        "fpga.state_dir": "\(resolved.stateDir)",
      ])
    try await runtime.run()
    logger.info("fpga-agent stopped")
  }
}

extension AgentConfig {
  /// The configuration as YAML, as the agent will use it.
  public var summary: String {
    var lines = [
      "server:",
      "  listen: \(server.listen)",
      "  unix_socket: \(server.unixSocket)",
      "platform: \(platform)",
      "state_dir: \(stateDir)",
      "node_id: \(nodeID.isEmpty ? "(from state_dir)" : nodeID)",
      "rescan_interval_seconds: \(rescanIntervalSeconds)",
      "log:",
      "  level: \(log.level)",
      "  format: \(log.format)",
      "simulator:",
      "  cards:",
    ]
    for card in simulator.cards {
      lines.append("    - bus: \"\(hex(Int(card.bus), width: 2))\"")
      lines.append("      numa_node: \(card.numaNode)")
      lines.append("      total_vfs: \(card.totalVFs)")
      lines.append("      enabled_vfs: \(card.enabledVFs)")
    }
    return lines.joined(separator: "\n")
  }
}

extension AgentCommand {
  /// Parses and runs the daemon; exits with the parser's code on failure.
  public static func execute(_ arguments: [String]) async {
    do {
      var command = try parseAsRoot(arguments)
      if var agent = command as? AgentCommand {
        try await agent.run()
      } else {
        try command.run()
      }
    } catch {
      exit(withError: error)
    }
  }
}
