import FPGACore
import FPGALinux
import FPGASimulator
import Yams

/// Builds an `AgentConfig` from its sources, in order: defaults, YAML file, environment.
/// (Flags are applied last by the command.) Unknown keys and ill-typed values are errors that
/// name the key.
public enum ConfigLoader {
  /// The environment variables read, each overriding one key.
  public static let environmentKeys: [(variable: String, key: String)] = [
    ("FPGA_AGENT_LISTEN", "server.listen"),
    ("FPGA_AGENT_UNIX_SOCKET", "server.unix_socket"),
    ("FPGA_AGENT_PLATFORM", "platform"),
    ("FPGA_AGENT_STATE_DIR", "state_dir"),
    ("FPGA_AGENT_NODE_ID", "node_id"),
    ("FPGA_AGENT_RESCAN_INTERVAL_SECONDS", "rescan_interval_seconds"),
    ("FPGA_AGENT_SHUTDOWN_TIMEOUT_SECONDS", "shutdown_timeout_seconds"),
    ("FPGA_AGENT_MAX_CONNECTIONS", "server.max_connections"),
    ("FPGA_AGENT_IDLE_TIMEOUT_SECONDS", "server.idle_timeout_seconds"),
    ("FPGA_AGENT_TLS_CERT", "server.tls.cert"),
    ("FPGA_AGENT_TLS_KEY", "server.tls.key"),
    ("FPGA_AGENT_TLS_CLIENT_CA", "server.tls.client_ca"),
    ("FPGA_AGENT_INSECURE", "server.insecure"),
    ("FPGA_AGENT_HTTP_LISTEN", "http.listen"),
    ("FPGA_AGENT_ORCHESTRATOR_TLS_CERT", "orchestrator.tls.cert"),
    ("FPGA_AGENT_ORCHESTRATOR_TLS_KEY", "orchestrator.tls.key"),
    ("FPGA_AGENT_ORCHESTRATOR_TLS_CA", "orchestrator.tls.ca"),
    ("FPGA_AGENT_LOG_LEVEL", "log.level"),
    ("FPGA_AGENT_LOG_FORMAT", "log.format"),
    ("FPGA_AGENT_SYSFS_ROOT", "linux.sysfs_root"),
    ("FPGA_AGENT_DEV_ROOT", "linux.dev_root"),
    ("FPGA_AGENT_QMP_DIR", "qemu.socket_dir"),
    ("FPGA_AGENT_STATE_DURABILITY", "state_durability"),
    ("FPGA_AGENT_FAULT_INJECTION", "fault_injection"),
    ("FPGA_AGENT_SIMULATOR_STATE_FILE", "simulator.state_file"),
    ("FPGA_AGENT_KUBELET_DIR", "kubernetes.kubelet_dir"),
    ("FPGA_AGENT_ORCHESTRATOR", "orchestrator.address"),
  ]

  /// Reads `yaml` (a file's text) over `config`.
  public static func apply(yaml: String, source: String, to config: inout AgentConfig) throws(ConfigError) {
    let root: Any?
    do {
      root = try Yams.load(yaml: yaml)
    } catch {
      throw ConfigError(problems: ["\(source) is not valid YAML: \(error)"])
    }
    guard let root else { return }
    guard let top = root as? [String: Any] else {
      throw ConfigError(problems: ["\(source): the top level must be a mapping of keys"])
    }
    var problems: [String] = []
    let reader = Reader(problems: [])
    for (key, value) in top.sorted(by: { $0.key < $1.key }) {
      switch key {
      case "server":
        reader.mapping(value, "server") { key, value, path in
          switch key {
          case "listen": reader.string(value, path).map { config.server.listen = $0 }
          case "unix_socket": reader.string(value, path).map { config.server.unixSocket = $0 }
          case "max_connections": reader.int(value, path).map { config.server.maxConnections = $0 }
          case "idle_timeout_seconds": reader.int(value, path).map { config.server.idleTimeoutSeconds = $0 }
          case "max_concurrent_streams": reader.int(value, path).map { config.server.maxConcurrentStreams = $0 }
          case "max_request_bytes": reader.int(value, path).map { config.server.maxRequestBytes = $0 }
          case "default_deadline_seconds": reader.int(value, path).map { config.server.defaultDeadlineSeconds = $0 }
          case "insecure": reader.bool(value, path).map { config.server.insecure = $0 }
          case "socket_group": reader.string(value, path).map { config.server.socketGroup = $0 }
          case "tls":
            reader.mapping(value, path) { key, value, path in
              switch key {
              case "cert": reader.string(value, path).map { config.server.tls.cert = $0 }
              case "key": reader.string(value, path).map { config.server.tls.key = $0 }
              case "client_ca": reader.string(value, path).map { config.server.tls.clientCA = $0 }
              case "reload_seconds": reader.int(value, path).map { config.server.tls.reloadSeconds = $0 }
              default: reader.unknown(path)
              }
            }
          default: reader.unknown(path)
          }
        }
      case "auth":
        reader.mapping(value, "auth") { key, value, path in
          switch key {
          case "roles":
            reader.mapping(value, path) { identity, value, path in
              guard let text = reader.string(value, path) else { return }
              guard let role = Role(rawValue: text) else {
                return reader.problems.append("\(path) \(quoted(text)) is not a role: viewer, operator or admin")
              }
              config.auth.roles[identity] = role
            }
          case "plaintext_role":
            guard let text = reader.string(value, path) else { break }
            if text == "none" {
              config.auth.plaintextRole = nil
            } else if let role = Role(rawValue: text) {
              config.auth.plaintextRole = role
            } else {
              reader.problems.append("\(path) \(quoted(text)) is not a role: viewer, operator, admin or none")
            }
          case "root_is_admin": reader.bool(value, path).map { config.auth.rootIsAdmin = $0 }
          case "token_file": reader.string(value, path).map { config.auth.tokenFile = $0 }
          default: reader.unknown(path)
          }
        }
      case "log":
        reader.mapping(value, "log") { key, value, path in
          switch key {
          case "level": reader.string(value, path).map { config.log.level = $0 }
          case "format": reader.string(value, path).map { config.log.format = $0 }
          default: reader.unknown(path)
          }
        }
      case "platform": reader.string(value, key).map { config.platform = $0 }
      case "state_dir": reader.string(value, key).map { config.stateDir = $0 }
      case "state_durability": reader.string(value, key).map { config.stateDurability = $0 }
      case "fault_injection": reader.string(value, key).map { config.faultInjection = $0 }
      case "node_id": reader.string(value, key).map { config.nodeID = $0 }
      case "rescan_interval_seconds": reader.int(value, key).map { config.rescanIntervalSeconds = $0 }
      case "shutdown_timeout_seconds": reader.int(value, key).map { config.shutdownTimeoutSeconds = $0 }
      case "linux":
        reader.mapping(value, "linux") { key, value, path in
          switch key {
          case "sysfs_root": reader.string(value, path).map { config.linux.sysfsRoot = $0 }
          case "dev_root": reader.string(value, path).map { config.linux.devRoot = $0 }
          case "watchdog_seconds": reader.int(value, path).map { config.linux.watchdogSeconds = $0 }
          case "selectors": reader.selectors(value, path).map { config.linux.selectors = $0 }
          case "accelerators": reader.barAccelerators(value, path).map { config.linux.accelerators = $0 }
          case "uevents": reader.bool(value, path).map { config.linux.uevents = $0 }
          default: reader.unknown(path)
          }
        }
      case "health":
        reader.mapping(value, "health") { key, value, path in
          switch key {
          case "correctable_errors_per_minute":
            reader.int(value, path).map { config.health.correctableErrorsPerMinute = $0 }
          case "drain_on_fatal": reader.bool(value, path).map { config.health.drainOnFatal = $0 }
          default: reader.unknown(path)
          }
        }
      case "qemu":
        reader.mapping(value, "qemu") { key, value, path in
          switch key {
          case "sockets":
            reader.mapping(value, path) { name, value, path in
              reader.string(value, path).map { config.qemu.sockets[name] = $0 }
            }
          case "socket_dir": reader.string(value, path).map { config.qemu.socketDir = $0 }
          case "device_model": reader.string(value, path).map { config.qemu.deviceModel = $0 }
          case "detach_timeout_seconds": reader.int(value, path).map { config.qemu.detachTimeoutSeconds = $0 }
          case "pause_commands":
            let items = (value as? [Any]) ?? [value]
            config.qemu.pauseCommands = items.enumerated().compactMap { reader.string($1, "\(path)[\($0)]") }
          default: reader.unknown(path)
          }
        }
      case "simulator":
        reader.mapping(value, "simulator") { key, value, path in
          switch key {
          case "cards": reader.cards(value, path).map { config.simulator.cards = $0 }
          case "vms": reader.vms(value, path).map { config.simulator.vms = $0 }
          case "state_file": reader.string(value, path).map { config.simulator.stateFile = $0 }
          case "accelerators_per_card": reader.int(value, path).map { config.simulator.acceleratorsPerCard = $0 }
          case "accelerator_switch_us": reader.int(value, path).map { config.simulator.acceleratorSwitchMicroseconds = $0 }
          case "accelerator_bandwidth_mb_s": reader.int(value, path).map { config.simulator.acceleratorBandwidthMBps = $0 }
          case "workloads": reader.workloads(value, path).map { config.simulator.workloads = $0 }
          default: reader.unknown(path)
          }
        }
      case "http":
        reader.mapping(value, "http") { key, value, path in
          switch key {
          case "listen": reader.string(value, path).map { config.http.listen = $0 }
          case "insecure": reader.bool(value, path).map { config.http.insecure = $0 }
          default: reader.unknown(path)
          }
        }
      case "orchestrator":
        reader.mapping(value, "orchestrator") { key, value, path in
          switch key {
          case "address": reader.string(value, path).map { config.orchestrator.address = $0 }
          case "heartbeat_seconds": reader.int(value, path).map { config.orchestrator.heartbeatSeconds = $0 }
          case "server_name": reader.string(value, path).map { config.orchestrator.serverName = $0 }
          case "insecure": reader.bool(value, path).map { config.orchestrator.insecure = $0 }
          case "role":
            guard let text = reader.string(value, path) else { break }
            guard let role = Role(rawValue: text) else {
              reader.problems.append("\(path) \(quoted(text)) is not a role: viewer, operator or admin")
              break
            }
            config.orchestrator.role = role
          case "tls":
            reader.mapping(value, path) { key, value, path in
              switch key {
              case "cert": reader.string(value, path).map { config.orchestrator.tls.cert = $0 }
              case "key": reader.string(value, path).map { config.orchestrator.tls.key = $0 }
              case "ca": reader.string(value, path).map { config.orchestrator.tls.ca = $0 }
              default: reader.unknown(path)
              }
            }
          default: reader.unknown(path)
          }
        }
      case "kubernetes":
        reader.mapping(value, "kubernetes") { key, value, path in
          switch key {
          case "device_plugin": reader.bool(value, path).map { config.kubernetes.devicePlugin = $0 }
          case "kubelet_dir": reader.string(value, path).map { config.kubernetes.kubeletDir = $0 }
          case "pools": reader.pools(value, path).map { config.kubernetes.pools = $0 }
          case "dra":
            reader.mapping(value, path) { key, value, path in
              switch key {
              case "enabled": reader.bool(value, path).map { config.kubernetes.dra.enabled = $0 }
              case "driver_name": reader.string(value, path).map { config.kubernetes.dra.driverName = $0 }
              case "registry_dir": reader.string(value, path).map { config.kubernetes.dra.registryDir = $0 }
              case "plugins_dir": reader.string(value, path).map { config.kubernetes.dra.pluginsDir = $0 }
              case "cdi_dir": reader.string(value, path).map { config.kubernetes.dra.cdiDir = $0 }
              case "node_name": reader.string(value, path).map { config.kubernetes.dra.nodeName = $0 }
              case "publish_slices": reader.bool(value, path).map { config.kubernetes.dra.publishSlices = $0 }
              default: reader.unknown(path)
              }
            }
          case "api":
            reader.mapping(value, path) { key, value, path in
              switch key {
              case "server": reader.string(value, path).map { config.kubernetes.api.server = $0 }
              case "token_file": reader.string(value, path).map { config.kubernetes.api.tokenFile = $0 }
              case "ca_file": reader.string(value, path).map { config.kubernetes.api.caFile = $0 }
              default: reader.unknown(path)
              }
            }
          default: reader.unknown(path)
          }
        }
      case "sharing":
        reader.mapping(value, "sharing") { key, value, path in
          switch key {
          case "slice_ms": reader.int(value, path).map { config.sharing.sliceMilliseconds = $0 }
          case "overcommit_limit": reader.int(value, path).map { config.sharing.overcommitLimit = $0 }
          case "metrics_interval_seconds": reader.int(value, path).map { config.sharing.metricsIntervalSeconds = $0 }
          default: reader.unknown(path)
          }
        }
      default: reader.unknown(key)
      }
    }
    problems += reader.problems
    if !problems.isEmpty {
      throw ConfigError(problems: problems.map { "\(source): \($0)" })
    }
  }

  /// Applies the `FPGA_AGENT_*` variables found in `environment` over `config`.
  public static func apply(environment: [String: String], to config: inout AgentConfig) throws(ConfigError) {
    var problems: [String] = []
    for (variable, key) in environmentKeys {
      guard let value = environment[variable] else { continue }
      switch key {
      case "server.listen": config.server.listen = value
      case "server.unix_socket": config.server.unixSocket = value
      case "server.tls.cert": config.server.tls.cert = value
      case "server.tls.key": config.server.tls.key = value
      case "server.tls.client_ca": config.server.tls.clientCA = value
      case "server.insecure":
        guard let flag = ["true": true, "1": true, "false": false, "0": false][value] else {
          problems.append("\(variable) (server.insecure) \(quoted(value)) is not true or false")
          continue
        }
        config.server.insecure = flag
      case "platform": config.platform = value
      case "state_dir": config.stateDir = value
      case "node_id": config.nodeID = value
      case "log.level": config.log.level = value
      case "log.format": config.log.format = value
      case "linux.sysfs_root": config.linux.sysfsRoot = value
      case "linux.dev_root": config.linux.devRoot = value
      case "qemu.socket_dir": config.qemu.socketDir = value
      case "state_durability": config.stateDurability = value
      case "fault_injection": config.faultInjection = value
      case "simulator.state_file": config.simulator.stateFile = value
      case "orchestrator.address": config.orchestrator.address = value
      case "http.listen": config.http.listen = value
      case "orchestrator.tls.cert": config.orchestrator.tls.cert = value
      case "orchestrator.tls.key": config.orchestrator.tls.key = value
      case "orchestrator.tls.ca": config.orchestrator.tls.ca = value
      case "kubernetes.kubelet_dir":
        config.kubernetes.kubeletDir = value
        config.kubernetes.devicePlugin = true
      case "rescan_interval_seconds", "shutdown_timeout_seconds", "server.max_connections",
        "server.idle_timeout_seconds":
        guard let number = Int(value) else {
          problems.append("\(variable) (\(key)) \(quoted(value)) is not a whole number")
          continue
        }
        switch key {
        case "rescan_interval_seconds": config.rescanIntervalSeconds = number
        case "shutdown_timeout_seconds": config.shutdownTimeoutSeconds = number
        case "server.max_connections": config.server.maxConnections = number
        default: config.server.idleTimeoutSeconds = number
        }
      default:
        problems.append("\(variable) names key \(key), which the environment cannot set")
      }
    }
    if !problems.isEmpty { throw ConfigError(problems: problems) }
  }
}

/// Walks YAML values, collecting a problem per bad key instead of stopping at the first.
private final class Reader {
  var problems: [String]

  init(problems: [String]) { self.problems = problems }

  func unknown(_ path: String) {
    problems.append("unknown key \(path)")
  }

  func mapping(_ value: Any, _ path: String, _ body: (String, Any, String) -> Void) {
    guard let map = value as? [String: Any] else {
      problems.append("\(path) must be a mapping")
      return
    }
    for (key, value) in map.sorted(by: { $0.key < $1.key }) { body(key, value, path + "." + key) }
  }

  func string(_ value: Any, _ path: String) -> String? {
    if let text = value as? String { return text }
    if let number = value as? Int { return String(number) }
    problems.append("\(path) must be a string")
    return nil
  }

  func int(_ value: Any, _ path: String) -> Int? {
    if let number = value as? Int { return number }
    if let text = value as? String, let number = Int(text) { return number }
    problems.append("\(path) must be a whole number")
    return nil
  }

  func bool(_ value: Any, _ path: String) -> Bool? {
    if let flag = value as? Bool { return flag }
    problems.append("\(path) must be true or false")
    return nil
  }

  func ints(_ value: Any, _ path: String) -> [Int]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of whole numbers")
      return nil
    }
    let numbers = list.enumerated().compactMap { int($1, "\(path)[\($0)]") }
    return numbers.count == list.count ? numbers : nil
  }

  /// A number given as an integer, or as hex text like "3b" / "0x3b".
  func hexByte(_ value: Any, _ path: String, limit: Int) -> Int? {
    var number: Int?
    if let int = value as? Int { number = int }
    if let text = value as? String {
      number = Int(text.hasPrefix("0x") ? String(text.dropFirst(2)) : text, radix: 16)
    }
    guard let number, (0...limit).contains(number) else {
      problems.append("\(path) must be a number from 0 to \(limit) (or hex text like \"3b\")")
      return nil
    }
    return number
  }

  func selectors(_ value: Any, _ path: String) -> [PFSelector]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of selectors")
      return nil
    }
    var selectors: [PFSelector] = []
    for (index, item) in list.enumerated() {
      var selector = PFSelector()
      mapping(item, "\(path)[\(index)]") { key, value, path in
        let items = (value as? [Any]) ?? [value]
        switch key {
        case "vendors": selector.vendors = items.enumerated().compactMap { hexByte($1, "\(path)[\($0)]", limit: 0xffff).map(UInt16.init) }
        case "devices": selector.devices = items.enumerated().compactMap { hexByte($1, "\(path)[\($0)]", limit: 0xffff).map(UInt16.init) }
        case "drivers": selector.drivers = items.enumerated().compactMap { string($1, "\(path)[\($0)]") }
        case "pci_addresses":
          selector.pciAddresses = items.enumerated().compactMap { offset, item in
            guard let text = string(item, "\(path)[\(offset)]") else { return nil }
            guard let address = PCIAddress(text) else {
              problems.append("\(path)[\(offset)] \(quoted(text)) is not a PCI address (DDDD:BB:DD.F)")
              return nil
            }
            return address
          }
        default: unknown(path)
        }
      }
      selectors.append(selector)
    }
    return selectors
  }

  func pools(_ value: Any, _ path: String) -> [AgentConfig.Kubernetes.Pool]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of {resource, pfs}")
      return nil
    }
    return list.enumerated().map { index, item in
      var pool = AgentConfig.Kubernetes.Pool()
      mapping(item, "\(path)[\(index)]") { key, value, path in
        switch key {
        case "resource": string(value, path).map { pool.resource = $0 }
        case "pfs":
          let items = (value as? [Any]) ?? [value]
          pool.pfs = items.enumerated().compactMap { string($1, "\(path)[\($0)]") }
        default: unknown(path)
        }
      }
      return pool
    }
  }

  func barAccelerators(_ value: Any, _ path: String) -> [AgentConfig.BARAccelerator]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of {pf, bar, slot}")
      return nil
    }
    return list.enumerated().map { index, item in
      var accelerator = AgentConfig.BARAccelerator()
      mapping(item, "\(path)[\(index)]") { key, value, path in
        switch key {
        case "pf": string(value, path).map { accelerator.pf = $0 }
        case "bar": int(value, path).map { accelerator.bar = $0 }
        case "slot": int(value, path).map { accelerator.slot = $0 }
        default: unknown(path)
        }
      }
      return accelerator
    }
  }

  func workloads(_ value: Any, _ path: String) -> [AgentConfig.Workload]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of workloads")
      return nil
    }
    return list.enumerated().map { index, item in
      var workload = AgentConfig.Workload(guest: "", accelerator: "")
      mapping(item, "\(path)[\(index)]") { key, value, path in
        switch key {
        case "guest": string(value, path).map { workload.guest = $0 }
        case "accelerator": string(value, path).map { workload.accelerator = $0 }
        case "function": string(value, path).map { workload.function = $0 }
        case "weight": int(value, path).map { workload.weight = $0 }
        case "interval_ms": int(value, path).map { workload.intervalMilliseconds = $0 }
        case "job_ms": int(value, path).map { workload.jobMilliseconds = $0 }
        case "state_bytes": int(value, path).map { workload.stateBytes = $0 }
        default: unknown(path)
        }
      }
      return workload
    }
  }

  func vms(_ value: Any, _ path: String) -> [SimulatedHypervisor.VM]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of VMs")
      return nil
    }
    return list.enumerated().map { index, item in
      var vm = SimulatedHypervisor.VM(name: "vm-\(index + 1)")
      mapping(item, "\(path)[\(index)]") { key, value, path in
        switch key {
        case "name": string(value, path).map { vm.name = $0 }
        case "root_ports": int(value, path).map { vm.rootPorts = $0 }
        case "vfio_pause": bool(value, path).map { vm.vfioPause = $0 }
        case "acknowledges_unplug": bool(value, path).map { vm.acknowledgesUnplug = $0 }
        default: unknown(path)
        }
      }
      return vm
    }
  }

  func cards(_ value: Any, _ path: String) -> [SimulatorConfig.Card]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of cards")
      return nil
    }
    var cards: [SimulatorConfig.Card] = []
    for (index, item) in list.enumerated() {
      var card = SimulatorConfig.Card(bus: UInt8(truncatingIfNeeded: 0x3b + index * 0x20), numaNode: 0)
      mapping(item, "\(path)[\(index)]") { key, value, path in
        switch key {
        case "bus": hexByte(value, path, limit: 0xff).map { card.bus = UInt8($0) }
        case "domain": hexByte(value, path, limit: 0xffff).map { card.domain = UInt16($0) }
        case "numa_node": int(value, path).map { card.numaNode = $0 }
        case "total_vfs": ints(value, path).map { card.totalVFs = $0 }
        case "enabled_vfs": ints(value, path).map { card.enabledVFs = $0 }
        case "bind_to_vfio": bool(value, path).map { card.bindToVFIO = $0 }
        case "mailbox": bool(value, path).map { card.mailbox = $0 }
        default: unknown(path)
        }
      }
      cards.append(card)
    }
    return cards
  }
}
