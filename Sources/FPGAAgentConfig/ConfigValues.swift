import FPGACore
package import FPGADRA
package import FPGALinux

/// The agent's version, as every surface reports it.
package enum AgentVersion {
  package static let current = "0.1.0"
}

/// An invalid configuration: each problem names its key.
public struct ConfigError: Error, Hashable, Sendable, CustomStringConvertible {
  public var problems: [String]

  public var description: String {
    "invalid configuration:\n" + problems.map { "  - " + $0 }.joined(separator: "\n")
  }

  package init(problems: [String]) {
    self.problems = problems
  }
}

/// A parsed `HOST:PORT`.
public struct ListenAddress: Hashable, Sendable {
  public var host: String
  public var port: Int
  public var isIPv6: Bool

  /// 127.0.0.0/8, ::1 or localhost: reachable from this host only.
  public var isLoopback: Bool {
    host == "localhost" || host == "::1" || host.hasPrefix("127.")
  }

  public init?(_ text: String) {
    if text.hasPrefix("[") {
      guard let close = text.firstIndex(of: "]") else { return nil }
      host = String(text[text.index(after: text.startIndex)..<close])
      let rest = text[text.index(after: close)...]
      guard rest.hasPrefix(":"), let port = Int(rest.dropFirst()) else { return nil }
      self.port = port
      isIPv6 = true
    } else {
      guard let colon = text.lastIndex(of: ":") else { return nil }
      host = String(text[..<colon])
      guard let port = Int(text[text.index(after: colon)...]), !host.contains(":") else { return nil }
      self.port = port
      isIPv6 = false
    }
    guard !host.isEmpty, (0...65535).contains(port) else { return nil }
  }

  package init(host: String, port: Int, isIPv6: Bool) {
    self.host = host
    self.port = port
    self.isIPv6 = isIPv6
  }
}

/// What a caller may do. Each role includes the ones below it.
public enum Role: String, Hashable, Sendable, Comparable, CaseIterable {
  /// Status, inventory, watches, operations, contexts: reading only.
  case viewer
  /// Allocate, release, attach, detach; register, switch, move and delete contexts.
  case `operator`
  /// Everything: reconfigure, drain, undrain, sharing policies.
  case admin

  private var rank: Int { Role.allCases.firstIndex(of: self)! }
  public static func < (lhs: Role, rhs: Role) -> Bool { lhs.rank < rhs.rank }
}

extension AgentConfig.Auth {
  package static func isIdentity(_ text: String) -> Bool {
    if text.hasPrefix("spiffe://") { return text.count > 9 }
    if text.hasPrefix("cn:") { return text.count > 3 }
    if text.hasPrefix("token:") { return text.count > 6 }
    for prefix in ["uid:", "gid:"] where text.hasPrefix(prefix) { return UInt32(text.dropFirst(4)) != nil }
    return false
  }
}

extension PFSelector {
  /// `vendor=10ee,device=903f,driver=qdma-pf,address=0000:3b:00.0` (each part optional).
  package static func parse(_ text: String) throws -> PFSelector {
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
        throw ConfigError(problems: [
          "--selector \(quoted(text)): unknown key \(quoted(pieces[0])) (vendor, device, driver, address)"
        ])
      }
    }
    return selector
  }
}

extension AgentConfig {
  /// The DRA driver's sockets and folders; the node's name defaults to the agent's node id.
  package func draSettings(nodeID: String) -> DRASettings {
    var settings = DRASettings(
      driverName: kubernetes.dra.driverName, registryDir: kubernetes.dra.registryDir,
      pluginsDir: kubernetes.dra.pluginsDir, cdiDir: kubernetes.dra.cdiDir,
      nodeName: kubernetes.dra.nodeName.isEmpty ? nodeID : kubernetes.dra.nodeName,
      deviceRoot: platform == .linux ? linux.devRoot : "/dev")
    if kubernetes.dra.growOnDemand {
      settings.growth = GrowthPolicy(
        pfs: Set(kubernetes.dra.growPFs.compactMap(PCIAddress.init)), maxVFs: kubernetes.dra.growMaxVFs,
        step: kubernetes.dra.growStep, allowReplug: kubernetes.dra.growAllowReplug)
    }
    return settings
  }
}
