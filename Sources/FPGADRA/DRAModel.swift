public import FPGACore
import Foundation

/// Where the DRA driver lives on the node, and what it is called.
public struct DRASettings: Hashable, Sendable {
  /// The driver name (a DNS subdomain), e.g. `qdma.xilinx.com`.
  public var driverName: String
  /// The kubelet's plugin registry (`<driver>-reg.sock` is made there).
  public var registryDir: String
  /// The kubelet's plugins directory (`<driver>/dra.sock` and the device metadata files).
  public var pluginsDir: String
  /// Where CDI specs are written (`/var/run/cdi`, a tmpfs: rebuilt at start).
  public var cdiDir: String
  /// The node's name: the pool's name and the slices' `nodeName`.
  public var nodeName: String
  /// Where the platform's device nodes are (`/dev`); CDI specs map `/dev/vfio/N` from there.
  public var deviceRoot: String
  /// Grow on demand: PFs offer the VFs they could have (nil: off).
  public var growth: GrowthPolicy?

  public init(
    driverName: String, registryDir: String, pluginsDir: String, cdiDir: String, nodeName: String,
    deviceRoot: String = "/dev"
  ) {
    self.driverName = driverName
    self.registryDir = registryDir
    self.pluginsDir = pluginsDir
    self.cdiDir = cdiDir
    self.nodeName = nodeName
    self.deviceRoot = deviceRoot
  }

  public var registrationSocket: String { registryDir + "/\(driverName)-reg.sock" }
  public var pluginDirectory: String { pluginsDir + "/" + driverName }
  public var pluginSocket: String { pluginDirectory + "/dra.sock" }
  /// CDI vendor/class of the VFs: `k8s.<driver>/vf`.
  public var cdiKind: String { "k8s.\(driverName)/vf" }
}

/// A claim as the kubelet names it.
public struct ClaimReference: Hashable, Sendable {
  public var namespace: String
  public var uid: String
  public var name: String

  public init(namespace: String, uid: String, name: String) {
    self.namespace = namespace
    self.uid = uid
    self.name = name
  }

  public var description: String { "\(namespace)/\(name) (uid \(uid))" }
}

/// One device prepared for a claim.
public struct PreparedDevice: Codable, Hashable, Sendable {
  public var request: String
  public var pool: String
  public var device: String
  public var vf: String
  public var allocationID: String
  /// `/dev/vfio/N` on the host.
  public var vfioDevice: String
  public var cdiID: String
  public var shareID: String?
  /// For a share of an accelerator: the accelerator and the claim's context on it.
  public var accelerator: String? = nil
  public var contextID: String? = nil
}

/// What the driver journals per claim (in the agent's store): started before anything is
/// done, completed once the devices are ready.
public struct PreparedClaim: Codable, Hashable, Sendable {
  public enum State: String, Codable, Sendable { case started, completed }
  public var namespace: String
  public var name: String
  public var uid: String
  public var state: State
  public var devices: [PreparedDevice]
  /// The claim's allocation when it was prepared (`DRADriver.allocationKey`): a tombstone keeps
  /// it, so a new allocation of the same claim is told from a stale retry of this one.
  public var allocation: String? = nil
}

/// Reads ResourceClaims and reports on them (the API server, or a test's table).
public protocol ClaimSource: Sendable {
  func resourceClaim(namespace: String, name: String) async throws -> Kube.ResourceClaim
  /// Makes `devices` the driver's entries in the claim's `status.devices` (none when empty).
  func reportDevices(_ devices: [Kube.AllocatedDeviceStatus], of claim: ClaimReference, driver: String) async throws
}

extension KubernetesAPI: ClaimSource {
  public func reportDevices(
    _ devices: [Kube.AllocatedDeviceStatus], of claim: ClaimReference, driver: String
  ) async throws {
    try await applyDeviceStatus(devices, namespace: claim.namespace, name: claim.name, uid: claim.uid, driver: driver)
  }
}

/// A claim's failure, as the kubelet shows it.
public struct DRAFailure: Error, Hashable, Sendable, CustomStringConvertible {
  public var message: String
  public init(_ message: String) { self.message = message }
  public var description: String { message }
}

/// VF device names in slices: `vf-DDDD-BB-DD-F` (a DNS label), and back.
public enum DeviceNames {
  public static func name(of vf: PCIAddress) -> String {
    "vf-" + vf.description.replacingOccurrences(of: ":", with: "-").replacingOccurrences(of: ".", with: "-")
  }

  /// `acc-DDDD-BB-N` for accelerator `card-DDDD:BB/accN`.
  public static func name(ofAccelerator id: String) -> String? {
    guard id.hasPrefix("card-"), let slash = id.firstIndex(of: "/") else { return nil }
    let card = id[id.index(id.startIndex, offsetBy: 5)..<slash].replacingOccurrences(of: ":", with: "-")
    let slot = id[id.index(after: slash)...]
    guard slot.hasPrefix("acc"), let index = Int(slot.dropFirst(3)) else { return nil }
    return "acc-\(card)-\(index)"
  }

  public static func accelerator(_ name: String) -> String? {
    guard name.hasPrefix("acc-") else { return nil }
    let parts = name.dropFirst(4).split(separator: "-")
    guard parts.count == 3, let index = Int(parts[2]) else { return nil }
    return "card-\(parts[0]):\(parts[1])/acc\(index)"
  }

  public static func vf(_ name: String) -> PCIAddress? {
    guard name.hasPrefix("vf-") else { return nil }
    let parts = name.dropFirst(3).split(separator: "-")
    guard parts.count == 4 else { return nil }
    return PCIAddress("\(parts[0]):\(parts[1]):\(parts[2]).\(parts[3])")
  }
}

extension JSONAny {
  /// The value as JSON would spell it, short: for messages.
  var text: String {
    switch self {
    case .null: "null"
    case .bool(let value): "\(value)"
    case .number(let value): "\(value)"
    case .string(let value): quoted(value)
    case .array: "an array"
    case .object: "an object"
    }
  }
}
