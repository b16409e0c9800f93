import FPGACore
import Foundation

/// CDI specs (container-device-interface 0.5.0: the lowest version whose features the specs use,
/// `hostPath` and device names starting with a digit) and KubeVirt's device metadata files.
enum CDI {
  static let version = "0.5.0"
  /// Where KubeVirt's virt-launcher reads a claim's device metadata (KEP-5304).
  static let metadataMountRoot = "/var/run/kubernetes.io/dra-device-attributes/resourceclaims"

  /// `PCI_RESOURCE_QDMA_XILINX_COM_VF`: the variable a container finds its VFs' BDFs in.
  static func environmentName(_ settings: DRASettings) -> String {
    "PCI_RESOURCE_"
      + (settings.driverName + "/vf").uppercased().map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined()
  }

  struct Spec: Encodable {
    var cdiVersion = CDI.version
    var kind: String
    var devices: [Device]
  }

  struct Device: Encodable {
    var name: String
    var containerEdits: Edits
  }

  struct Edits: Encodable {
    var env: [String]?
    var deviceNodes: [DeviceNode]?
    var mounts: [Mount]?
  }

  struct DeviceNode: Encodable {
    var path: String
    var hostPath: String?
    var permissions: String?
  }

  struct Mount: Encodable {
    var hostPath: String
    var containerPath: String
    var type: String?
    var options: [String]?
  }

  /// One spec per claim: a device per prepared VF, with `/dev/vfio/vfio`, its group's node,
  /// the BDF in the environment and the request's metadata file mounted read-only.
  static func spec(
    _ claim: PreparedClaim, settings: DRASettings, metadataPath: (PreparedClaim, String) -> String
  ) throws -> String {
    let devices = claim.devices.map { device -> Device in
      if let accelerator = device.accelerator {
        return Device(
          name: "\(claim.uid)-\(device.device)",
          containerEdits: Edits(
            env: ["FPGA_ACCELERATOR=\(accelerator)", "FPGA_CONTEXT=\(device.contextID ?? "")"], deviceNodes: nil,
            mounts: nil))
      }
      func node(_ path: String) -> DeviceNode {
        let host = settings.deviceRoot == "/dev" ? nil : settings.deviceRoot + path.dropFirst(4)
        return DeviceNode(path: path, hostPath: host, permissions: "rw")
      }
      let bdfs = claim.devices.filter { $0.request == device.request }.map(\.vf).joined(separator: ",")
      return Device(
        name: "\(claim.uid)-\(device.device)",
        containerEdits: Edits(
          env: [
            "\(environmentName(settings))=\(bdfs)", "\(environmentName(settings))_\(sanitized(device.request))=\(bdfs)",
          ],
          deviceNodes: [node("/dev/vfio/vfio"), node(device.vfioDevice)],
          mounts: [
            Mount(
              hostPath: metadataPath(claim, device.request),
              containerPath:
                "\(metadataMountRoot)/\(claim.name)/\(device.request)/\(settings.driverName)-metadata.json",
              type: "bind", options: ["ro", "bind"])
          ]))
    }
    return try json(Spec(kind: settings.cdiKind, devices: devices))
  }

  /// KubeVirt's `DeviceMetadata` (metadata.resource.k8s.io/v1alpha1) for one request.
  static func metadata(_ claim: PreparedClaim, request: String, settings: DRASettings) throws -> String {
    struct Metadata: Encodable {
      var apiVersion = "metadata.resource.k8s.io/v1alpha1"
      var kind = "DeviceMetadata"
      var metadata: Meta
      var requests: [Request]
    }
    struct Meta: Encodable {
      var name: String
      var namespace: String
      var uid: String
      var generation: Int
    }
    struct Request: Encodable {
      var name: String
      var devices: [MetaDevice]
    }
    struct MetaDevice: Encodable {
      var driver: String
      var pool: String
      var name: String
      var attributes: [String: Kube.Attribute]
    }
    let devices = claim.devices.filter { $0.request == request && $0.accelerator == nil }.map { device in
      MetaDevice(
        driver: settings.driverName, pool: device.pool, name: device.device,
        attributes: [
          "resource.kubernetes.io/pciBusID": .string(device.vf),
          "\(settings.driverName)/kind": .string("vf"),
        ])
    }
    return try json(
      Metadata(
        metadata: Meta(name: claim.name, namespace: claim.namespace, uid: claim.uid, generation: 1),
        requests: [Request(name: request, devices: devices)]))
  }

  static func sanitized(_ text: String) -> String {
    text.uppercased().map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined()
  }

  static func json(_ value: some Encodable) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
  }

  /// Writes through a temporary file renamed into place: a reader sees the old file or the new.
  static func atomicWrite(_ path: String, _ text: String) throws {
    let temporary = path + ".tmp"
    try Data(text.utf8).write(to: URL(fileURLWithPath: temporary))
    if rename(temporary, path) != 0 {
      throw DRAFailure("cannot rename \(temporary) to \(path): errno \(errno)")
    }
  }
}
