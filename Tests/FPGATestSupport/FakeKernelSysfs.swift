import FPGACore
import FPGALinux
import Foundation
import Synchronization

/// A kernel-faithful fake of sysfs for the Linux platform's tests: a real directory tree in a
/// temporary folder (PF and VF directories, `virtfnN`/`physfn`/`driver`/`iommu_group` links,
/// driver directories, `kernel/iommu_groups`, `/dev/vfio/N`), read through the real
/// `LinuxSysfs`, whose writes get the kernel's reactions (drivers/pci/iov.c, pci-driver.c,
/// vfio-pci, the QDMA driver): VFs appear and vanish on `sriov_numvfs`, EINVAL/ERANGE/EBUSY/
/// ENOENT/EPERM, a write of 0 that blocks while a VF is held, driver_override + drivers_probe.
public final class FakeKernelSysfs: Sysfs, @unchecked Sendable {
  public struct PF: Sendable {
    public var address: PCIAddress
    public var vendor: UInt16 = 0x10ee
    public var device: UInt16 = 0x903f
    public var vfDevice: UInt16 = 0xa03f
    public var totalVFs = 64
    public var offset = 4
    public var stride = 1
    public var driver: String? = "qdma-pf"
    public var numaNode = 0
    /// False models a QDMA bitstream without mailbox: VF count writes fail with EPERM.
    public var mailbox = true
    /// True models QDMA when pci_enable_sriov fails: the write succeeds, 0 VFs appear.
    public var enableFailsSilently = false

    public init(
      _ address: String, device: UInt16 = 0x903f, vfDevice: UInt16 = 0xa03f, totalVFs: Int = 64, offset: Int = 4
    ) {
      self.address = PCIAddress(address)!
      self.device = device
      self.vfDevice = vfDevice
      self.totalVFs = totalVFs
      self.offset = offset
    }
  }

  struct Model {
    var pfs: [PCIAddress: PF] = [:]
    var numVFs: [PCIAddress: Int] = [:]
    var autoprobe: [PCIAddress: Bool] = [:]
    var vfPF: [PCIAddress: PCIAddress] = [:]
    var override: [PCIAddress: String] = [:]
    var bound: [PCIAddress: String] = [:]
    var groups: [PCIAddress: Int] = [:]
    var held: Set<PCIAddress> = []
    var nextGroup = 20
    var writes: [String] = []
  }

  /// The temporary folder: `sys/` and `dev/` inside.
  public let directory: String
  public let sysRoot: String
  public let devRoot: String
  /// A fake `/proc` where holders of `/dev/vfio/N` appear (see `hold`).
  public let procRoot: String
  private let reader: LinuxSysfs
  private let model = Mutex(Model())
  private let released = NSCondition()

  public init(pfs: [PF], drivers: [String] = ["qdma-pf", "qdma-vf", "vfio-pci"], iommu: Bool = true) throws {
    directory = NSTemporaryDirectory() + "fake-sysfs-" + UUID().uuidString.prefix(8)
    sysRoot = directory + "/sys"
    devRoot = directory + "/dev"
    procRoot = directory + "/proc"
    for folder in [
      "sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups", "sys/devices/pci0000:00", "dev/vfio",
    ] {
      try FileManager.default.createDirectory(atPath: directory + "/" + folder, withIntermediateDirectories: true)
    }
    FileManager.default.createFile(atPath: devRoot + "/vfio/vfio", contents: nil)
    FileManager.default.createFile(atPath: sysRoot + "/bus/pci/drivers_probe", contents: nil)
    reader = try LinuxSysfs(root: sysRoot, devRoot: devRoot)
    for driver in drivers { try loadDriver(driver) }
    try model.withLock { model throws in
      for pf in pfs {
        model.pfs[pf.address] = pf
        model.numVFs[pf.address] = 0
        model.autoprobe[pf.address] = true
        try createFunction(
          pf.address, vendor: pf.vendor, device: pf.device, numa: pf.numaNode, model: &model, iommu: iommu)
        let dir = devicePath(pf.address)
        try put(dir + "/sriov_totalvfs", "\(pf.totalVFs)")
        try put(dir + "/sriov_numvfs", "0")
        try put(dir + "/sriov_offset", "\(pf.offset)")
        try put(dir + "/sriov_stride", "\(pf.stride)")
        try put(dir + "/sriov_vf_device", String(pf.vfDevice, radix: 16))
        try put(dir + "/sriov_drivers_autoprobe", "1")
        if let driver = pf.driver { try bind(pf.address, to: driver, model: &model) }
      }
    }
  }

  deinit { try? FileManager.default.removeItem(atPath: directory) }

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

  public func write(_ path: SysfsPath, _ value: String) throws(SysfsError) {
    guard reader.exists(path) else { throw SysfsError(operation: "open", path: path.description, errno: 2) }
    let c = path.components
    let text = value.hasSuffix("\n") ? String(value.dropLast()) : value
    model.withLock { $0.writes.append("\(path)=\(text)") }
    switch (c.count, c.last) {
    case (5, "sriov_numvfs"): try writeNumVFs(PCIAddress(c[3])!, text)
    case (5, "sriov_drivers_autoprobe"):
      guard text == "0" || text == "1" else { throw errno(22, path) }
      model.withLock { $0.autoprobe[PCIAddress(c[3])!] = text == "1" }
      try wrap { try put(devicePath(PCIAddress(c[3])!) + "/sriov_drivers_autoprobe", text) }
    case (5, "driver_override"):
      let vf = PCIAddress(c[3])!
      model.withLock { $0.override[vf] = text.isEmpty ? nil : text }
      try wrap { try put(devicePath(vf) + "/driver_override", text.isEmpty ? "(null)" : text) }
    case (5, "unbind"):
      guard let device = PCIAddress(text) else { throw errno(19, path) }
      try model.withLock { (model) throws(SysfsError) in
        guard model.bound[device] == c[3] else { throw errno(19, path) }
        try wrap { try unbind(device, model: &model) }
      }
    case (3, "drivers_probe"):
      guard let device = PCIAddress(text) else { throw errno(19, path) }
      try model.withLock { (model) throws(SysfsError) in
        guard model.bound[device] == nil, let function = model.vfPF[device] ?? model.pfs[device]?.address else {
          return
        }
        _ = function
        let wanted = model.override[device] ?? (model.vfPF[device] != nil ? "qdma-vf" : nil)
        guard let wanted, wanted != "none", reader.exists(.driver(wanted)) else { return }
        // "vfio-pci: Cannot bind to PF with SR-IOV enabled": the probe fails, the write succeeds.
        if wanted == "vfio-pci", (model.numVFs[device] ?? 0) > 0 { return }
        try wrap { try bind(device, to: wanted, model: &model) }
      }
    case (6, "qmax"):
      guard let qmax = Int(text), qmax >= 0, qmax <= 2048 else { throw errno(22, path) }
      try wrap { try put(devicePath(PCIAddress(c[3])!) + "/qdma/qmax", "\(qmax)") }
    default:
      throw errno(1, path)
    }
  }

  // MARK: What VMs, modules and the kernel do (test controls)

  /// A VM (`qemu-system-x86`, pid 4242 + group) opens the VF's /dev/vfio/N: it shows in the fake
  /// /proc as an open file descriptor.
  public func hold(_ vf: String) {
    let group = model.withLock { model in
      _ = model.held.insert(PCIAddress(vf)!)
      return model.groups[PCIAddress(vf)!] ?? -1
    }
    let process = procRoot + "/\(4242 + group)"
    try? FileManager.default.createDirectory(atPath: process + "/fd", withIntermediateDirectories: true)
    try? "qemu-system-x86\n".write(toFile: process + "/comm", atomically: false, encoding: .utf8)
    try? FileManager.default.createSymbolicLink(
      atPath: process + "/fd/7", withDestinationPath: devRoot + "/vfio/\(group)")
  }

  /// The VM lets go; a blocked `sriov_numvfs` write of 0 goes on.
  public func release(_ vf: String) {
    let group = model.withLock { $0.groups[PCIAddress(vf)!] ?? -1 }
    try? FileManager.default.removeItem(atPath: procRoot + "/\(4242 + group)")
    released.lock()
    model.withLock { _ = $0.held.remove(PCIAddress(vf)!) }
    released.broadcast()
    released.unlock()
  }

  /// Every write, as `path=value`, oldest first.
  public var writes: [String] { model.withLock { $0.writes } }

  public func loadDriver(_ name: String) throws {
    let folder = sysRoot + "/bus/pci/drivers/" + name
    try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
    for file in ["bind", "unbind", "new_id"] {
      FileManager.default.createFile(atPath: folder + "/" + file, contents: nil)
    }
  }

  /// Unbinds the PF's driver (VFs stay enabled, as the kernel does).
  public func unbindPFDriver(_ pf: String) throws {
    try model.withLock { model in try unbind(PCIAddress(pf)!, model: &model) }
  }

  // MARK: Kernel behaviour

  private func writeNumVFs(_ pf: PCIAddress, _ text: String) throws(SysfsError) {
    let path = "bus/pci/devices/\(pf)/sriov_numvfs"
    guard let count = Int(text), count >= 0 else { throw errno(22, path) }
    while true {
      let blocked: Bool = try model.withLock { (model) throws(SysfsError) -> Bool in
        let spec = model.pfs[pf]!
        let current = model.numVFs[pf] ?? 0
        if count > spec.totalVFs { throw errno(34, path) }  // range is checked before busy
        if count == current { return false }
        guard model.bound[pf] != nil else { throw errno(2, path) }
        if !spec.mailbox { throw errno(1, path) }
        if count != 0 && current != 0 { throw errno(16, path) }
        if count == 0 {
          let vfs = model.vfPF.filter { $0.value == pf }.map(\.key)
          if vfs.contains(where: model.held.contains) { return true }
          for vf in vfs { try wrap { try removeVF(vf, of: pf, model: &model) } }
          model.numVFs[pf] = 0
        } else {
          if spec.enableFailsSilently { return false }
          for index in 0..<count {
            try wrap { try createVF(index: index, of: pf, model: &model) }
          }
          model.numVFs[pf] = count
        }
        try wrap { try put(devicePath(pf) + "/sriov_numvfs", "\(model.numVFs[pf]!)") }
        return false
      }
      guard blocked else { return }
      // vfio_unregister_group_dev: wait, uninterruptibly, until the device is released.
      released.lock()
      released.wait(until: Date().addingTimeInterval(0.05))
      released.unlock()
    }
  }

  private func createVF(index: Int, of pf: PCIAddress, model: inout Model) throws {
    let spec = model.pfs[pf]!
    guard let vf = PCIAddress(domain: pf.domain, routingID: pf.routingID + spec.offset + spec.stride * index) else {
      return
    }
    try createFunction(vf, vendor: spec.vendor, device: spec.vfDevice, numa: spec.numaNode, model: &model, iommu: true)
    model.vfPF[vf] = pf
    try symlink(devicePath(vf) + "/physfn", "../" + pf.description)
    try symlink(devicePath(pf) + "/virtfn\(index)", "../" + vf.description)
    if model.autoprobe[pf] == true, reader.exists(.driver("qdma-vf")) {
      try bind(vf, to: "qdma-vf", model: &model)
    }
  }

  private func removeVF(_ vf: PCIAddress, of pf: PCIAddress, model: inout Model) throws {
    if model.bound[vf] != nil { try unbind(vf, model: &model) }
    let index = try FileManager.default.contentsOfDirectory(atPath: devicePath(pf)).first { name in
      name.hasPrefix("virtfn")
        && (try? FileManager.default.destinationOfSymbolicLink(atPath: devicePath(pf) + "/" + name)) == "../"
          + vf.description
    }
    if let index { try FileManager.default.removeItem(atPath: devicePath(pf) + "/" + index) }
    if let group = model.groups.removeValue(forKey: vf) {
      try? FileManager.default.removeItem(atPath: sysRoot + "/kernel/iommu_groups/\(group)")
    }
    try FileManager.default.removeItem(atPath: sysRoot + "/bus/pci/devices/" + vf.description)
    try FileManager.default.removeItem(atPath: devicePath(vf))
    model.vfPF[vf] = nil
    model.override[vf] = nil
  }

  private func createFunction(
    _ address: PCIAddress, vendor: UInt16, device: UInt16, numa: Int, model: inout Model, iommu: Bool
  ) throws {
    let dir = devicePath(address)
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    try put(dir + "/vendor", "0x" + hex(Int(vendor), width: 4))
    try put(dir + "/device", "0x" + hex(Int(device), width: 4))
    try put(dir + "/numa_node", "\(numa)")
    try put(dir + "/driver_override", "(null)")
    try symlink(
      sysRoot + "/bus/pci/devices/" + address.description, "../../../devices/pci0000:00/" + address.description)
    if iommu {
      let group = model.nextGroup
      model.nextGroup += 1
      model.groups[address] = group
      let groupDir = sysRoot + "/kernel/iommu_groups/\(group)/devices"
      try FileManager.default.createDirectory(atPath: groupDir, withIntermediateDirectories: true)
      try symlink(groupDir + "/" + address.description, "../../../../devices/pci0000:00/" + address.description)
      try symlink(dir + "/iommu_group", "../../../kernel/iommu_groups/\(group)")
    }
  }

  private func bind(_ device: PCIAddress, to driver: String, model: inout Model) throws {
    try symlink(devicePath(device) + "/driver", "../../../bus/pci/drivers/" + driver)
    try symlink(
      sysRoot + "/bus/pci/drivers/\(driver)/" + device.description,
      "../../../../devices/pci0000:00/" + device.description)
    model.bound[device] = driver
    if driver == "vfio-pci", let group = model.groups[device] {
      FileManager.default.createFile(atPath: devRoot + "/vfio/\(group)", contents: nil)
    }
    if driver == "qdma-pf" || driver == "qdma-vf" {
      try FileManager.default.createDirectory(atPath: devicePath(device) + "/qdma", withIntermediateDirectories: true)
      try put(devicePath(device) + "/qdma/qmax", "0")
    }
  }

  private func unbind(_ device: PCIAddress, model: inout Model) throws {
    guard let driver = model.bound.removeValue(forKey: device) else { return }
    try FileManager.default.removeItem(atPath: devicePath(device) + "/driver")
    try FileManager.default.removeItem(atPath: sysRoot + "/bus/pci/drivers/\(driver)/" + device.description)
    if driver == "vfio-pci", let group = model.groups[device] {
      try? FileManager.default.removeItem(atPath: devRoot + "/vfio/\(group)")
    }
    try? FileManager.default.removeItem(atPath: devicePath(device) + "/qdma")
  }

  private func devicePath(_ address: PCIAddress) -> String { sysRoot + "/devices/pci0000:00/" + address.description }

  private func put(_ path: String, _ content: String) throws {
    try (content + "\n").write(toFile: path, atomically: false, encoding: .utf8)
  }

  private func symlink(_ path: String, _ target: String) throws {
    try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: target)
  }

  private func errno(_ code: Int32, _ path: Any) -> SysfsError {
    SysfsError(operation: "write", path: "\(path)", errno: code)
  }

  private func wrap(_ body: () throws -> Void) throws(SysfsError) {
    do { try body() } catch let error as SysfsError { throw error } catch {
      throw SysfsError(operation: "fake sysfs: \(error)", path: "", errno: 5)
    }
  }
}
