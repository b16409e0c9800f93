import Foundation

/// The few Kubernetes objects the DRA driver reads and writes, as `resource.k8s.io/v1` defines
/// them (only the fields the driver uses; unknown fields the API server sends are ignored on
/// decoding, and nothing the API does not know is ever sent).
public enum Kube {
  public struct ObjectMeta: Codable, Hashable, Sendable {
    public var name: String?
    public var namespace: String?
    public var uid: String?
    public var resourceVersion: String?
    public var generation: Int64?
    public var labels: [String: String]?
    public var ownerReferences: [OwnerReference]?

    public init(
      name: String? = nil, namespace: String? = nil, uid: String? = nil, resourceVersion: String? = nil,
      labels: [String: String]? = nil, ownerReferences: [OwnerReference]? = nil
    ) {
      self.name = name
      self.namespace = namespace
      self.uid = uid
      self.resourceVersion = resourceVersion
      self.labels = labels
      self.ownerReferences = ownerReferences
    }
  }

  public struct OwnerReference: Codable, Hashable, Sendable {
    public var apiVersion: String
    public var kind: String
    public var name: String
    public var uid: String

    public init(apiVersion: String, kind: String, name: String, uid: String) {
      self.apiVersion = apiVersion
      self.kind = kind
      self.name = name
      self.uid = uid
    }
  }

  /// Any object, read for its metadata only (a Node).
  public struct MetadataOnly: Codable, Hashable, Sendable {
    public var metadata: ObjectMeta
  }

  // MARK: ResourceClaim (read)

  public struct ResourceClaim: Codable, Hashable, Sendable {
    public var metadata: ObjectMeta
    public var status: Status?

    public init(metadata: ObjectMeta, status: Status? = nil) {
      self.metadata = metadata
      self.status = status
    }

    public struct Status: Codable, Hashable, Sendable {
      public var allocation: Allocation?
      /// What the drivers report about the devices they prepared (each driver its own entries).
      public var devices: [AllocatedDeviceStatus]?
      public init(allocation: Allocation?, devices: [AllocatedDeviceStatus]? = nil) {
        self.allocation = allocation
        self.devices = devices
      }
    }

    public struct Allocation: Codable, Hashable, Sendable {
      public var devices: DeviceAllocation?
      /// When the scheduler allocated the claim (RFC 3339); tells a new allocation of a claim
      /// from a stale retry of an old one.
      public var allocationTimestamp: String?
      public init(devices: DeviceAllocation?, allocationTimestamp: String? = nil) {
        self.devices = devices
        self.allocationTimestamp = allocationTimestamp
      }
    }

    public struct DeviceAllocation: Codable, Hashable, Sendable {
      public var results: [Result]?
      public var config: [Config]?
      public init(results: [Result]?, config: [Config]? = nil) {
        self.results = results
        self.config = config
      }
    }

    public struct Result: Codable, Hashable, Sendable {
      public var request: String
      public var driver: String
      public var pool: String
      public var device: String
      public var shareID: String?

      public init(request: String, driver: String, pool: String, device: String, shareID: String? = nil) {
        self.request = request
        self.driver = driver
        self.pool = pool
        self.device = device
        self.shareID = shareID
      }
    }

    /// Opaque configuration for a driver (`parameters` is the driver's own JSON).
    public struct Config: Codable, Hashable, Sendable {
      public var requests: [String]?
      public var opaque: Opaque?
    }

    public struct Opaque: Codable, Hashable, Sendable {
      public var driver: String
      public var parameters: JSONAny?
    }
  }

  // MARK: ResourceClaim status (written: the driver's own `status.devices` entries)

  /// One entry of a claim's `status.devices`: a device this driver prepared, with a `Ready`
  /// condition and the driver's data (the VF's address and VFIO group, or the share's context).
  public struct AllocatedDeviceStatus: Codable, Hashable, Sendable {
    public var driver: String
    public var pool: String
    public var device: String
    public var shareID: String?
    public var conditions: [Condition]?
    public var data: JSONAny?

    public init(
      driver: String, pool: String, device: String, shareID: String? = nil, conditions: [Condition]? = nil,
      data: JSONAny? = nil
    ) {
      self.driver = driver
      self.pool = pool
      self.device = device
      self.shareID = shareID
      self.conditions = conditions
      self.data = data
    }
  }

  /// `metav1.Condition`.
  public struct Condition: Codable, Hashable, Sendable {
    public var type: String
    public var status: String
    public var reason: String
    public var message: String
    /// RFC 3339, seconds.
    public var lastTransitionTime: String
    public var observedGeneration: Int64?

    public init(
      type: String, status: String, reason: String, message: String, lastTransitionTime: String,
      observedGeneration: Int64? = nil
    ) {
      self.type = type
      self.status = status
      self.reason = reason
      self.message = message
      self.lastTransitionTime = lastTransitionTime
      self.observedGeneration = observedGeneration
    }
  }

  /// The body of a server-side apply of a claim's `status.devices`: the driver, as field
  /// manager, sends exactly its entries; the API server keeps everyone else's and removes the
  /// driver's entries it no longer sends (no entries: `status: {}`, which withdraws them all).
  /// The uid makes the apply fail (409) on a claim that was replaced.
  public struct ClaimDeviceStatusApply: Encodable, Sendable {
    public var apiVersion = "resource.k8s.io/v1"
    public var kind = "ResourceClaim"
    public var metadata: ObjectMeta
    public var status: DevicesOnly

    public struct DevicesOnly: Encodable, Sendable {
      /// Left out when empty: what a manager omits, it no longer owns.
      public var devices: [AllocatedDeviceStatus]?
    }

    public init(namespace: String, name: String, uid: String, devices: [AllocatedDeviceStatus]) {
      metadata = ObjectMeta(name: name, namespace: namespace, uid: uid)
      status = DevicesOnly(devices: devices.isEmpty ? nil : devices)
    }
  }

  // MARK: ResourceSlice (written)

  public struct ResourceSlice: Codable, Hashable, Sendable {
    /// Set on what the driver sends; list items from the API server come without them.
    public var apiVersion: String? = "resource.k8s.io/v1"
    public var kind: String? = "ResourceSlice"
    public var metadata: ObjectMeta
    public var spec: Spec

    public init(metadata: ObjectMeta, spec: Spec) {
      self.metadata = metadata
      self.spec = spec
    }

    public struct Spec: Codable, Hashable, Sendable {
      public var driver: String
      public var nodeName: String
      public var pool: Pool
      public var devices: [Device]

      public init(driver: String, nodeName: String, pool: Pool, devices: [Device]) {
        self.driver = driver
        self.nodeName = nodeName
        self.pool = pool
        self.devices = devices
      }
    }

    public struct Pool: Codable, Hashable, Sendable {
      public var name: String
      public var generation: Int64
      public var resourceSliceCount: Int64
    }
  }

  public struct Device: Codable, Hashable, Sendable {
    public var name: String
    public var attributes: [String: Attribute]?
    public var capacity: [String: Capacity]?
    public var taints: [Taint]?
    public var allowMultipleAllocations: Bool?

    public init(
      name: String, attributes: [String: Attribute]? = nil, capacity: [String: Capacity]? = nil,
      taints: [Taint]? = nil, allowMultipleAllocations: Bool? = nil
    ) {
      self.name = name
      self.attributes = attributes
      self.capacity = capacity
      self.taints = taints
      self.allowMultipleAllocations = allowMultipleAllocations
    }
  }

  /// Exactly one of the fields is set.
  public struct Attribute: Codable, Hashable, Sendable {
    public var string: String?
    public var int: Int64?
    public var bool: Bool?
    public var version: String?

    public static func string(_ value: String) -> Attribute { Attribute(string: value) }
    public static func int(_ value: Int) -> Attribute { Attribute(int: Int64(value)) }
    public static func flag(_ value: Bool) -> Attribute { Attribute(bool: value) }
  }

  public struct Capacity: Codable, Hashable, Sendable {
    /// A quantity, e.g. "8".
    public var value: String
    /// How much one claim takes (consumable capacity).
    public var requestPolicy: RequestPolicy?

    public init(value: String, requestPolicy: RequestPolicy? = nil) {
      self.value = value
      self.requestPolicy = requestPolicy
    }
  }

  public struct RequestPolicy: Codable, Hashable, Sendable {
    public var `default`: String?
    public var validRange: ValidRange?

    public init(default value: String?, validRange: ValidRange?) {
      self.default = value
      self.validRange = validRange
    }
  }

  public struct ValidRange: Codable, Hashable, Sendable {
    public var min: String?
    public var max: String?
    public var step: String?

    public init(min: String?, max: String? = nil, step: String?) {
      self.min = min
      self.max = max
      self.step = step
    }
  }

  public struct Taint: Codable, Hashable, Sendable {
    public var key: String
    public var value: String?
    /// `NoSchedule`, `NoExecute` or `None`.
    public var effect: String

    public init(key: String, value: String? = nil, effect: String) {
      self.key = key
      self.value = value
      self.effect = effect
    }
  }

  public struct List<Item: Codable & Sendable>: Codable, Sendable {
    public var items: [Item]
  }

  /// A Kubernetes `Status` (the body of an error answer).
  public struct Status: Codable, Sendable {
    public var message: String?
    public var reason: String?
    public var code: Int?
  }
}

/// Any JSON value, kept as it came (a driver's opaque parameters).
public enum JSONAny: Codable, Hashable, Sendable {
  case null
  case bool(Bool)
  case number(Double)
  case string(String)
  case array([JSONAny])
  case object([String: JSONAny])

  public init(from decoder: any Decoder) throws {
    let container = try decoder.singleValueContainer()
    if container.decodeNil() {
      self = .null
    } else if let value = try? container.decode(Bool.self) {
      self = .bool(value)
    } else if let value = try? container.decode(Double.self) {
      self = .number(value)
    } else if let value = try? container.decode(String.self) {
      self = .string(value)
    } else if let value = try? container.decode([JSONAny].self) {
      self = .array(value)
    } else {
      self = .object(try container.decode([String: JSONAny].self))
    }
  }

  public func encode(to encoder: any Encoder) throws {
    var container = encoder.singleValueContainer()
    switch self {
    case .null: try container.encodeNil()
    case .bool(let value): try container.encode(value)
    case .number(let value): try container.encode(value)
    case .string(let value): try container.encode(value)
    case .array(let value): try container.encode(value)
    case .object(let value): try container.encode(value)
    }
  }

  public subscript(key: String) -> JSONAny? {
    if case .object(let object) = self { return object[key] }
    return nil
  }
}
