import ArgumentParser
import FPGACore
import FPGALinux
import Logging

/// `fpga-agent`: runs the node agent (`serve`, the default), or one-shot host commands on the
/// same platform code (`sriov`).
public struct AgentCommand: AsyncParsableCommand {
  public static let configuration = CommandConfiguration(
    commandName: "fpga-agent",
    abstract: "Per-node agent for PCIe FPGA cards: SR-IOV VFs for VMs, over gRPC.",
    discussion: """
      With no arguments it serves a simulated node (two QDMA cards) on 127.0.0.1:50051 and a \
      Unix socket. Each flag overrides the config file and the FPGA_AGENT_* environment.
      """,
    version: AgentRuntime.version,
    subcommands: [Serve.self, SRIOVCommand.self, DRACommand.self],
    defaultSubcommand: Serve.self)

  public init() {}
}

/// The configuration flags shared by every subcommand. Configuration comes from `--config FILE`,
/// then the `FPGA_AGENT_*` environment, then these flags.
public struct ConfigOptions: ParsableArguments {
  @Option(name: .long, help: "YAML configuration file (env FPGA_AGENT_CONFIG).")
  var config: String?

  @Option(name: .long, help: "TCP address HOST:PORT to serve on; empty disables TCP.")
  var listen: String?

  @Option(name: .customLong("unix-socket"), help: "Unix socket path to serve on; empty disables it.")
  var unixSocket: String?

  @Option(name: .customLong("tls-cert"), help: "The agent's TLS certificate chain (PEM) for the TCP listener.")
  var tlsCert: String?

  @Option(name: .customLong("tls-key"), help: "The agent's TLS private key (PEM).")
  var tlsKey: String?

  @Option(name: .customLong("tls-client-ca"), help: "CA bundle (PEM) that client certificates must chain to.")
  var tlsClientCA: String?

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

  @Option(name: .customLong("sysfs-root"), help: "Where sysfs is mounted (linux platform; default /sys).")
  var sysfsRoot: String?

  @Option(name: .customLong("dev-root"), help: "Where device nodes are (linux platform; default /dev).")
  var devRoot: String?

  @Option(
    name: .customLong("selector"),
    help: "Which PCI functions to manage, repeatable: vendor=10ee,device=903f,driver=qdma-pf,address=0000:3b:00.0 (replaces the config's selectors).")
  var selectors: [String] = []

  @Option(name: .customLong("qmp-socket"), help: "A VM's QMP socket, NAME=PATH (repeatable).")
  var qmpSockets: [String] = []

  @Option(name: .customLong("qmp-dir"), help: "A directory whose Unix sockets are VMs' QMP sockets.")
  var qmpDir: String?

  @Option(name: .long, help: "Dial this orchestrator (HOST:PORT) and take its commands (env FPGA_AGENT_ORCHESTRATOR).")
  var orchestrator: String?

  @Flag(name: .customLong("dra"), help: "Serve the Kubernetes DRA kubelet plugin and publish ResourceSlices.")
  var dra = false

  @Option(name: .customLong("dra-driver-name"), help: "The DRA driver's name (default qdma.xilinx.com).")
  var draDriverName: String?

  @Option(name: .customLong("dra-registry-dir"), help: "The kubelet's plugin registry (default /var/lib/kubelet/plugins_registry).")
  var draRegistryDir: String?

  @Option(name: .customLong("dra-plugins-dir"), help: "The kubelet's plugins directory (default /var/lib/kubelet/plugins).")
  var draPluginsDir: String?

  @Option(name: .customLong("cdi-dir"), help: "Where CDI specs are written (default /var/run/cdi).")
  var cdiDir: String?

  @Option(name: .customLong("kube-api-server"), help: "The Kubernetes API (https://HOST:PORT; default: in-cluster).")
  var kubeAPIServer: String?

  @Option(name: .customLong("kube-token-file"), help: "Bearer token file for the Kubernetes API.")
  var kubeTokenFile: String?

  @Option(name: .customLong("kube-ca-file"), help: "CA bundle of the Kubernetes API's certificate.")
  var kubeCAFile: String?

  @Option(
    name: .customLong("http-listen"),
    help: "The dashboard, /metrics and /healthz (HOST:PORT, default 127.0.0.1:50080; empty: off; env FPGA_AGENT_HTTP_LISTEN).")
  var httpListen: String?

  @Option(name: .customLong("orchestrator-tls-cert"), help: "The agent's certificate chain (PEM) for the orchestrator link.")
  var orchestratorTLSCert: String?

  @Option(name: .customLong("orchestrator-tls-key"), help: "The agent's private key (PEM) for the orchestrator link.")
  var orchestratorTLSKey: String?

  @Option(name: .customLong("orchestrator-tls-ca"), help: "CA bundle (PEM) the orchestrator's certificate must chain to.")
  var orchestratorTLSCA: String?

  @Option(
    name: .customLong("kubelet-dir"),
    help: "Serve the Kubernetes device plugin and register with the kubelet in DIR (usually /var/lib/kubelet/device-plugins).")
  var kubeletDir: String?

  @Option(name: .customLong("vf-device-model"), help: "QEMU device model for VFs (default vfio-pci; edu in tests).")
  var vfDeviceModel: String?

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
    if let tlsCert { resolved.server.tls.cert = tlsCert }
    if let tlsKey { resolved.server.tls.key = tlsKey }
    if let tlsClientCA { resolved.server.tls.clientCA = tlsClientCA }
    if let platform { resolved.platform = platform }
    if let stateDir { resolved.stateDir = stateDir }
    if let nodeID { resolved.nodeID = nodeID }
    if let logLevel { resolved.log.level = logLevel }
    if let logFormat { resolved.log.format = logFormat }
    if let sysfsRoot { resolved.linux.sysfsRoot = sysfsRoot }
    if let devRoot { resolved.linux.devRoot = devRoot }
    for entry in qmpSockets {
      guard let equals = entry.firstIndex(of: "="), equals != entry.startIndex else {
        throw ConfigError(problems: ["--qmp-socket \(quoted(entry)) is not NAME=PATH"])
      }
      resolved.qemu.sockets[String(entry[..<equals])] = String(entry[entry.index(after: equals)...])
    }
    if let qmpDir { resolved.qemu.socketDir = qmpDir }
    if let orchestrator { resolved.orchestrator.address = orchestrator }
    if let httpListen { resolved.http.listen = httpListen }
    if dra { resolved.kubernetes.dra.enabled = true }
    if let draDriverName { resolved.kubernetes.dra.driverName = draDriverName }
    if let draRegistryDir { resolved.kubernetes.dra.registryDir = draRegistryDir }
    if let draPluginsDir { resolved.kubernetes.dra.pluginsDir = draPluginsDir }
    if let cdiDir { resolved.kubernetes.dra.cdiDir = cdiDir }
    if let kubeAPIServer { resolved.kubernetes.api.server = kubeAPIServer }
    if let kubeTokenFile { resolved.kubernetes.api.tokenFile = kubeTokenFile }
    if let kubeCAFile { resolved.kubernetes.api.caFile = kubeCAFile }
    if let orchestratorTLSCert { resolved.orchestrator.tls.cert = orchestratorTLSCert }
    if let orchestratorTLSKey { resolved.orchestrator.tls.key = orchestratorTLSKey }
    if let orchestratorTLSCA { resolved.orchestrator.tls.ca = orchestratorTLSCA }
    if let kubeletDir {
      resolved.kubernetes.kubeletDir = kubeletDir
      resolved.kubernetes.devicePlugin = true
    }
    if let vfDeviceModel { resolved.qemu.deviceModel = vfDeviceModel }
    if !selectors.isEmpty { resolved.linux.selectors = try selectors.map(AgentCommand.parseSelector) }
    try resolved.validate()
    return resolved
  }

  /// The resolved configuration, or a usage error listing every bad key.
  func resolvedOrExit() throws -> AgentConfig {
    do {
      return try resolvedConfig(environment: SystemCalls.environment())
    } catch let error as ConfigError {
      throw ValidationError(error.description)
    }
  }
}

/// `fpga-agent serve` (the default): runs the daemon.
struct Serve: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Serve the node API (the default).")

  @OptionGroup var options: ConfigOptions

  @Flag(name: .customLong("dry-run"), help: "Discover, print what would be managed, write nothing, and exit.")
  var dryRun = false

  @Flag(name: .customLong("check-config"), help: "Validate the configuration, print it, and exit.")
  var checkConfig = false

  func run() async throws {
    SystemCalls.lineBufferOutput()
    let resolved = try options.resolvedOrExit()
    if checkConfig {
      print("configuration is valid:")
      print(resolved.summary)
      return
    }
    if dryRun {
      do {
        print(try await DryRun.report(resolved))
      } catch let error as ConfigError {
        throw ValidationError(error.description)
      }
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

extension AgentCommand {
  /// `vendor=10ee,device=903f,driver=qdma-pf,address=0000:3b:00.0` (each part optional).
  static func parseSelector(_ text: String) throws -> PFSelector {
    var selector = PFSelector()
    for part in text.split(separator: ",") {
      let pieces = part.split(separator: "=", maxSplits: 1).map(String.init)
      guard pieces.count == 2 else {
        throw ConfigError(problems: ["--selector \(quoted(text)): \(quoted(String(part))) is not key=value"])
      }
      let value = pieces[1].hasPrefix("0x") ? String(pieces[1].dropFirst(2)) : pieces[1]
      switch pieces[0] {
      case "vendor", "device":
        guard let number = UInt16(value, radix: 16) else {
          throw ConfigError(problems: ["--selector \(quoted(text)): \(pieces[0]) must be 4 hex digits"])
        }
        if pieces[0] == "vendor" { selector.vendors.append(number) } else { selector.devices.append(number) }
      case "driver": selector.drivers.append(pieces[1])
      case "address":
        guard let address = PCIAddress(pieces[1]) else {
          throw ConfigError(problems: ["--selector \(quoted(text)): address must be DDDD:BB:DD.F"])
        }
        selector.pciAddresses.append(address)
      default:
        throw ConfigError(problems: ["--selector \(quoted(text)): unknown key \(quoted(pieces[0])) (vendor, device, driver, address)"])
      }
    }
    return selector
  }
}

extension AgentConfig {
  /// The configuration as YAML, as the agent will use it.
  public var summary: String {
    var lines = [
      "server:",
      "  listen: \(server.listen)",
      "  unix_socket: \(server.unixSocket)",
      "  max_connections: \(server.maxConnections)",
      "  idle_timeout_seconds: \(server.idleTimeoutSeconds)",
      "  max_concurrent_streams: \(server.maxConcurrentStreams)",
      "  max_request_bytes: \(server.maxRequestBytes)",
      "  default_deadline_seconds: \(server.defaultDeadlineSeconds)",
      "  insecure: \(server.insecure)",
      "  tls:",
      "    cert: \(server.tls.cert)",
      "    key: \(server.tls.key)",
      "    client_ca: \(server.tls.clientCA)",
      "    reload_seconds: \(server.tls.reloadSeconds)",
      "health:",
      "  correctable_errors_per_minute: \(health.correctableErrorsPerMinute)",
      "  drain_on_fatal: \(health.drainOnFatal)",
      "http:",
      "  listen: \(http.listen)",
      "  insecure: \(http.insecure)",
      "auth:",
      "  plaintext_role: \(auth.plaintextRole?.rawValue ?? "none")",
      "  root_is_admin: \(auth.rootIsAdmin)",
      "  token_file: \(auth.tokenFile)",
      "  roles:" + (auth.roles.isEmpty ? " {}" : ""),
    ] + auth.roles.sorted { $0.key < $1.key }.map { "    \($0.key): \($0.value.rawValue)" } + [
      "shutdown_timeout_seconds: \(shutdownTimeoutSeconds)",
      "platform: \(platform)",
      "state_dir: \(stateDir)",
      "state_durability: \(stateDurability)",
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
    if !simulator.stateFile.isEmpty { lines.append("  state_file: \(simulator.stateFile)") }
    if !orchestrator.address.isEmpty {
      lines += [
        "orchestrator:", "  address: \(orchestrator.address)", "  heartbeat_seconds: \(orchestrator.heartbeatSeconds)",
        "  role: \(orchestrator.role.rawValue)", "  insecure: \(orchestrator.insecure)",
        "  server_name: \(orchestrator.serverName)", "  tls:", "    cert: \(orchestrator.tls.cert)",
        "    key: \(orchestrator.tls.key)", "    ca: \(orchestrator.tls.ca)",
      ]
    }
    if kubernetes.dra.enabled {
      lines += [
        "dra:", "  driver_name: \(kubernetes.dra.driverName)", "  registry_dir: \(kubernetes.dra.registryDir)",
        "  plugins_dir: \(kubernetes.dra.pluginsDir)", "  cdi_dir: \(kubernetes.dra.cdiDir)",
        "  node_name: \(kubernetes.dra.nodeName)", "  publish_slices: \(kubernetes.dra.publishSlices)",
        "  api_server: \(kubernetes.api.server.isEmpty ? "(in-cluster)" : kubernetes.api.server)",
      ]
    }
    if kubernetes.devicePlugin {
      lines += ["kubernetes:", "  device_plugin: true", "  kubelet_dir: \(kubernetes.kubeletDir)", "  pools:"]
      for pool in kubernetes.pools {
        lines.append("    - resource: \(pool.resource)")
        if !pool.pfs.isEmpty { lines.append("      pfs: \(pool.pfs)") }
      }
    }
    if !faultInjection.isEmpty { lines.append("fault_injection: \(faultInjection)  # TEST SETTING") }
    return lines.joined(separator: "\n")
  }
}

extension AgentCommand {
  /// Parses and runs the daemon; exits with the parser's code on failure.
  public static func execute(_ arguments: [String]) async {
    do {
      var command = try parseAsRoot(arguments)
      if var asyncCommand = command as? any AsyncParsableCommand {
        try await asyncCommand.run()
      } else {
        try command.run()
      }
    } catch {
      exit(withError: error)
    }
  }
}
