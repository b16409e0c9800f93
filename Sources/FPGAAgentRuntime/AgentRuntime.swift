import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
public import FPGAAgentConfig
public import FPGAAgentAPI
import Foundation
public import FPGACore
import FPGADevicePlugin
import FPGADRA
public import FPGALinux
import FPGALibvirt
import FPGAQEMU
public import FPGASimulator
import FPGAStore
import GRPCCore
public import GRPCInProcessTransport
import GRPCNIOTransportHTTP2
import NIOCertificateReloading
import NIOCore
import Synchronization
public import Logging
import ServiceLifecycle
import UnixSignals

/// The daemon: the engine on its platform, the node API and health served over TCP and a Unix
/// socket, and the periodic rescan, all in one ServiceGroup that shuts down in reverse order.
public final class AgentRuntime: Sendable {
  public static let version = AgentVersion.current

  public let config: AgentConfig
  public let engine: NodeEngine
  public let health: HealthService
  public let logger: Logger
  /// The simulated node, when the platform is `simulated` (tests drive it).
  public let simulatedNode: SimulatedNode?
  private let tcpServer: GRPCServer<HTTP2ServerTransport.Posix>?
  private let unixServer: GRPCServer<HTTP2ServerTransport.Posix>?
  private let group: ServiceGroup
  let metrics: AgentMetrics
  /// The audit trail (also of what the agent does on its own).
  private let audit: AuditLog
  /// The HTTP listener's port once bound.
  private let httpBound = BoundPort()

  /// Builds everything; serves nothing until `run`.
  public init(
    config: AgentConfig, logger: Logger, clock: any WallClock = SystemWallClock(),
    handleSignals: Bool = false, uevents: (any UeventSource)? = nil, inProcess: InProcessTransport? = nil
  ) throws {
    try config.validate()
    self.config = config
    self.logger = logger

    // Every file the agent creates is private unless it says otherwise (the socket: 0660).
    SystemCalls.restrictFileCreationMask()
    try SystemCalls.makeDirectories(config.stateDir, mode: 0o700)
    try SystemCalls.requirePrivateDirectory(config.stateDir, key: "state_dir")
    let audit = try AuditLog(path: config.stateDir + "/audit.log")
    self.audit = audit
    let nodeID = try Self.nodeID(config: config)

    let platform: any NodePlatform
    switch config.platform {
    case .simulated:
      let node = try Self.simulatedNode(config.simulator)
      simulatedNode = node
      platform = SimulatedPlatform(node: node)
    default:
      simulatedNode = nil
      platform = try Self.linuxPlatform(config.linux, bootIDFile: config.layout.bootIDFile)
    }
    var hypervisor: (any Hypervisor)?
    var libvirt: LibvirtHypervisor?
    if config.hypervisor == .libvirt {
      // libvirt.so.0 is loaded here, at run time: a host without it fails now, saying what to install.
      var settings = LibvirtHypervisor.Settings()
      settings.uri = config.libvirt.uri
      settings.persistentAttach = config.libvirt.persistentAttach
      settings.monitorPause = config.libvirt.qemuMonitorPause
      settings.pauseCommands = config.qemu.pauseCommands
      settings.domainPatterns = config.libvirt.domains
      settings.metadataNamespace = config.libvirt.metadataNamespace.isEmpty ? nil : config.libvirt.metadataNamespace
      do {
        libvirt = try LibvirtHypervisor(settings: settings)
      } catch {
        throw ConfigError(problems: [error.message])
      }
      hypervisor = libvirt
    } else if !config.qemu.isConfigured, let simulatedNode, !config.simulator.vms.isEmpty {
      hypervisor = SimulatedHypervisor(node: simulatedNode, vms: config.simulator.vms)
    }
    if config.hypervisor == .qmp, config.qemu.isConfigured {
      var settings = QEMUHypervisor.Settings()
      settings.sockets = config.qemu.sockets
      settings.socketDirectory = config.qemu.socketDir.isEmpty ? nil : config.qemu.socketDir
      settings.deviceModel = config.qemu.deviceModel
      settings.pauseCommands = config.qemu.pauseCommands
      hypervisor = QEMUHypervisor(settings: settings)
    }
    let store = try SQLiteStateStore(
      path: config.stateDir + "/" + SQLiteStateStore.fileName,
      durability: config.stateDurability == .power ? .power : .process)
    let faults =
      config.faultInjection.isEmpty
      ? nil : try FaultInjection.parse(config.faultInjection) { reason in SystemCalls.crash(reason) }
    let runners = try Self.accelerators(config)
    engine = NodeEngine(
      nodeID: nodeID, platform: platform, clock: clock, hypervisor: hypervisor, store: store, faults: faults,
      detachTimeout: .seconds(config.qemu.detachTimeoutSeconds), accelerators: runners,
      healthPolicy: HealthPolicy(
        correctableErrorsPerMinute: Double(config.health.correctableErrorsPerMinute),
        drainOnFatal: config.health.drainOnFatal))
    health = HealthService(services: [Fpga_Agent_V1_NodeAgent.descriptor.fullyQualifiedService])

    let nodeAgent = NodeAgentService(
      engine: engine, hostname: SystemCalls.hostname(), agentVersion: Self.version, logger: logger,
      defaultDetachTimeout: .seconds(config.qemu.detachTimeoutSeconds),
      auditTrail: { [audit] limit in (audit.last(limit), audit.path) })
    let services: [any RegistrableRPCService] = [nodeAgent, health]
    let metrics = AgentMetrics(
      version: Self.version,
      storeStatistics: { [store] in store.groupStatistics.withLock { ($0.transactions, $0.commits) } })
    self.metrics = metrics
    if let libvirt { metrics.track(libvirt: libvirt) }
    let listeners = (config.server.listen.isEmpty ? 0 : 1) + (config.server.unixSocket.isEmpty ? 0 : 1)

    var reloader: TimedCertificateReloader?
    if let listen = ListenAddress(config.server.listen) {
      let address: GRPCNIOTransportCore.SocketAddress =
        listen.isIPv6 ? .ipv6(host: listen.host, port: listen.port) : .ipv4(host: listen.host, port: listen.port)
      let security: HTTP2ServerTransport.Posix.TransportSecurity
      if config.server.tls.isEnabled {
        // The certificate and key are re-read every reload_seconds (rotation without a restart).
        let timed = try TimedCertificateReloader.makeReloaderValidatingSources(
          refreshInterval: .seconds(config.server.tls.reloadSeconds),
          certificateSource: .init(location: .file(path: config.server.tls.cert), format: .pem),
          privateKeySource: .init(location: .file(path: config.server.tls.key), format: .pem))
        reloader = timed
        security = try .mTLS(certificateReloader: timed) {
          $0.trustRoots = .certificates([.file(path: config.server.tls.clientCA, format: .pem)])
          $0.clientCertificateVerification = .noHostnameVerification
        }
      } else {
        if !listen.isLoopback {
          logger.warning(
            "SERVING PLAINTEXT ON A NETWORK ADDRESS (server.insecure): anyone who reaches it gets auth.plaintext_role",
            metadata: ["fpga.listen": "\(config.server.listen)"])
        }
        security = .plaintext
      }
      tcpServer = GRPCServer(
        transport: .http2NIOPosix(
          address: address, transportSecurity: security,
          config: Self.transportConfig(config.server, listeners: listeners, name: "tcp", logger: logger)),
        services: services,
        interceptors: [
          MetricsInterceptor(metrics: metrics),
          AuthorizationInterceptor(
            resolver: CallerResolver(auth: config.auth, listener: .tcp(tls: config.server.tls.isEnabled)),
            audit: audit, engine: engine),
        ])
    } else {
      tcpServer = nil
    }
    if !config.server.unixSocket.isEmpty {
      let directory = String(config.server.unixSocket.prefix(upTo: config.server.unixSocket.lastIndex(of: "/")!))
      if !directory.isEmpty { try SystemCalls.makeDirectories(directory) }
      try SystemCalls.prepareUnixSocketPath(config.server.unixSocket)
      unixServer = GRPCServer(
        transport: .http2NIOPosix(
          address: .unixDomainSocket(path: config.server.unixSocket), transportSecurity: .plaintext,
          config: Self.transportConfig(config.server, listeners: listeners, name: "unix", unix: true, logger: logger)),
        services: services,
        interceptors: [
          MetricsInterceptor(metrics: metrics),
          AuthorizationInterceptor(
            resolver: CallerResolver(auth: config.auth, listener: .unix), audit: audit, engine: engine),
        ])
    } else {
      unixServer = nil
    }

    var serviceList: [any Service] = []
    if let tcpServer { serviceList.append(ServerService(server: tcpServer, name: "tcp")) }
    // The node API without sockets (tests and embedders that need none): the same services and
    // interceptors; a caller in the agent's own process is admin, audited as `in-process`.
    if let inProcess {
      serviceList.append(
        InProcessServerService(
          server: GRPCServer(
            transport: inProcess.server, services: services,
            interceptors: [
              MetricsInterceptor(metrics: metrics),
              AuthorizationInterceptor(
                resolver: CallerResolver(auth: config.auth, listener: .inProcess), audit: audit, engine: engine),
            ])))
    }
    if let unixServer {
      serviceList.append(
        ServerService(
          server: unixServer, name: "unix", socketPath: config.server.unixSocket,
          socketGroup: config.server.socketGroup,
          logger: logger))
    }
    if let reloader { serviceList.append(reloader) }
    // The agent's own doors (the orchestrator link, the dashboard's JSON API) reach the node API
    // through the same services and interceptors as the sockets; the caller is who the door says.
    let door = NodeDoor(
      services: services,
      interceptors: [
        MetricsInterceptor(metrics: metrics),
        AuthorizationInterceptor(
          resolver: CallerResolver(auth: config.auth, listener: .door), audit: audit, engine: engine),
      ])
    serviceList.append(NodeDoorService(door: door))
    serviceList.append(
      NodeService(
        engine: engine, health: health, logger: logger,
        rescanInterval: config.rescanIntervalSeconds > 0 ? .seconds(config.rescanIntervalSeconds) : nil))
    if let address = ListenAddress(config.orchestrator.address) {
      serviceList.append(
        OrchestratorLink(
          engine: engine, door: door, address: address, hostname: SystemCalls.hostname(), logger: logger,
          heartbeat: .seconds(config.orchestrator.heartbeatSeconds), security: Self.linkSecurity(config.orchestrator),
          serverName: config.orchestrator.serverName.isEmpty ? nil : config.orchestrator.serverName,
          role: config.orchestrator.role, audit: audit, growthFigures: { [metrics] in await metrics.draGrowth() }))
    }
    if config.kubernetes.devicePlugin {
      try SystemCalls.makeDirectories(config.kubernetes.kubeletDir)
      for pool in config.kubernetes.pools {
        let plugin = DevicePlugin(
          engine: engine,
          pool: DevicePluginPool(resourceName: pool.resource, pfs: Set(pool.pfs.compactMap { PCIAddress($0) })),
          directory: config.kubernetes.kubeletDir, logger: logger,
          interceptors: [
            MetricsInterceptor(metrics: metrics), KubeletAuditInterceptor.devicePlugin(audit: audit, engine: engine),
          ])
        metrics.track(resource: pool.resource, plugin.registered)
        serviceList.append(DevicePluginLifecycle(plugin: plugin))
      }
    }
    if config.kubernetes.dra.enabled {
      let settings = config.draSettings(nodeID: nodeID)
      // Explicit settings over a kubeconfig's, else the pod's service account.
      let given = config.kubernetes.api
      let kubeconfig = try given.kubeconfig.isEmpty ? nil : Kubeconfig.load(path: given.kubeconfig)
      let apiSettings = try KubernetesAPISettings.resolve(
        explicit: .init(server: given.server, tokenFile: given.tokenFile, caFile: given.caFile), kubeconfig: kubeconfig,
        context: given.context.isEmpty ? nil : given.context, environment: SystemCalls.environment())
      if let apiSettings { logger.info("DRA: Kubernetes API \(apiSettings.summary)") }
      let api = try apiSettings.map { try KubernetesAPI(settings: $0) }
      if api == nil {
        logger.warning(
          "DRA: no Kubernetes API (kubernetes.api.kubeconfig or server, or in-cluster): claims cannot be prepared, slices are not published"
        )
      }
      let node = engine
      let driver = DRADriver(
        settings: settings, engine: node, store: store, claims: api ?? NoKubernetesAPI(), logger: logger)
      let publisher =
        config.kubernetes.dra.publishSlices
        ? api.map { SlicePublisher(api: $0, settings: settings, engine: node, logger: logger) } : nil
      metrics.track(dra: driver, publisher: publisher)
      serviceList.append(
        DRAService(
          settings: settings, driver: driver, engine: engine, publisher: publisher, api: api, metrics: metrics,
          audit: audit, logger: logger, fenceLimit: .seconds(config.kubernetes.dra.reconfigurationFenceSeconds)))
    }
    if let source = uevents ?? (config.platform == .linux && config.linux.uevents ? NetlinkUevents() : nil) {
      serviceList.append(DeviceEventsService(engine: engine, source: source, logger: logger))
    }
    if let libvirt {
      serviceList.append(HypervisorEventsService(engine: engine, hypervisor: libvirt, logger: logger))
    }
    if !runners.isEmpty {
      serviceList.append(
        AcceleratorService(
          engine: engine, logger: logger, interval: .seconds(config.sharing.metricsIntervalSeconds),
          workloads: config.platform == .simulated ? config.simulator.workloads : []))
    }
    if let listen = ListenAddress(config.http.listen) {
      let bound = httpBound
      serviceList.append(
        try WebServer.application(
          listen: listen, config: config, engine: engine, service: nodeAgent, door: door, metrics: metrics,
          audit: audit,
          logger: logger,
          onListening: { [logger] port in
            bound.set(port)
            logger.info("dashboard on http://\(listen.isIPv6 ? "[\(listen.host)]" : listen.host):\(port)/")
          }))
    }
    let servers = (tcpServer, unixServer)
    serviceList.append(
      SystemdNotifier(
        environment: SystemCalls.environment(), logger: logger,
        listening: {
          _ = try await servers.0?.listeningAddress
          _ = try await servers.1?.listeningAddress
        },
        alive: { [engine] in
          let status = await engine.status()
          return "\(status.counts.cards) cards, \(status.counts.vfsEnabled) VFs, revision \(status.revision)"
        }))
    var groupConfig = ServiceGroupConfiguration(services: serviceList, logger: logger)
    // Bounded: past it, what is left (a stalled watcher, a guest that never acknowledges an
    // unplug) is cancelled, and cancellation itself gets a bound too.
    groupConfig.maximumGracefulShutdownDuration = .seconds(config.shutdownTimeoutSeconds)
    groupConfig.maximumCancellationDuration = .seconds(5)
    if handleSignals {
      groupConfig.gracefulShutdownSignals = [.sigterm, .sigint]
    }
    group = ServiceGroup(configuration: groupConfig)
  }

  /// Scans the platform, then serves until a shutdown signal or `shutdown()`.
  public func run() async throws {
    if !config.faultInjection.isEmpty {
      logger.warning(
        "fault injection is set (a test setting): the agent will exit at that reconfiguration step",
        metadata: ["fpga.fault": "\(config.faultInjection)"])
    }
    let audited = self.audit
    await engine.observeOperations { [metrics] record in
      metrics.operationEnded(record)
      // Operations the agent started for a caller that is not a node API client: a DRA growth
      // is audited under the claim that asked for it.
      if let origin = record.startedBy, origin.hasPrefix("dra") {
        let request =
          #"{"pfBdf":\#(WebAPI.quote(record.target)),"operationId":\#(WebAPI.quote(record.id)),"#
          + #""startedBy":\#(WebAPI.quote(origin))}"#
        audited.append(
          AuditEntry(
            identity: origin, transport: "dra", rpc: "Reconfigure", request: request,
            status: record.state == .succeeded ? "ok" : "failed: \(record.error ?? "")", revision: 0))
      }
    }
    await engine.observeAccelerators { [metrics] event in metrics.accelerator(event) }
    let audit = self.audit
    await engine.observeEndedAllocations { ended in
      // The agent itself ended them: its device left the bus, or its VF vanished.
      let request =
        #"{"allocationId":\#(WebAPI.quote(ended.allocation.id)),"owner":\#(WebAPI.quote(ended.allocation.owner)),"#
        + #""vfBdf":\#(WebAPI.quote(ended.allocation.vf.description)),"reason":\#(WebAPI.quote(ended.reason))}"#
      audit.append(
        AuditEntry(
          identity: "agent", transport: "platform", rpc: "AllocationEnded", request: request, status: "ok",
          revision: ended.revision))
    }
    let persisted = try await engine.restore()
    let restored = await engine.restoreLayouts(persisted, enabled: config.layout.restoreOnBoot)
    if restored.rebooted {
      logger.notice("\(restored.summary)")
      for entry in restored.pfs {
        let request =
          #"{"pfBdf":\#(WebAPI.quote(entry.pf.description)),"foundVfs":\#(entry.found),"recordedVfs":\#(entry.recorded),"#
          + #""operationId":\#(WebAPI.quote(entry.operationID ?? "")),"allocationsKept":\#(entry.allocationsKept),"#
          + #""vfsBound":\#(entry.vfsBound),"result":\#(WebAPI.quote(entry.result.rawValue))}"#
        audit.append(
          AuditEntry(
            identity: "agent", transport: "platform", rpc: "LayoutRestored", request: request,
            status: entry.result == .restored ? "ok" : (entry.result == .skipped ? "skipped" : "failed"),
            revision: await engine.revision))
      }
    }
    try await engine.rescan()
    for id in await engine.recover(from: persisted) {
      logger.warning("taking up an operation left unfinished by the last run", metadata: ["fpga.operation": "\(id)"])
    }
    for discrepancy in await engine.reconcile() {
      logger.warning("records and node disagreed: \(discrepancy)")
    }
    let status = await engine.status()
    logger.info(
      "node scanned",
      metadata: [
        "fpga.node": "\(status.nodeID)", "fpga.platform": "\(status.capabilities.platform)",
        "fpga.cards": "\(status.counts.cards)", "fpga.pfs": "\(status.counts.pfs)",
        "fpga.vfs": "\(status.counts.vfsEnabled)", "fpga.revision": "\(status.revision)",
      ])
    for problem in status.capabilities.problems { logger.warning("\(problem)") }
    try await group.run()
  }

  /// Begins a graceful shutdown: NOT_SERVING, watch streams end, servers close.
  public func shutdown() async {
    await group.triggerGracefulShutdown()
  }

  /// The TCP address actually bound (useful with port 0), once listening.
  public func tcpPort() async throws -> Int? {
    guard let tcpServer else { return nil }
    guard let address = try await tcpServer.listeningAddress else { return nil }
    return address.ipv4?.port ?? address.ipv6?.port
  }

  /// The HTTP listener's port (dashboard, /metrics), once bound; nil when off or not yet bound.
  public var httpPort: Int? { httpBound.value }

  /// Waits until the Unix socket server listens.
  public func unixSocketReady() async throws {
    _ = try await unixServer?.listeningAddress
  }

  /// mTLS to the orchestrator when the link has certificates: the agent's own, and the CA its
  /// certificate (and name) must be verified against.
  static func linkSecurity(_ link: AgentConfig.Orchestrator) -> HTTP2ClientTransport.Posix.TransportSecurity {
    guard link.tls.isEnabled else { return .plaintext }
    return .mTLS(
      certificateChain: [.file(path: link.tls.cert, format: .pem)], privateKey: .file(path: link.tls.key, format: .pem)
    ) {
      $0.trustRoots = .certificates([.file(path: link.tls.ca, format: .pem)])
      $0.serverCertificateVerification = .fullVerification
    }
  }

  /// The Linux platform on the configured roots.
  public static func linuxPlatform(
    _ linux: AgentConfig.Linux, bootIDFile: String = "/proc/sys/kernel/random/boot_id"
  ) throws -> LinuxPlatform {
    let sysfs: LinuxSysfs
    do {
      sysfs = try LinuxSysfs(root: linux.sysfsRoot, devRoot: linux.devRoot, bootIDPath: bootIDFile)
    } catch {
      throw ConfigError(problems: ["linux.sysfs_root \(quoted(linux.sysfsRoot)) cannot be opened: \(error)"])
    }
    return LinuxPlatform(
      sysfs: sysfs, selectors: linux.selectors, watchdog: .seconds(linux.watchdogSeconds),
      holders: ProcVFIOHolders(procRoot: "/proc", devRoot: linux.devRoot))
  }

  /// The accelerators: slots of the simulated cards, or on Linux the configured BAR windows.
  /// The HTTP/2 servers' limits: streams advertised per connection, idle connections closed
  /// (also those that never send the preface), request size, and a cap on connections below
  /// the open-file limit, so that a flood of idle connections cannot exhaust descriptors.
  /// The HTTP/2 servers' limits: streams advertised per connection, idle connections closed
  /// (also those that never send the preface), request size, and a cap on each listener's
  /// connections below the open-file limit, so that a flood of idle connections can neither
  /// exhaust descriptors nor lock the other listener out.
  static func transportConfig(
    _ server: AgentConfig.Server, listeners: Int, name: String, unix: Bool = false, logger: Logger
  ) -> HTTP2ServerTransport.Posix.Config {
    var transport = HTTP2ServerTransport.Posix.Config.defaults
    transport.compression.enabledAlgorithms = .all
    transport.http2.maxConcurrentStreams = server.maxConcurrentStreams
    transport.connection.maxIdleTime = .seconds(server.idleTimeoutSeconds)
    transport.connection.maxGraceTime = .seconds(5)
    transport.rpc.maxRequestPayloadSize = server.maxRequestBytes
    let descriptors = SystemCalls.raiseOpenFileLimit()
    let reserve = min(256, descriptors / 4)
    let cap = min(server.maxConnections, max(16, (descriptors - reserve) / max(1, listeners)))
    if cap < server.maxConnections {
      logger.warning(
        "server.max_connections lowered to stay below the open-file limit",
        metadata: ["fpga.listener": "\(name)", "fpga.limit": "\(cap)", "fpga.nofile": "\(descriptors)"])
    }
    let limiter = ConnectionLimiter(limit: cap, name: name, logger: logger)
    let firstByte = TimeAmount.seconds(Int64(min(server.idleTimeoutSeconds, 10)))
    transport.channelDebuggingCallbacks.onAcceptTCPConnection = { channel in
      guard limiter.accept(channel) else { return channel.eventLoop.makeSucceededVoidFuture() }
      return channel.eventLoop.submit {
        try channel.pipeline.syncOperations.addHandler(FirstByteTimeout(timeout: firstByte), position: .first)
      }
    }
    // Each stream's headers: the peer's uid and gid on the Unix socket (the authorization
    // interceptor reads them; a client's own value is dropped), and the default deadline.
    let deadline = server.defaultDeadlineSeconds > 0 ? "\(server.defaultDeadlineSeconds)S" : nil
    transport.channelDebuggingCallbacks.onAcceptHTTP2Stream = { stream in
      guard unix, let connection = stream.parent else {
        return stream.eventLoop.submit {
          try stream.pipeline.syncOperations.addHandler(
            StreamHeaders(peer: nil, defaultTimeout: deadline), position: .first)
        }
      }
      return StreamHeaders.credentials(of: connection).flatMap { credentials in
        stream.eventLoop.submit {
          try stream.pipeline.syncOperations.addHandler(
            StreamHeaders(peer: credentials ?? "none", defaultTimeout: deadline), position: .first)
        }
      }
    }
    return transport
  }

  static func accelerators(_ config: AgentConfig) throws -> [AcceleratorRunner] {
    let policy = TimeSharingScheduler.Policy(
      slice: .milliseconds(config.sharing.sliceMilliseconds), overcommitLimit: config.sharing.overcommitLimit)
    guard config.platform == .simulated else {
      return try config.linux.accelerators.map { accelerator in
        guard let pf = PCIAddress(accelerator.pf), let id = accelerator.id else {
          throw ConfigError(problems: ["linux.accelerators: \(quoted(accelerator.pf)) is not a PCI address"])
        }
        let path = try SystemCalls.confinedPath(
          config.linux.sysfsRoot, "bus/pci/devices/\(pf)/resource\(accelerator.bar)")
        do throws(AgentError) {
          return AcceleratorRunner(
            spec: AcceleratorSpec(
              id: id, cardID: Card.id(for: pf), nominalSwitchCost: .microseconds(500), policy: policy),
            control: try BARAcceleratorControl(path: path, slot: accelerator.slot))
        } catch {
          throw ConfigError(problems: ["linux.accelerators \(id): \(error.message)"])
        }
      }
    }
    let control = SimulatedAccelerator(
      fixed: .microseconds(config.simulator.acceleratorSwitchMicroseconds),
      bandwidth: UInt64(config.simulator.acceleratorBandwidthMBps) * 1_000_000)
    return config.simulator.cards.flatMap { card in
      (0..<config.simulator.acceleratorsPerCard).map { slot in
        let cardID = "card-" + hex(Int(card.domain), width: 4) + ":" + hex(Int(card.bus), width: 2)
        return AcceleratorRunner(
          spec: AcceleratorSpec(
            id: "\(cardID)/acc\(slot)", cardID: cardID, nominalSwitchCost: control.fixed * 2, policy: policy),
          control: control)
      }
    }
  }

  /// The simulated node, its cards kept in `simulator.state_file` when one is set.
  static func simulatedNode(_ simulator: AgentConfig.Simulator) throws -> SimulatedNode {
    let config = SimulatorConfig(cards: simulator.cards)
    guard !simulator.stateFile.isEmpty else { return SimulatedNode(config: config) }
    let path = simulator.stateFile
    var hardware: SimulatedNode.Hardware?
    if let text = try SystemCalls.readFile(path) {
      do {
        hardware = try JSONDecoder().decode(SimulatedNode.Hardware.self, from: Data(text.utf8))
      } catch {
        throw ConfigError(problems: [
          "simulator.state_file \(path) cannot be read (\(error)); delete it to start from simulator.cards"
        ])
      }
    }
    return SimulatedNode(config: config, hardware: hardware) { hardware in
      guard let data = try? JSONEncoder().encode(hardware) else { return }
      try? SystemCalls.writeFileAtomically(path, String(decoding: data, as: UTF8.self))
    }
  }

  /// The id in `node_id`, else the one kept in the state directory, else a new one (kept).
  static func nodeID(config: AgentConfig) throws -> String {
    if !config.nodeID.isEmpty { return config.nodeID }
    let path = config.stateDir + "/node-id"
    if let stored = try SystemCalls.readFile(path)?.split(separator: "\n").first.map(String.init),
      let valid = try? Validate.vmName(stored, field: "node-id")
    {
      return valid
    }
    let host = SystemCalls.hostname().split(separator: ".").first.map(String.init) ?? "node"
    var generator = SystemRandomNumberGenerator()
    let base = (try? Validate.vmName(host)) ?? "node"
    let id = String(base.prefix(50)) + "-" + hex(Int(generator.next() & 0xffffff), width: 6)
    try SystemCalls.writeFileAtomically(path, id + "\n")
    return id
  }
}
