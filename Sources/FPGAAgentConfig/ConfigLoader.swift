import FPGACore
package import FPGALinux
package import FPGASimulator
import Yams

/// Builds an `AgentConfig` from its sources, in order: defaults, YAML file, environment.
/// (Flags are applied last by the command.) Every key comes from `ConfigKeys.all`: unknown keys
/// and ill-typed values are errors that name the key's path, all reported at once.
public enum ConfigLoader {
  /// Reads `yaml` (a file's text) over `config`.
  public static func apply(yaml: String, source: String, to config: inout AgentConfig) throws(ConfigError) {
    var sources: [String: ConfigSource] = [:]
    try apply(yaml: yaml, source: source, to: &config, sources: &sources)
  }

  package static func apply(
    yaml: String, source: String, to config: inout AgentConfig, sources: inout [String: ConfigSource]
  ) throws(ConfigError) {
    let root: Any?
    do {
      root = try Yams.load(yaml: yaml)
    } catch {
      throw ConfigError(problems: ["\(source) is not valid YAML: \(error)"])
    }
    guard let root else { return }
    guard root is [String: Any] else {
      throw ConfigError(problems: ["\(source): the top level must be a mapping of keys"])
    }
    let keys = ConfigKeys.all
    let leaves = Dictionary(keys.map { ($0.path, $0) }, uniquingKeysWith: { a, _ in a })
    let sections = Set(
      keys.flatMap { key in
        let parts = key.path.split(separator: ".")
        return (1..<parts.count).map { parts[..<$0].joined(separator: ".") }
      })
    let reader = ConfigReader(problems: [])
    func walk(_ value: Any, _ prefix: String) {
      reader.mapping(value, prefix) { name, value, _ in
        let path = prefix.isEmpty ? name : prefix + "." + name
        if let key = leaves[path] {
          key.read(value, path, reader, &config)
          sources[path] = .file
        } else if sections.contains(path) {
          walk(value, path)
        } else {
          reader.unknown(path)
        }
      }
    }
    walk(root, "")
    if !reader.problems.isEmpty {
      throw ConfigError(problems: reader.problems.map { "\(source): \($0)" })
    }
  }

  /// Applies the `FPGA_AGENT_*` variables found in `environment` over `config`.
  public static func apply(environment: [String: String], to config: inout AgentConfig) throws(ConfigError) {
    var sources: [String: ConfigSource] = [:]
    try apply(environment: environment, to: &config, sources: &sources)
  }

  package static func apply(
    environment: [String: String], to config: inout AgentConfig, sources: inout [String: ConfigSource]
  ) throws(ConfigError) {
    var problems: [String] = []
    for key in ConfigKeys.all {
      guard let variable = key.environment, let value = environment[variable], let parse = key.parse else { continue }
      if let problem = parse(value, &config) {
        problems.append("\(variable) (\(key.path)) \(problem)")
      } else {
        sources[key.path] = .environment
      }
    }
    if !problems.isEmpty { throw ConfigError(problems: problems) }
  }

  /// `KEY=VALUE` settings (`--set`), in order.
  package static func apply(settings: [String], to config: inout AgentConfig, sources: inout [String: ConfigSource])
    throws(ConfigError)
  {
    var problems: [String] = []
    for setting in settings {
      guard let equals = setting.firstIndex(of: "=") else {
        problems.append("--set \(quoted(setting)) is not KEY=VALUE")
        continue
      }
      let path = String(setting[..<equals])
      let value = String(setting[setting.index(after: equals)...])
      guard let key = ConfigKeys.key(path) else {
        problems.append("--set: unknown key \(path) (`fpga-agent config-keys` lists them)")
        continue
      }
      guard let parse = key.parse else {
        problems.append("--set: \(path) is a \(key.type) and can only be set in the configuration file")
        continue
      }
      if let problem = parse(value, &config) {
        problems.append("--set \(path) \(problem)")
      } else {
        sources[path] = .flag
      }
    }
    if !problems.isEmpty { throw ConfigError(problems: problems) }
  }
}

/// Walks YAML values, collecting a problem per bad key instead of stopping at the first.
package final class ConfigReader {
  package var problems: [String]

  package init(problems: [String]) { self.problems = problems }

  package func unknown(_ path: String) {
    problems.append("unknown key \(path)")
  }

  package func mapping(_ value: Any, _ path: String, _ body: (String, Any, String) -> Void) {
    guard let map = value as? [String: Any] else {
      problems.append("\(path) must be a mapping")
      return
    }
    for (key, value) in map.sorted(by: { $0.key < $1.key }) { body(key, value, path + "." + key) }
  }

  package func string(_ value: Any, _ path: String) -> String? {
    if let text = value as? String { return text }
    if let number = value as? Int { return String(number) }
    problems.append("\(path) must be a string")
    return nil
  }

  package func int(_ value: Any, _ path: String) -> Int? {
    if let number = value as? Int { return number }
    if let text = value as? String, let number = Int(text) { return number }
    problems.append("\(path) must be a whole number")
    return nil
  }

  package func bool(_ value: Any, _ path: String) -> Bool? {
    if let flag = value as? Bool { return flag }
    problems.append("\(path) must be true or false")
    return nil
  }

  package func roles(_ value: Any, _ path: String) -> [String: Role]? {
    var roles: [String: Role] = [:]
    mapping(value, path) { identity, value, path in
      guard let text = string(value, path) else { return }
      guard let role = Role(rawValue: text) else {
        return problems.append("\(path) \(quoted(text)) is not a role: viewer, operator or admin")
      }
      roles[identity] = role
    }
    return roles
  }

  /// A list of PCI addresses (`DDDD:BB:DD.F`).
  package func addresses(_ value: Any, _ path: String) -> [String]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of PCI addresses (DDDD:BB:DD.F)")
      return nil
    }
    var found: [String] = []
    for (index, item) in list.enumerated() {
      guard let text = string(item, "\(path)[\(index)]") else { return nil }
      guard let address = PCIAddress(text) else {
        problems.append("\(path)[\(index)] \(quoted(text)) is not a PCI address (DDDD:BB:DD.F)")
        return nil
      }
      found.append(address.description)
    }
    return found
  }

  package func ints(_ value: Any, _ path: String) -> [Int]? {
    guard let list = value as? [Any] else {
      problems.append("\(path) must be a list of whole numbers")
      return nil
    }
    let numbers = list.enumerated().compactMap { int($1, "\(path)[\($0)]") }
    return numbers.count == list.count ? numbers : nil
  }

  /// A number given as an integer, or as hex text like "3b" / "0x3b".
  package func hexByte(_ value: Any, _ path: String, limit: Int) -> Int? {
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

  package func selectors(_ value: Any, _ path: String) -> [PFSelector]? {
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
        case "vendors":
          selector.vendors = items.enumerated().compactMap {
            hexByte($1, "\(path)[\($0)]", limit: 0xffff).map(UInt16.init)
          }
        case "devices":
          selector.devices = items.enumerated().compactMap {
            hexByte($1, "\(path)[\($0)]", limit: 0xffff).map(UInt16.init)
          }
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

  package func pools(_ value: Any, _ path: String) -> [AgentConfig.Kubernetes.Pool]? {
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

  package func barAccelerators(_ value: Any, _ path: String) -> [AgentConfig.BARAccelerator]? {
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

  package func workloads(_ value: Any, _ path: String) -> [AgentConfig.Workload]? {
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

  package func vms(_ value: Any, _ path: String) -> [SimulatedHypervisor.VM]? {
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

  package func cards(_ value: Any, _ path: String) -> [SimulatorConfig.Card]? {
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
