import FPGACore
public import FPGALinux
public import FPGASimulator
import Foundation
import Synchronization

/// The simulated kernel (`SimulatedNode`) as a real directory tree, for the tests that need
/// real paths: PF and VF directories, `virtfnN`/`physfn`/`driver`/`iommu_group` links, driver
/// directories, `kernel/iommu_groups`, `/dev/vfio/N`, a fake `/proc` of VM holders. Reads go
/// through the real `LinuxSysfs`; writes go to the simulated kernel, whose rules decide
/// (drivers/pci/iov.c, pci-driver.c, vfio-pci, the QDMA driver: ERANGE, EBUSY, ENOENT, EPERM, a
/// write of 0 that blocks while a VF is held, driver_override + drivers_probe), and the tree is
/// brought in line with the kernel's state after each one. The rules live in the simulator
/// alone; this file only draws them. Files a test adds (AER counters, BARs) are left alone.
public final class FakeKernelSysfs: Sysfs, @unchecked Sendable {
  /// A function of the host the tree shows: the simulated kernel's own description.
  public typealias PF = SimulatedNode.FunctionSpec

  /// One drawn entry: a file's contents, or a link's target.
  enum Item: Hashable {
    case file(String)
    case link(String)
  }

  static let root = "pci0000:00"

  /// The kernel this tree draws.
  public let node: SimulatedNode
  /// The temporary folder: `sys/` and `dev/` inside.
  public let directory: String
  public let sysRoot: String
  public let devRoot: String
  /// A fake `/proc` where holders of `/dev/vfio/N` appear (see `hold`).
  public let procRoot: String
  private let reader: LinuxSysfs
  private let log = Mutex<[String]>([])
  /// What the tree shows now (paths relative to the folder), as last drawn.
  private let drawn = Mutex<[String: Item]>([:])

  public init(pfs: [PF], drivers: [String] = ["qdma-pf", "qdma-vf", "vfio-pci"], iommu: Bool = true) throws {
    directory = NSTemporaryDirectory() + "fake-sysfs-" + UUID().uuidString.prefix(8)
    sysRoot = directory + "/sys"
    devRoot = directory + "/dev"
    procRoot = directory + "/proc"
    for folder in [
      "sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups", "sys/devices/\(Self.root)", "dev/vfio",
      "proc",
    ] {
      try FileManager.default.createDirectory(atPath: directory + "/" + folder, withIntermediateDirectories: true)
    }
    _ = FileManager.default.createFile(atPath: devRoot + "/vfio/vfio", contents: nil)
    _ = FileManager.default.createFile(atPath: sysRoot + "/bus/pci/drivers_probe", contents: nil)
    node = SimulatedNode(
      functions: pfs.map { pf in
        var pf = pf
        pf.pcieRoot = pf.pcieRoot ?? Self.root
        return pf
      }, drivers: Set(drivers), iommu: iommu)
    reader = try LinuxSysfs(root: sysRoot, devRoot: devRoot)
    for driver in drivers { try makeDriverFolder(driver) }
    draw()
  }

  deinit { try? FileManager.default.removeItem(atPath: directory) }

  /// The kernel's boot id as a file (`layout.boot_id_file`), redrawn at every change.
  public var bootIDPath: String { directory + "/boot_id" }
  public func bootID() -> String? { node.bootID() }

  /// A host reboot: every PF back to 0 VFs, a new boot id. AER counters a test wrote are left
  /// as they are (a test resets them, as the kernel does).
  public func reboot() {
    node.reboot()
    draw()
  }

  // MARK: Sysfs (reads through the real implementation)

  public func read(_ path: SysfsPath) throws(SysfsError) -> String { try reader.read(path) }
  public func readBytes(_ path: SysfsPath, count: Int) throws(SysfsError) -> [UInt8] {
    try reader.readBytes(path, count: count)
  }
  public func linkName(_ path: SysfsPath) throws(SysfsError) -> String? { try reader.linkName(path) }
  public func linkComponents(_ path: SysfsPath) throws(SysfsError) -> [String]? { try reader.linkComponents(path) }
  public func list(_ path: SysfsPath) throws(SysfsError) -> [String] { try reader.list(path) }
  public func exists(_ path: SysfsPath) -> Bool { reader.exists(path) }
  public func deviceNodeExists(_ relative: String) -> Bool { reader.deviceNodeExists(relative) }

  /// The kernel decides; then the tree shows what it did (also after a failed write, which may
  /// have changed something before failing, as the kernel's can).
  public func write(_ path: SysfsPath, _ value: String) throws(SysfsError) {
    guard reader.exists(path) else { throw SysfsError(operation: "open", path: path.description, errno: 2) }
    let text = value.hasSuffix("\n") ? String(value.dropLast()) : value
    log.withLock { $0.append("\(path)=\(text)") }
    defer { draw() }
    try node.write(path, value)
  }

  // MARK: What VMs, modules and the kernel do (test controls)

  /// A VM (`qemu-system-x86`, pid 4242 + group) opens the VF's /dev/vfio/N: the kernel counts it
  /// as held, and it shows in the fake /proc as an open file descriptor.
  public func hold(_ vf: String) {
    let address = PCIAddress(vf)!
    try? node.hold(vf: address, by: "qemu-system-x86", requireVFIO: false)
    let group = (try? reader.linkName(.device(address, "iommu_group"))).flatMap { $0.flatMap { Int($0) } } ?? -1
    let process = procRoot + "/\(4242 + group)"
    try? FileManager.default.createDirectory(atPath: process + "/fd", withIntermediateDirectories: true)
    try? "qemu-system-x86\n".write(toFile: process + "/comm", atomically: false, encoding: .utf8)
    try? FileManager.default.createSymbolicLink(
      atPath: process + "/fd/7", withDestinationPath: devRoot + "/vfio/\(group)")
  }

  /// The VM lets go; a blocked `sriov_numvfs` write of 0 goes on.
  public func release(_ vf: String) {
    let address = PCIAddress(vf)!
    let group = (try? reader.linkName(.device(address, "iommu_group"))).flatMap { $0.flatMap { Int($0) } } ?? -1
    try? FileManager.default.removeItem(atPath: procRoot + "/\(4242 + group)")
    node.release(vf: address)
  }

  /// Every write, as `path=value`, oldest first.
  public var writes: [String] { log.withLock { $0 } }

  public func loadDriver(_ name: String) throws {
    node.setDriverLoaded(name, true)
    try makeDriverFolder(name)
    draw()
  }

  /// Unbinds the PF's driver (VFs stay enabled, as the kernel does).
  public func unbindPFDriver(_ pf: String) throws {
    node.setPFDriver(PCIAddress(pf)!, nil)
    draw()
  }

  // MARK: Drawing the kernel's state

  private func makeDriverFolder(_ name: String) throws {
    let folder = sysRoot + "/bus/pci/drivers/" + name
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    for file in ["bind", "unbind", "new_id"] where !FileManager.default.fileExists(atPath: folder + "/" + file) {
      _ = FileManager.default.createFile(atPath: folder + "/" + file, contents: nil)
    }
  }

  /// Everything the kernel shows, by path under the folder, read through its own sysfs.
  private func picture() -> [String: Item] {
    var items: [String: Item] = [:]
    let devices = (try? node.list(.devices)) ?? []
    for name in devices {
      guard let address = PCIAddress(name) else { continue }
      let device = "sys/devices/\(Self.root)/\(name)"
      items["sys/bus/pci/devices/\(name)"] = .link("../../../devices/\(Self.root)/\(name)")
      for entry in (try? node.list(.device(address))) ?? [] {
        let path = SysfsPath.device(address, entry)
        if let link = (try? node.linkComponents(path)) ?? nil {
          items["\(device)/\(entry)"] = .link(link.joined(separator: "/"))
          if entry == "driver", let driver = link.last {
            items["sys/bus/pci/drivers/\(driver)/\(name)"] = .link("../../../../devices/\(Self.root)/\(name)")
          }
          if entry == "iommu_group", let group = link.last {
            items["sys/kernel/iommu_groups/\(group)/devices/\(name)"] =
              .link("../../../../devices/\(Self.root)/\(name)")
          }
        } else if entry == "qdma" {
          if let qmax = try? node.read(.device(address, "qdma", "qmax")) { items["\(device)/qdma/qmax"] = .file(qmax) }
        } else if let text = try? node.read(path) {
          items["\(device)/\(entry)"] = .file(text)
        }
      }
      if let group = ((try? node.linkName(.device(address, "iommu_group"))) ?? nil).flatMap({ Int($0) }),
        node.deviceNodeExists("vfio/\(group)")
      {
        items["dev/vfio/\(group)"] = .file("")
      }
    }
    return items
  }

  /// Brings the tree in line with the kernel: only what changed since the last drawing is
  /// touched, so files a test placed (or removed) elsewhere stay as it left them.
  private func draw() {
    var wanted = picture()
    wanted["boot_id"] = .file(node.bootID() ?? "")
    drawn.withLock { drawn in
      let fm = FileManager.default
      // Gone: whole devices first (with whatever a test put in them), then single entries.
      let goneDevices = Set(drawn.keys.compactMap(Self.deviceFolder)).subtracting(
        wanted.keys.compactMap(Self.deviceFolder))
      for folder in goneDevices { try? fm.removeItem(atPath: directory + "/" + folder) }
      for (path, _) in drawn where wanted[path] == nil {
        if let folder = Self.deviceFolder(path), goneDevices.contains(folder) { continue }
        try? fm.removeItem(atPath: directory + "/" + path)
        // An emptied group or qdma folder goes too.
        let parent = (directory + "/" + path as NSString).deletingLastPathComponent
        if parent.hasSuffix("/qdma") || parent.hasSuffix("/devices") && parent.contains("/iommu_groups/") {
          if (try? fm.contentsOfDirectory(atPath: parent))?.isEmpty == true {
            try? fm.removeItem(atPath: parent)
            if parent.contains("/iommu_groups/") {
              try? fm.removeItem(atPath: (parent as NSString).deletingLastPathComponent)
            }
          }
        }
      }
      for (path, item) in wanted.sorted(by: { $0.key < $1.key }) where drawn[path] != item {
        let full = directory + "/" + path
        try? fm.createDirectory(
          atPath: (full as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        switch item {
        case .file(let text):
          try? (path.hasPrefix("dev/") ? "" : text + "\n").write(toFile: full, atomically: false, encoding: .utf8)
        case .link(let target):
          try? fm.removeItem(atPath: full)
          try? fm.createSymbolicLink(atPath: full, withDestinationPath: target)
        }
      }
      drawn = wanted
    }
  }

  /// `sys/devices/ROOT/ADDRESS` of a path inside a device's folder.
  private static func deviceFolder(_ path: String) -> String? {
    let parts = path.split(separator: "/")
    guard parts.count >= 4, parts[0] == "sys", parts[1] == "devices" else { return nil }
    return parts.prefix(4).joined(separator: "/")
  }
}

extension SimulatedNode.FunctionSpec {
  /// `FakeKernelSysfs.PF("0000:3b:00.0", device: 0x903f, …)`.
  public init(
    _ address: String, device: UInt16 = 0x903f, vfDevice: UInt16 = 0xa03f, totalVFs: Int = 64, offset: Int = 4
  ) {
    self.init(address: PCIAddress(address)!, device: device, vfDevice: vfDevice, totalVFs: totalVFs, offset: offset)
  }
}
