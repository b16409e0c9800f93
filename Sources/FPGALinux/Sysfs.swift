public import FPGACore

/// A path under the sysfs root, built only from fixed names and validated values (PCI
/// addresses, driver names, attribute names), never from raw input.
public struct SysfsPath: Hashable, Sendable, CustomStringConvertible {
  public let components: [String]

  public init(_ components: [String]) { self.components = components }

  public static func device(_ address: PCIAddress, _ rest: String...) -> SysfsPath {
    SysfsPath(["bus", "pci", "devices", address.description] + rest)
  }

  public static func driver(_ name: String, _ rest: String...) -> SysfsPath {
    SysfsPath(["bus", "pci", "drivers", name] + rest)
  }

  public static let devices = SysfsPath(["bus", "pci", "devices"])
  public static let drivers = SysfsPath(["bus", "pci", "drivers"])
  public static let driversProbe = SysfsPath(["bus", "pci", "drivers_probe"])
  public static let iommuGroups = SysfsPath(["kernel", "iommu_groups"])

  public var description: String { components.joined(separator: "/") }
}

/// A failed sysfs access, with the errno the kernel (or the file system) returned.
public struct SysfsError: Error, Hashable, Sendable, CustomStringConvertible {
  public var operation: String
  public var path: String
  public var errno: Int32

  public init(operation: String, path: String, errno: Int32) {
    self.operation = operation
    self.path = path
    self.errno = errno
  }

  /// The errno as one of the values SR-IOV writes return, when it is one.
  public var kernelErrno: KernelErrno? { KernelErrno(rawValue: errno) }

  public var description: String {
    "\(operation) \(path): \(kernelErrno?.description ?? "errno \(errno)")"
  }
}

/// The narrow seam between the Linux platform and the kernel: reads, writes, links and listings
/// of sysfs, and whether a device node exists. The real implementation is `LinuxSysfs`; tests
/// use a kernel-faithful fake tree.
public protocol Sysfs: Sendable {
  /// The attribute's contents, without the trailing newline.
  func read(_ path: SysfsPath) throws(SysfsError) -> String
  /// The first `count` bytes of a binary attribute (a device's `config`).
  func readBytes(_ path: SysfsPath, count: Int) throws(SysfsError) -> [UInt8]
  /// Writes `value` to an attribute in one `write(2)`, as `echo` does. May block (sriov_numvfs).
  func write(_ path: SysfsPath, _ value: String) throws(SysfsError)
  /// The last component of a symlink's target (`driver` → `vfio-pci`), nil when absent.
  func linkName(_ path: SysfsPath) throws(SysfsError) -> String?
  /// The components of a symlink's target (`../../../devices/pci0000:3a/0000:3a:00.0/...`), nil
  /// when absent.
  func linkComponents(_ path: SysfsPath) throws(SysfsError) -> [String]?
  /// The entries of a directory, sorted; empty when it does not exist.
  func list(_ path: SysfsPath) throws(SysfsError) -> [String]
  /// Whether the path exists.
  func exists(_ path: SysfsPath) -> Bool
  /// Whether `/dev/<relative>` exists under the device root.
  func deviceNodeExists(_ relative: String) -> Bool
  /// The kernel's id of the current boot, nil when unknown: it changes at every host reboot.
  func bootID() -> String?
}

extension Sysfs {
  public func bootID() -> String? { nil }
}
