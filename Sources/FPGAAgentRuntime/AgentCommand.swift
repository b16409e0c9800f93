import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
public import FPGAAgentConfig
public import ArgumentParser
import FPGACore
import FPGALinux
import Logging

/// `fpga-agent`: runs the node agent (`serve`, the default), or one-shot host commands on the
/// same platform code (`sriov`), and the simulated host's reboot (`simulator`).
public struct AgentCommand: AsyncParsableCommand {
  public static let configuration = CommandConfiguration(
    commandName: "fpga-agent",
    abstract: "Per-node agent for PCIe FPGA cards: SR-IOV VFs for VMs, over gRPC.",
    discussion: """
      With no arguments it serves a simulated node (two QDMA cards) on 127.0.0.1:50051 and a \
      Unix socket. Each flag overrides the config file and the FPGA_AGENT_* environment.
      """,
    version: AgentRuntime.version,
    subcommands: [Serve.self, SRIOVCommand.self, DRACommand.self, SimulatorCommand.self, ConfigKeysCommand.self],
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
  var platform: PlatformKind?

  @Option(name: .customLong("state-dir"), help: "Directory for durable state.")
  var stateDir: String?

  @Option(name: .customLong("node-id"), help: "This node's id (default: kept in the state directory).")
  var nodeID: String?

  @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical.")
  var logLevel: Logger.Level?

  @Option(name: .customLong("log-format"), help: "text or json.")
  var logFormat: AgentLogHandler.Format?

  @Option(name: .customLong("sysfs-root"), help: "Where sysfs is mounted (linux platform; default /sys).")
  var sysfsRoot: String?

  @Option(name: .customLong("dev-root"), help: "Where device nodes are (linux platform; default /dev).")
  var devRoot: String?

  @Option(
    name: .customLong("selector"),
    help:
      "Which PCI functions to manage, repeatable: vendor=10ee,device=903f,driver=qdma-pf,address=0000:3b:00.0 (replaces the config's selectors)."
  )
  var selectors: [String] = []

  @Option(
    name: .long, help: "How VMs are reached: qmp (QEMU's monitor sockets) or libvirt (every domain of --libvirt-uri).")
  var hypervisor: HypervisorKind?

  @Option(
    name: .customLong("libvirt-uri"),
    help: "The libvirt connection URI with --hypervisor libvirt (default qemu:///system).")
  var libvirtURI: String?

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

  @Option(
    name: .customLong("dra-registry-dir"),
    help: "The kubelet's plugin registry (default /var/lib/kubelet/plugins_registry).")
  var draRegistryDir: String?

  @Option(
    name: .customLong("dra-plugins-dir"), help: "The kubelet's plugins directory (default /var/lib/kubelet/plugins).")
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
    name: .customLong("kubeconfig"),
    help: "A kubeconfig for the Kubernetes API (env KUBECONFIG, its first file; default: in-cluster).")
  var kubeconfig: String?

  @Option(name: .customLong("kube-context"), help: "The kubeconfig's context (default: its current-context).")
  var kubeContext: String?

  @Option(
    name: .customLong("http-listen"),
    help:
      "The dashboard, /metrics and /healthz (HOST:PORT, default 127.0.0.1:50080; empty: off; env FPGA_AGENT_HTTP_LISTEN)."
  )
  var httpListen: String?

  @Option(
    name: .customLong("orchestrator-tls-cert"), help: "The agent's certificate chain (PEM) for the orchestrator link.")
  var orchestratorTLSCert: String?

  @Option(name: .customLong("orchestrator-tls-key"), help: "The agent's private key (PEM) for the orchestrator link.")
  var orchestratorTLSKey: String?

  @Option(
    name: .customLong("orchestrator-tls-ca"), help: "CA bundle (PEM) the orchestrator's certificate must chain to.")
  var orchestratorTLSCA: String?

  @Option(
    name: .customLong("kubelet-dir"),
    help:
      "Serve the Kubernetes device plugin and register with the kubelet in DIR (usually /var/lib/kubelet/device-plugins)."
  )
  var kubeletDir: String?

  @Option(name: .customLong("vf-device-model"), help: "QEMU device model for VFs (default vfio-pci; edu in tests).")
  var vfDeviceModel: String?

  public init() {}

  @Option(
    name: .customLong("set"),
    help: "KEY=VALUE: any key of the configuration file by its path (repeatable; `fpga-agent config-keys` lists them).")
  var settings: [String] = []

  /// The flags given, by name (as `ConfigKeys` declares them), in the order they apply.
  public var flagValues: [(flag: String, values: [String])] {
    let single: [(String, String?)] = [
      ("--listen", listen), ("--unix-socket", unixSocket), ("--tls-cert", tlsCert), ("--tls-key", tlsKey),
      ("--tls-client-ca", tlsClientCA), ("--platform", platform?.rawValue), ("--state-dir", stateDir),
      ("--node-id", nodeID), ("--log-level", logLevel?.rawValue), ("--log-format", logFormat?.rawValue),
      ("--sysfs-root", sysfsRoot), ("--dev-root", devRoot), ("--hypervisor", hypervisor?.rawValue),
      ("--libvirt-uri", libvirtURI), ("--qmp-dir", qmpDir), ("--orchestrator", orchestrator),
      ("--http-listen", httpListen), ("--dra", dra ? "true" : nil), ("--dra-driver-name", draDriverName),
      ("--dra-registry-dir", draRegistryDir), ("--dra-plugins-dir", draPluginsDir), ("--cdi-dir", cdiDir),
      ("--kube-api-server", kubeAPIServer), ("--kube-token-file", kubeTokenFile), ("--kube-ca-file", kubeCAFile),
      ("--kubeconfig", kubeconfig), ("--kube-context", kubeContext),
      ("--orchestrator-tls-cert", orchestratorTLSCert), ("--orchestrator-tls-key", orchestratorTLSKey),
      ("--orchestrator-tls-ca", orchestratorTLSCA), ("--kubelet-dir", kubeletDir), ("--vf-device-model", vfDeviceModel),
    ]
    var given = single.compactMap { flag, value in value.map { (flag, [$0]) } }
    if !qmpSockets.isEmpty { given.append(("--qmp-socket", qmpSockets)) }
    if !selectors.isEmpty { given.append(("--selector", [selectors.joined(separator: ";")])) }
    return given
  }

  /// The configuration from every source, validated.
  public func resolvedConfig(environment: [String: String]) throws -> AgentConfig {
    try resolve(environment: environment).config
  }

  /// The configuration from every source, validated, with where each value came from.
  public func resolve(environment: [String: String]) throws -> ResolvedConfig {
    var resolved = AgentConfig()
    var sources: [String: ConfigSource] = [:]
    if let path = config ?? environment["FPGA_AGENT_CONFIG"] {
      guard let text = try SystemCalls.readFile(path) else {
        throw ConfigError(problems: ["config file \(path) does not exist"])
      }
      try ConfigLoader.apply(yaml: text, source: path, to: &resolved, sources: &sources)
    }
    try ConfigLoader.apply(environment: environment, to: &resolved, sources: &sources)
    let keys = ConfigKeys.all
    var problems: [String] = []
    for (flag, values) in flagValues {
      guard
        let key = keys.first(where: { $0.flags.contains { $0.split(separator: " ").first.map(String.init) == flag } }),
        let parse = key.parse
      else {
        problems.append("\(flag) sets no configuration key")
        continue
      }
      for value in values {
        if let problem = parse(value, &resolved) { problems.append("\(flag) \(problem)") }
      }
      sources[key.path] = .flag
    }
    if !problems.isEmpty { throw ConfigError(problems: problems) }
    try ConfigLoader.apply(settings: settings, to: &resolved, sources: &sources)
    try resolved.validate()
    return ResolvedConfig(config: resolved, sources: sources)
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
    if checkConfig {
      // Every key, its value and where it came from; or every problem at once.
      do {
        let resolution = try options.resolve(environment: SystemCalls.environment())
        print("configuration is valid:")
        print(resolution.listing)
      } catch let error as ConfigError {
        throw ValidationError(error.description)
      }
      return
    }
    let resolved = try options.resolvedOrExit()
    if dryRun {
      do {
        print(try await DryRun.report(resolved))
      } catch let error as ConfigError {
        throw ValidationError(error.description)
      }
      return
    }
    let level = resolved.log.level
    let format = resolved.log.format
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

extension PlatformKind: ExpressibleByArgument {}
extension HypervisorKind: ExpressibleByArgument {}
extension Durability: ExpressibleByArgument {}
extension AgentLogHandler.Format: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}

/// `fpga-agent config-keys`: every configuration key (the table in docs/operations.md).
struct ConfigKeysCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "config-keys", abstract: "List every configuration key: type, flags, environment, default, meaning.")

  @Flag(name: .long, help: "As the Markdown table of docs/operations.md.")
  var markdown = false

  func run() {
    if markdown {
      print(ConfigKeys.markdownTable)
      return
    }
    for key in ConfigKeys.all {
      let default_ = key.defaultText
      print("\(key.path)  (\(key.type); default: \(default_.isEmpty ? "empty" : default_))")
      var via: [String] = key.flags
      if let env = key.environment { via.append(env) }
      if !via.isEmpty { print("    set by: " + via.joined(separator: ", ") + ", --set") }
      print("    " + key.doc)
    }
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
