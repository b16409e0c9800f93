/// The domain model: what the agent knows of the node's cards, functions and allocations.

/// A wall-clock instant, as seconds and nanoseconds since the Unix epoch.
public struct WallTime: Hashable, Comparable, Sendable, Codable {
  public var seconds: Int64
  public var nanoseconds: Int32

  public init(seconds: Int64, nanoseconds: Int32 = 0) {
    self.seconds = seconds
    self.nanoseconds = nanoseconds
  }

  public static func < (lhs: WallTime, rhs: WallTime) -> Bool {
    (lhs.seconds, lhs.nanoseconds) < (rhs.seconds, rhs.nanoseconds)
  }

  /// The duration from `earlier` to this instant.
  public func since(_ earlier: WallTime) -> Duration {
    .seconds(seconds - earlier.seconds) + .nanoseconds(Int64(nanoseconds) - Int64(earlier.nanoseconds))
  }
}

extension WallTime: CustomStringConvertible {
  /// RFC 3339 in UTC, to the second: `2026-11-30T14:20:05Z`.
  public var description: String {
    let days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
    let secondOfDay = seconds - days * 86_400
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468
    let era = (z >= 0 ? z : z - 146_096) / 146_097
    let dayOfEra = z - era * 146_097
    let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
    let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
    let monthIndex = (5 * dayOfYear + 2) / 153
    let day = dayOfYear - (153 * monthIndex + 2) / 5 + 1
    let month = monthIndex < 10 ? monthIndex + 3 : monthIndex - 9
    let year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
    func two(_ value: Int64) -> String { value < 10 ? "0\(value)" : "\(value)" }
    return
      "\(year)-\(two(month))-\(two(day))T\(two(secondOfDay / 3600)):\(two(secondOfDay / 60 % 60)):\(two(secondOfDay % 60))Z"
  }
}

/// Tells the wall-clock time; injected so tests control it.
public protocol WallClock: Sendable {
  func now() -> WallTime
}

/// The agent's view of a VF.
public enum VFState: String, Hashable, Sendable, CaseIterable, Codable {
  case free, allocated, attached, detaching, unhealthy
}

/// Card-level grouping of PFs: the functions of one board share a PCI bus.
public struct Card: Hashable, Sendable {
  /// `card-DDDD:BB`.
  public var id: String
  public var model: String
  public var numaNode: Int
  public var draining: Bool

  public init(id: String, model: String, numaNode: Int, draining: Bool = false) {
    self.id = id
    self.model = model
    self.numaNode = numaNode
    self.draining = draining
  }

  /// The id of the card whose PFs sit on `address`'s bus.
  public static func id(for address: PCIAddress) -> String { "card-" + address.busID }
}

/// What the platform reports of a PF: the sysfs attributes the agent relies on.
public struct PhysicalFunction: Hashable, Sendable {
  public var address: PCIAddress
  public var vendorID: UInt16
  public var deviceID: UInt16
  public var vfDeviceID: UInt16
  public var totalVFs: Int
  public var numVFs: Int
  public var vfOffset: Int
  public var vfStride: Int
  public var driversAutoprobe: Bool
  /// Bound driver, nil when none.
  public var driver: String?
  /// -1 when unknown.
  public var numaNode: Int
  /// QDMA queues of the function; 0 when not QDMA.
  public var qmax: Int
  /// What the platform read of its health at the last scan (nil: nothing to read).
  public var readings: HealthReadings? = nil
  /// Its health, assessed by the engine.
  public var health = DeviceHealth()

  public init(
    address: PCIAddress, vendorID: UInt16, deviceID: UInt16, vfDeviceID: UInt16, totalVFs: Int,
    numVFs: Int, vfOffset: Int, vfStride: Int, driversAutoprobe: Bool, driver: String?,
    numaNode: Int, qmax: Int
  ) {
    self.address = address
    self.vendorID = vendorID
    self.deviceID = deviceID
    self.vfDeviceID = vfDeviceID
    self.totalVFs = totalVFs
    self.numVFs = numVFs
    self.vfOffset = vfOffset
    self.vfStride = vfStride
    self.driversAutoprobe = driversAutoprobe
    self.driver = driver
    self.numaNode = numaNode
    self.qmax = qmax
  }

  public var cardID: String { Card.id(for: address) }

  /// The address of VF `index`, derived from offset and stride as the kernel does
  /// (`pci_iov_virtfn_bus/devfn`): routing id = PF's + offset + stride × index.
  public func vfAddress(index: Int) -> PCIAddress? {
    PCIAddress(domain: address.domain, routingID: address.routingID + vfOffset + vfStride * index)
  }
}

/// What the platform reports of a VF.
public struct VirtualFunction: Hashable, Sendable, Codable {
  public var address: PCIAddress
  public var pfAddress: PCIAddress
  public var index: Int
  public var vendorID: UInt16
  public var deviceID: UInt16
  /// -1 when the host has no IOMMU.
  public var iommuGroup: Int
  public var numaNode: Int
  public var driver: String?
  public var driverOverride: String?
  /// `/dev/vfio/N` when it exists.
  public var vfioDevice: String?
  /// What the platform read of its health at the last scan (nil: nothing to read).
  public var readings: HealthReadings? = nil
  /// The PCIe root complex it sits under (`pci0000:3a`), when the platform knows.
  public var pcieRoot: String? = nil
  /// Its health, assessed by the engine from the readings and its PF's health.
  public var health = DeviceHealth()

  public init(
    address: PCIAddress, pfAddress: PCIAddress, index: Int, vendorID: UInt16, deviceID: UInt16,
    iommuGroup: Int, numaNode: Int, driver: String?, driverOverride: String?, vfioDevice: String?
  ) {
    self.address = address
    self.pfAddress = pfAddress
    self.index = index
    self.vendorID = vendorID
    self.deviceID = deviceID
    self.iommuGroup = iommuGroup
    self.numaNode = numaNode
    self.driver = driver
    self.driverOverride = driverOverride
    self.vfioDevice = vfioDevice
  }

  /// A VF can be handed to a VM only through an IOMMU group, and only while it is healthy
  /// enough (not unhealthy, not gone, nor its PF).
  public var isPassthroughCapable: Bool { iommuGroup >= 0 && health.isUsable }
}

/// A VF as the agent presents it: the platform's facts plus who holds it.
public struct VFView: Hashable, Sendable, Codable {
  public var function: VirtualFunction
  public var state: VFState
  public var allocationID: String?
  public var vm: String?
}

/// A reservation of one VF for an owner.
public struct Allocation: Hashable, Sendable, Codable {
  public var id: String
  public var vf: PCIAddress
  public var pf: PCIAddress
  public var owner: String
  public var vm: String?
  public var idempotencyKey: String?
  public var createdAt: WallTime
  public var numaNode: Int
  public var iommuGroup: Int
  public var attached: Bool
  /// The QEMU device id while attached (the allocation's id).
  public var deviceID: String?
  /// The root port the VF was plugged into.
  public var rootPort: String?
  /// An unplug was requested and the guest has not acknowledged it yet.
  public var detaching: Bool
  /// How the attached device went through the last re-layout of its PF, if one happened.
  public var lastRelayout: Relayout?

  public init(
    id: String, vf: PCIAddress, pf: PCIAddress, owner: String, vm: String?,
    idempotencyKey: String?, createdAt: WallTime, numaNode: Int, iommuGroup: Int,
    attached: Bool = false, deviceID: String? = nil, rootPort: String? = nil, detaching: Bool = false,
    lastRelayout: Relayout? = nil
  ) {
    self.lastRelayout = lastRelayout
    self.deviceID = deviceID
    self.rootPort = rootPort
    self.detaching = detaching
    self.id = id
    self.vf = vf
    self.pf = pf
    self.owner = owner
    self.vm = vm
    self.idempotencyKey = idempotencyKey
    self.createdAt = createdAt
    self.numaNode = numaNode
    self.iommuGroup = iommuGroup
    self.attached = attached
  }

  public var cardID: String { Card.id(for: pf) }
}

/// How an attached device went through a re-layout of its PF (a reconfiguration or a restore).
public struct Relayout: Hashable, Sendable, Codable {
  public enum How: String, Hashable, Sendable, Codable, CaseIterable {
    /// The VMM paused the device and resumed it on the new VF: the guest kept its device.
    case paused
    /// Unplugged and plugged again: the guest saw its device leave and come back.
    case replugged
    /// The VMM refused to resume the paused device; it was unplugged and plugged again instead.
    case replugFallback = "replugged-after-refused-resume"
  }

  public var how: How
  /// The operation that did it.
  public var operationID: String
  public var at: WallTime
  /// Why the resume was refused (`replugFallback`).
  public var detail: String?

  public init(how: How, operationID: String, at: WallTime, detail: String? = nil) {
    self.how = how
    self.operationID = operationID
    self.at = at
    self.detail = detail
  }
}

/// A PF with its VFs, as discovered by a platform.
public struct DiscoveredPF: Hashable, Sendable {
  public var function: PhysicalFunction
  public var vfs: [VirtualFunction]

  public init(function: PhysicalFunction, vfs: [VirtualFunction]) {
    self.function = function
    self.vfs = vfs
  }
}

/// Everything a platform found on one scan.
public struct DiscoveredNode: Hashable, Sendable {
  public var pfs: [DiscoveredPF]
  /// Devices that could not be read, each with the reason and the path: they are kept out of
  /// allocation, and the rest of the node is served.
  public var problems: [String]

  public init(pfs: [DiscoveredPF], problems: [String] = []) {
    self.pfs = pfs
    self.problems = problems
  }
}

/// What the platform under the agent can do, and what is wrong with it.
public struct PlatformCapabilities: Hashable, Sendable {
  public var platform: String
  public var iommu: Bool
  public var vfioPCI: Bool
  public var qdmaDriver: String?
  public var vfioPause: Bool
  /// Sentences saying what is wrong and what to do.
  public var problems: [String]

  public init(
    platform: String, iommu: Bool, vfioPCI: Bool, qdmaDriver: String?, vfioPause: Bool = false,
    problems: [String] = []
  ) {
    self.platform = platform
    self.iommu = iommu
    self.vfioPCI = vfioPCI
    self.qdmaDriver = qdmaDriver
    self.vfioPause = vfioPause
    self.problems = problems
  }
}

/// The seam between the core and the machine: the simulated node, or Linux sysfs.
public protocol NodePlatform: Sendable {
  /// Scans the node: every managed PF with its enabled VFs.
  func discover() async throws(AgentError) -> DiscoveredNode
  /// What the platform can do now.
  func capabilities() async -> PlatformCapabilities
  /// Makes a VF ready to be handed to a VM: bound to vfio-pci with its /dev/vfio/N present.
  /// Returns the device node. Never rebinds a VF that a process holds.
  func prepareForPassthrough(vf: PCIAddress) async throws(AgentError) -> String
  /// Sets a PF's VF count the way the kernel requires (autoprobe off, through 0, re-read).
  /// When the kernel blocks a write (a process holds a VF), calls `whileBlocked` with who holds
  /// what, then keeps waiting for the write to return.
  func setVFCount(
    pf: PCIAddress, to count: Int, whileBlocked: @escaping @Sendable (String) async -> Void
  ) async throws(AgentError)
  /// Who holds each of the PF's VFs open now (`/dev/vfio/N`), as "VF → holder" texts.
  func vfHolders(pf: PCIAddress) async -> [PCIAddress: String]
  /// The kernel's id of the current boot (it changes at every host reboot); nil when unknown.
  func bootID() async -> String?
  /// Sets a QDMA PF's queue count (`qdma/qmax`), as recorded layouts restore it.
  func setQueueCount(pf: PCIAddress, to qmax: Int) async throws(AgentError)
}

extension NodePlatform {
  public func bootID() async -> String? { nil }
  public func setQueueCount(pf: PCIAddress, to qmax: Int) async throws(AgentError) {
    throw AgentError(.unimplemented, "this platform cannot set a PF's queue count")
  }
}

/// A human-readable model name for a QDMA PF device id (`0x9PGL`: PF P, Gen G, lanes L).
public func qdmaModelName(vendorID: UInt16, deviceID: UInt16) -> String {
  guard vendorID == 0x10ee else {
    return "PCI device \(hex(Int(vendorID), width: 4)):\(hex(Int(deviceID), width: 4))"
  }
  let generation = Int((deviceID >> 4) & 0xf)
  let lanes: String
  switch deviceID & 0xf {
  case 0x1: lanes = "x1"
  case 0x2: lanes = "x2"
  case 0x4: lanes = "x4"
  case 0x8: lanes = "x8"
  case 0xf: lanes = "x16"
  default: lanes = "x?"
  }
  if (deviceID >> 12) == 0x9 { return "Xilinx QDMA Gen\(generation) \(lanes)" }
  return "Xilinx device \(hex(Int(deviceID), width: 4))"
}
