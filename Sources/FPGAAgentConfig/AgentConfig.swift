import FPGACore
import FPGADRA
import FPGADevicePlugin
public import FPGALinux
public import FPGASimulator
public import Logging

/// The agent's configuration: one struct of nested structs. Read from a YAML file, then the
/// environment (`FPGA_AGENT_*`), then flags; each later source overrides the earlier. Validated
/// at start with messages that name the key.
public struct AgentConfig: Hashable, Sendable {
  /// Where the node API is served.
  public struct Server: Hashable, Sendable {
    /// `HOST:PORT` for TCP (`[::1]:50051` for IPv6); empty disables TCP.
    public var listen = "127.0.0.1:50051"
    /// Path of the Unix socket; empty disables it.
    public var unixSocket = AgentConfig.defaultUnixSocket
    /// Most connections served at once, both listeners together; more are closed at accept.
    /// Kept below the open-file limit (which the agent raises to its hard limit at start).
    public var maxConnections = 1024
    /// Seconds a connection may stay without an RPC (or without ever sending the HTTP/2
    /// preface) before it is closed.
    public var idleTimeoutSeconds = 300
    /// Concurrent streams per connection, advertised in SETTINGS_MAX_CONCURRENT_STREAMS
    /// (clients queue the streams beyond it instead of losing the connection).
    public var maxConcurrentStreams = 256
    /// Largest request message accepted, in bytes.
    public var maxRequestBytes = 4 << 20
    /// Deadline of a call whose client sends none (`grpc-timeout`), in seconds; watch streams
    /// are exempt. 0: none.
    public var defaultDeadlineSeconds = 120
    /// TLS on the TCP listener: the agent's certificate chain and key (PEM), and the CA bundle
    /// that client certificates must chain to (client certificates are required).
    public var tls = TLS()
    /// Serve plaintext TCP on an address other than loopback (no identity, no encryption).
    public var insecure = false
    /// The group that may use the Unix socket (mode 0660); empty: the agent's own group.
    public var socketGroup = ""

    public struct TLS: Hashable, Sendable {
      public var cert = ""
      public var key = ""
      public var clientCA = ""
      /// Seconds between re-reads of the certificate and key (rotation without a restart).
      public var reloadSeconds = 30
      public var isEnabled: Bool { !cert.isEmpty || !key.isEmpty || !clientCA.isEmpty }

      public init() {}
    }

    public init() {}
  }

  /// Who may do what.
  public struct Auth: Hashable, Sendable {
    /// Identity → role: `spiffe://…` (a client certificate's URI SAN), `cn:NAME` (its subject
    /// CN), `uid:N` or `gid:N` (a Unix-socket peer).
    public var roles: [String: Role] = [:]
    /// The role of a plaintext TCP caller (loopback, or `server.insecure`); none: refused.
    public var plaintextRole: Role? = .viewer
    /// `TOKEN,NAME` lines: HTTP callers presenting TOKEN are `token:NAME` (map it in `roles`).
    public var tokenFile = ""
    /// Root on the Unix socket is admin unless `roles` says otherwise.
    public var rootIsAdmin = true

    public init() {}
  }

  /// Logging.
  public struct Log: Hashable, Sendable {
    /// trace, debug, info, notice, warning, error, critical.
    public var level: Logger.Level = .info
    /// text or json (one JSON object per line).
    public var format: AgentLogHandler.Format = .text

    public init() {}
  }

  /// The simulated platform.
  public struct Simulator: Hashable, Sendable {
    /// The simulated cards; the default is two QDMA cards with some VFs enabled.
    public var cards = SimulatorConfig.default.cards
    /// Simulated VMs, used when no QEMU is configured (qemu.sockets / qemu.socket_dir).
    public var vms = SimulatedHypervisor.defaultVMs
    /// A file keeping the simulated cards' state across agent restarts (like real hardware,
    /// which outlives the agent); empty: the cards start from `cards` at every start.
    public var stateFile = ""
    /// Accelerator slots per simulated card (`card-DDDD:BB/acc0`, …).
    public var acceleratorsPerCard = 2
    /// Fixed part of a simulated context save or load, in microseconds.
    public var acceleratorSwitchMicroseconds = 200
    /// Bandwidth of a simulated context save or load, in MB/s.
    public var acceleratorBandwidthMBps = 4096
    /// Guests submitting jobs to simulated accelerators, so sharing can be watched live.
    public var workloads: [Workload] = Workload.defaults

    public init() {}
  }

  /// A guest of the workload generator: a job of `job_ms` every `interval_ms`.
  public struct Workload: Hashable, Sendable {
    public var guest: String
    public var accelerator: String
    public var function = "aes256-gcm"
    public var weight = 1
    public var intervalMilliseconds = 10
    public var jobMilliseconds = 3
    public var stateBytes = 1 << 20

    public init(
      guest: String, accelerator: String, weight: Int = 1, intervalMilliseconds: Int = 10, jobMilliseconds: Int = 3
    ) {
      self.guest = guest
      self.accelerator = accelerator
      self.weight = weight
      self.intervalMilliseconds = intervalMilliseconds
      self.jobMilliseconds = jobMilliseconds
    }

    /// Two guests sharing the first card's first accelerator, each asking for 30% of it, with
    /// 1 MiB of state to save and load at every switch.
    public static let defaults = [
      Workload(guest: "tenant-a", accelerator: "card-0000:3b/acc0", weight: 1),
      Workload(guest: "tenant-b", accelerator: "card-0000:3b/acc0", weight: 2),
    ]
  }

  /// Default sharing of every accelerator until SetSharingPolicy changes it.
  public struct Sharing: Hashable, Sendable {
    public var sliceMilliseconds = 10
    public var overcommitLimit = 4
    /// Seconds between accelerator figure updates in the inventory.
    public var metricsIntervalSeconds = 2

    public init() {}
  }

  /// The Linux platform.
  public struct Linux: Hashable, Sendable {
    /// Where sysfs is mounted (a test tree's `sys/` folder in tests).
    public var sysfsRoot = "/sys"
    /// Where device nodes are (`/dev/vfio/N`).
    public var devRoot = "/dev"
    /// Seconds a VF count write may block before the agent reports it (the write goes on).
    public var watchdogSeconds = 15
    /// Which PCI functions are managed; the default matches Xilinx/AMD QDMA PFs.
    public var selectors: [PFSelector] = [.qdma]
    /// Accelerator slots reached through a PF's BAR (register map in docs/accelerator-registers.md).
    public var accelerators: [BARAccelerator] = []
    /// Rescan on the kernel's PCI uevents (add, remove, bind, unbind, change).
    public var uevents = true

    public init() {}
  }

  public var health = Health()

  public var layout = Layout()

  /// What the agent does with the VF layouts it recorded (see `PFLayout`).
  public struct Layout: Hashable, Sendable {
    /// Re-create recorded layouts after a host reboot.
    public var restoreOnBoot = true
    /// The kernel's boot id (linux platform).
    public var bootIDFile = "/proc/sys/kernel/random/boot_id"

    public init() {}
  }

  /// Device health thresholds.
  public struct Health: Hashable, Sendable {
    /// Correctable AER errors per minute above which a device is degraded.
    public var correctableErrorsPerMinute = 60
    /// Drain a PF automatically when it reports an uncorrectable fatal error.
    public var drainOnFatal = false

    public init() {}
  }

  /// An accelerator slot in a PCI BAR: `sysfs_root/bus/pci/devices/PF/resourceBAR`, window `slot`.
  public struct BARAccelerator: Hashable, Sendable {
    public var pf = ""
    public var bar = 2
    public var slot = 0

    public init(pf: String = "", bar: Int = 2, slot: Int = 0) {
      self.pf = pf
      self.bar = bar
      self.slot = slot
    }

    /// `card-DDDD:BB/accN`, N being the slot.
    public var id: String? { PCIAddress(pf).map { "\(Card.id(for: $0))/acc\(slot)" } }
  }

  /// VMs reached over QMP.
  public struct QEMU: Hashable, Sendable {
    /// VM name → QMP socket path.
    public var sockets: [String: String] = [:]
    /// A directory whose Unix sockets are VMs' QMP sockets (NAME.sock, NAME.qmp or NAME).
    public var socketDir = ""
    /// The QEMU device model VFs are plugged in as (`vfio-pci`; an emulated stand-in like `edu` in tests).
    public var deviceModel = "vfio-pci"
    /// QMP commands that pause/resume a VFIO device (a patched QEMU); detected with query-commands.
    public var pauseCommands = ["x-vfio-pause", "x-vfio-resume"]
    /// How long DetachVF waits for the guest to acknowledge an unplug, unless the request says.
    public var detachTimeoutSeconds = 10

    package var isConfigured: Bool { !sockets.isEmpty || !socketDir.isEmpty }

    public init() {}
  }

  /// VMs managed by libvirt (`hypervisor: libvirt`).
  public struct Libvirt: Hashable, Sendable {
    /// The connection URI.
    public var uri = "qemu:///system"
    /// Attach to (and detach from) a persistent domain's definition too, not only the running
    /// domain: the VF is still there after libvirt restarts the domain.
    public var persistentAttach = false
    /// Pause and resume VFIO devices through libvirt's QEMU monitor passthrough (libvirt marks
    /// each running domain tainted: custom-monitor). Off: re-layouts under libvirt domains replug.
    public var qemuMonitorPause = false
    /// Shell patterns of the domain names served; empty: every domain.
    public var domains: [String] = []
    /// Serve only domains with an element of this namespace in their `<metadata>`; empty: no such
    /// condition.
    public var metadataNamespace = ""

    public init() {}
  }

  public var server = Server()
  public var auth = Auth()
  public var linux = Linux()
  public var qemu = QEMU()
  /// `qmp` (the default: QEMU's monitor sockets, else the simulated VMs) or `libvirt`.
  public var hypervisor: HypervisorKind = .qmp
  public var libvirt = Libvirt()
  public var log = Log()
  /// `simulated` (the default) or `linux`.
  public var platform: PlatformKind = .simulated
  /// Directory for the agent's durable state: `node-id` and `state.sqlite`.
  public var stateDir = AgentConfig.defaultStateDir
  /// `process` (a commit survives the agent's crash) or `power` (each commit is flushed to the
  /// disk before it is answered: survives power loss, costs an fsync per change).
  public var stateDurability: Durability = .process
  /// Test setting: `crash-before:STEP`, `crash-after:STEP` or `fail:STEP` of a reconfiguration
  /// (STEP: a step index or kind). Empty in production.
  public var faultInjection = ""
  /// The node's id; empty: the one kept in the state directory, or a new one.
  public var nodeID = ""
  /// Seconds between platform rescans; 0 disables periodic rescans.
  public var rescanIntervalSeconds = 30
  /// Seconds a graceful shutdown may take (streams ended, calls finished) before what is left
  /// is cancelled; an unfinished reconfiguration is resumed from its journal at the next start.
  public var shutdownTimeoutSeconds = 10
  public var simulator = Simulator()
  public var sharing = Sharing()
  public var kubernetes = Kubernetes()
  public var orchestrator = Orchestrator()
  public var http = HTTP()

  /// The HTTP listener: the dashboard, `/metrics`, `/healthz` and the dashboard's JSON endpoints.
  public struct HTTP: Hashable, Sendable {
    /// `HOST:PORT`; empty disables it.
    public var listen = "127.0.0.1:50080"
    /// Serve it on an address other than loopback without TLS (tokens travel in clear).
    public var insecure = false

    public init() {}
  }

  /// The link to a cluster orchestrator.
  public struct Orchestrator: Hashable, Sendable {
    /// `HOST:PORT` of the orchestrator's Connect service; empty: no link.
    public var address = ""
    /// Seconds between heartbeats.
    public var heartbeatSeconds = 2
    /// mTLS to the orchestrator: the agent's certificate chain and key (PEM), and the CA bundle
    /// the orchestrator's certificate must chain to. All empty: plaintext, loopback only
    /// unless `insecure`.
    public var tls = TLS()
    /// The name the orchestrator's certificate must carry (a DNS or IP SAN); empty: the host
    /// of `address`.
    public var serverName = ""
    /// The role the orchestrator's commands run with (`admin` to let it reconfigure, drain
    /// and set sharing policies).
    public var role: Role = .operator
    /// Dial a non-loopback orchestrator without TLS (anyone on the path could command the node).
    public var insecure = false

    public struct TLS: Hashable, Sendable {
      public var cert = ""
      public var key = ""
      public var ca = ""
      public var isEnabled: Bool { !cert.isEmpty || !key.isEmpty || !ca.isEmpty }

      public init() {}
    }

    public init() {}
  }

  /// The kubelet device plugin.
  public struct Kubernetes: Hashable, Sendable {
    /// Serve the device plugin and register with the kubelet.
    public var devicePlugin = false
    /// The kubelet's device plugin directory (kubelet.sock is there).
    public var kubeletDir = "/var/lib/kubelet/device-plugins"
    /// Resource pools: a resource name and the PFs whose VFs it offers (empty: all).
    public var pools: [Pool] = [Pool()]
    /// Dynamic Resource Allocation: the kubelet plugin and the node's ResourceSlices.
    public var dra = DRA()
    /// The Kubernetes API (ResourceClaims, ResourceSlices); empty server: in-cluster.
    public var api = API()

    public struct Pool: Hashable, Sendable {
      public var resource = "xilinx.com/qdma-vf"
      public var pfs: [String] = []

      public init() {}
    }

    public struct DRA: Hashable, Sendable {
      public var enabled = false
      /// The driver's name (a DNS subdomain).
      public var driverName = "qdma.xilinx.com"
      public var registryDir = "/var/lib/kubelet/plugins_registry"
      public var pluginsDir = "/var/lib/kubelet/plugins"
      public var cdiDir = "/var/run/cdi"
      /// The Kubernetes node's name (pool and slices); empty: the agent's node id.
      public var nodeName = ""
      /// Publish ResourceSlices (needs the API).
      public var publishSlices = true
      public var reconfigurationFenceSeconds = 10
      /// Grow on demand (`GrowthPolicy`).
      public var growOnDemand = false
      public var growPFs: [String] = []
      public var growMaxVFs = 0
      public var growStep = 1
      public var growAllowReplug = false

      public init() {}
    }

    /// Explicit settings override the kubeconfig's; without either, the pod's (in-cluster).
    public struct API: Hashable, Sendable {
      /// `https://HOST:PORT`; empty: the kubeconfig's, else KUBERNETES_SERVICE_HOST/PORT.
      public var server = ""
      /// Empty: the kubeconfig user's, else the service account's.
      public var tokenFile = ""
      public var caFile = ""
      /// A kubeconfig file (the first of `KUBECONFIG`'s list); empty: none.
      public var kubeconfig = ""
      /// The kubeconfig's context; empty: its current-context.
      public var context = ""

      public init() {}
    }

    public init() {}
  }

  public init() {}

  package static var isRoot: Bool { SystemCalls.effectiveUserID() == 0 }

  package static var defaultUnixSocket: String {
    if isRoot { return "/run/fpga-agent/agent.sock" }
    if let runtime = SystemCalls.environment("XDG_RUNTIME_DIR"), !runtime.isEmpty {
      return runtime + "/fpga-agent.sock"
    }
    return "/tmp/fpga-agent-\(SystemCalls.effectiveUserID()).sock"
  }

  package static var defaultStateDir: String {
    if isRoot { return "/var/lib/fpga-agent" }
    if let home = SystemCalls.environment("HOME"), !home.isEmpty {
      return home + "/.local/state/fpga-agent"
    }
    return "/tmp/fpga-agent-\(SystemCalls.effectiveUserID())-state"
  }

  /// Checks every value; throws a `ConfigError` listing each bad key.
  public func validate() throws(ConfigError) {
    // Each key's own range, choices, absolute path (ConfigKeys), then the rules across keys.
    var problems = ConfigKeys.all.compactMap { $0.check(self) }
    if hypervisor == .libvirt && qemu.isConfigured {
      problems.append(
        "hypervisor is libvirt but qemu.sockets or qemu.socket_dir is set (--qmp-socket, --qmp-dir): libvirt owns its "
          + "domains' QMP monitors; choose one backend")
    }
    if libvirt.domains.contains("") {
      problems.append("libvirt.domains has an empty pattern: name the domains to serve, or leave the list out")
    }
    if hypervisor == .libvirt && libvirt.uri.isEmpty {
      problems.append("libvirt.uri is empty: hypervisor: libvirt needs a connection URI (qemu:///system)")
    }
    if server.listen.isEmpty && server.unixSocket.isEmpty {
      problems.append("server.listen and server.unix_socket are both empty: the agent would serve nothing")
    }
    if server.tls.isEnabled {
      for (key, value) in [
        ("server.tls.cert", server.tls.cert), ("server.tls.key", server.tls.key),
        ("server.tls.client_ca", server.tls.clientCA),
      ] {
        if value.isEmpty {
          problems.append(
            "\(key) is empty: TLS needs server.tls.cert, server.tls.key and server.tls.client_ca (--tls-cert, --tls-key, --tls-client-ca)"
          )
        } else if !SystemCalls.isReadableFile(value) {
          problems.append("\(key) \(quoted(value)) is not a readable file")
        }
      }
    } else if let address = ListenAddress(server.listen), !address.isLoopback, !server.insecure {
      problems.append(
        "server.listen \(server.listen) is not a loopback address and no TLS is configured: set server.tls.cert, "
          + "server.tls.key and server.tls.client_ca (--tls-cert, --tls-key, --tls-client-ca; FPGA_AGENT_TLS_*), "
          + "or server.insecure: true to serve plaintext anyway")
    }
    if orchestrator.tls.isEnabled {
      for (key, value) in [
        ("orchestrator.tls.cert", orchestrator.tls.cert), ("orchestrator.tls.key", orchestrator.tls.key),
        ("orchestrator.tls.ca", orchestrator.tls.ca),
      ] {
        if value.isEmpty {
          problems.append(
            "\(key) is empty: the link's TLS needs orchestrator.tls.cert, orchestrator.tls.key and orchestrator.tls.ca "
              + "(--orchestrator-tls-cert, --orchestrator-tls-key, --orchestrator-tls-ca)")
        } else if !SystemCalls.isReadableFile(value) {
          problems.append("\(key) \(quoted(value)) is not a readable file")
        }
      }
    } else if let address = ListenAddress(orchestrator.address), !address.isLoopback, !orchestrator.insecure {
      problems.append(
        "orchestrator.address \(orchestrator.address) is not a loopback address and the link has no TLS: set "
          + "orchestrator.tls.cert, orchestrator.tls.key and orchestrator.tls.ca (--orchestrator-tls-cert, "
          + "--orchestrator-tls-key, --orchestrator-tls-ca; FPGA_AGENT_ORCHESTRATOR_TLS_*), or orchestrator.insecure: "
          + "true to take commands over plaintext anyway")
    }
    if !http.listen.isEmpty {
      if let address = ListenAddress(http.listen) {
        if !address.isLoopback, !http.insecure {
          problems.append(
            "http.listen \(http.listen) is not a loopback address: the dashboard has no TLS of its own; keep it on "
              + "loopback (behind a TLS proxy), or set http.insecure: true to serve it anyway")
        }
      } else {
        problems.append("http.listen \(quoted(http.listen)) is not HOST:PORT")
      }
    }
    if !auth.tokenFile.isEmpty, !SystemCalls.isReadableFile(auth.tokenFile) {
      problems.append("auth.token_file \(quoted(auth.tokenFile)) is not a readable file")
    }
    for identity in auth.roles.keys.sorted() where !Auth.isIdentity(identity) {
      problems.append("auth.roles key \(quoted(identity)) is not spiffe://…, cn:NAME, token:NAME, uid:N or gid:N")
    }
    if !server.listen.isEmpty, ListenAddress(server.listen) == nil {
      problems.append("server.listen \(quoted(server.listen)) is not HOST:PORT (e.g. 127.0.0.1:50051 or [::1]:50051)")
    }
    if !server.unixSocket.isEmpty {
      if server.unixSocket.utf8.count > 107 {
        problems.append(
          "server.unix_socket is \(server.unixSocket.utf8.count) bytes; Unix socket paths are limited to 107")
      }
    }
    if stateDir.isEmpty {
      problems.append("state_dir \(quoted(stateDir)) must be an absolute path")
    }
    if !faultInjection.isEmpty {
      do throws(AgentError) {
        _ = try FaultInjection.parse(faultInjection) { _ in fatalError("unused") }
      } catch {
        problems.append(error.message)
      }
    }
    for (index, workload) in simulator.workloads.enumerated() {
      let key = "simulator.workloads[\(index)]"
      if (try? Validate.vmName(workload.guest, field: "guest")) == nil || workload.guest.isEmpty {
        problems.append("\(key).guest \(quoted(workload.guest)) must be 1-64 of A-Z a-z 0-9 . _ -")
      }
      if !(1...1000).contains(workload.weight) { problems.append("\(key).weight must be 1-1000") }
      if !(1...60_000).contains(workload.intervalMilliseconds) { problems.append("\(key).interval_ms must be 1-60000") }
      if !(1...60_000).contains(workload.jobMilliseconds) { problems.append("\(key).job_ms must be 1-60000") }
      if !(0...Int(ContextLimits.savedStateBytes)).contains(workload.stateBytes) {
        problems.append(
          "\(key).state_bytes \(workload.stateBytes) is out of range: 0-\(ContextLimits.savedStateBytes) (256 MiB)")
      }
    }
    var acceleratorIDs = Set<String>()
    for (index, accelerator) in linux.accelerators.enumerated() {
      let key = "linux.accelerators[\(index)]"
      guard let id = accelerator.id else {
        problems.append("\(key).pf \(quoted(accelerator.pf)) is not a PCI address (DDDD:BB:DD.F)")
        continue
      }
      if !(0...5).contains(accelerator.bar) { problems.append("\(key).bar must be 0-5") }
      if !(0...63).contains(accelerator.slot) { problems.append("\(key).slot must be 0-63") }
      if !acceleratorIDs.insert(id).inserted { problems.append("\(key) repeats accelerator \(id)") }
    }
    if !orchestrator.address.isEmpty, ListenAddress(orchestrator.address) == nil {
      problems.append("orchestrator.address \(quoted(orchestrator.address)) is not HOST:PORT")
    }
    if kubernetes.dra.enabled {
      let name = kubernetes.dra.driverName
      let labels = name.split(separator: ".", omittingEmptySubsequences: false)
      if name.count > 63 || labels.count < 2
        || !labels.allSatisfy({ label in
          !label.isEmpty && label.allSatisfy { $0.isLowercase || $0.isNumber || $0 == "-" } && label.first != "-"
            && label.last != "-"
        })
      {
        problems.append(
          "kubernetes.dra.driver_name \(quoted(name)) is not a DNS subdomain of at most 63 characters with a dot (e.g. qdma.xilinx.com)"
        )
      }
      if !kubernetes.api.server.isEmpty, !kubernetes.api.server.hasPrefix("https://") {
        problems.append("kubernetes.api.server \(quoted(kubernetes.api.server)) must be an https:// URL")
      }
      if !kubernetes.api.context.isEmpty, kubernetes.api.kubeconfig.isEmpty {
        problems.append(
          "kubernetes.api.context \(quoted(kubernetes.api.context)) chooses a context, but no kubeconfig is given (kubernetes.api.kubeconfig, --kubeconfig, KUBECONFIG)"
        )
      }
    }
    if kubernetes.devicePlugin {
      if !kubernetes.kubeletDir.hasPrefix("/") {
        problems.append("kubernetes.kubelet_dir \(quoted(kubernetes.kubeletDir)) must be an absolute path")
      } else if kubernetes.kubeletDir.utf8.count > 60 {
        problems.append("kubernetes.kubelet_dir is too long for the Unix socket paths in it (at most 60 bytes)")
      }
      if kubernetes.pools.isEmpty {
        problems.append("kubernetes.pools is empty: the device plugin would offer nothing")
      }
    }
    var resources = Set<String>()
    for (index, pool) in kubernetes.pools.enumerated() {
      if !DevicePluginPool.validate(pool.resource) {
        problems.append(
          "kubernetes.pools[\(index)].resource \(quoted(pool.resource)) is not domain/name (e.g. xilinx.com/qdma-vf)")
      }
      if !resources.insert(pool.resource).inserted {
        problems.append("kubernetes.pools[\(index)].resource repeats \(pool.resource)")
      }
      for pf in pool.pfs where PCIAddress(pf) == nil {
        problems.append("kubernetes.pools[\(index)].pfs: \(quoted(pf)) is not a PCI address (DDDD:BB:DD.F)")
      }
    }
    if !nodeID.isEmpty, (try? Validate.vmName(nodeID, field: "node_id")) == nil {
      problems.append("node_id \(quoted(nodeID)) must be 1-64 of A-Z a-z 0-9 . _ -")
    }
    problems += SimulatorConfig(cards: simulator.cards).problems()
    var vmNames = Set<String>()
    for (index, vm) in simulator.vms.enumerated() {
      if (try? Validate.vmName(vm.name)) == nil {
        problems.append("simulator.vms[\(index)].name \(quoted(vm.name)) must be 1-64 of A-Z a-z 0-9 . _ -")
      }
      if !vmNames.insert(vm.name).inserted { problems.append("simulator.vms[\(index)].name \(vm.name) is used twice") }
      if !(0...32).contains(vm.rootPorts) { problems.append("simulator.vms[\(index)].root_ports must be 0-32") }
    }
    for (name, path) in qemu.sockets.sorted(by: { $0.key < $1.key }) {
      if (try? Validate.vmName(name)) == nil {
        problems.append(
          "qemu.sockets: VM name \(quoted(name)) must be 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -")
      }
      if !path.hasPrefix("/") { problems.append("qemu.sockets.\(name) \(quoted(path)) must be an absolute path") }
    }
    if qemu.deviceModel.isEmpty
      || !qemu.deviceModel.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" })
    {
      problems.append("qemu.device_model \(quoted(qemu.deviceModel)) is not a QEMU device model name")
    }
    if linux.selectors.isEmpty { problems.append("linux.selectors is empty: the agent would manage nothing") }
    if !problems.isEmpty { throw ConfigError(problems: problems) }
  }
}
