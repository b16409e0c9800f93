public import FPGACore

/// Reads the PFs that the selectors match, with their SR-IOV attributes and enabled VFs, from
/// sysfs alone: `sriov_*`, `virtfnN` links, each VF's driver, `driver_override`, IOMMU group,
/// `/dev/vfio/N`, NUMA node, and QDMA's `qdma/qmax`.
public struct LinuxDiscovery: Sendable {
  public let sysfs: any Sysfs
  public let selectors: [PFSelector]

  public init(sysfs: any Sysfs, selectors: [PFSelector]) {
    self.sysfs = sysfs
    self.selectors = selectors
  }

  /// Reads every matching PF, except those in `skipping`: a PF with a `sriov_numvfs` write in
  /// flight holds its device lock, and reading its `sriov_numvfs` would block the reader in the
  /// kernel until the write ends (`sriov_numvfs_show` takes the lock). They are returned as
  /// `cached` has them.
  public func discover(
    skipping busy: Set<PCIAddress> = [], cached: [PCIAddress: DiscoveredPF] = [:]
  ) throws(SysfsError) -> DiscoveredNode {
    var pfs: [DiscoveredPF] = []
    var problems: [String] = []
    // While a VF count write tears VFs down, a VF can lose its physfn link before it leaves the
    // bus: one that was a VF at the last scan is never taken for a PF.
    let knownVFs = Set(cached.values.flatMap { $0.vfs.map(\.address) })
    for name in try sysfs.list(.devices) {
      guard let address = PCIAddress(name) else { continue }
      if busy.contains(address) {
        if let known = cached[address] { pfs.append(known) }
        continue
      }
      // VFs are listed too; they are found through their PF.
      if sysfs.exists(.device(address, "physfn")) || knownVFs.contains(address) { continue }
      guard let vendor = try? hexValue(.device(address, "vendor")),
        let device = try? hexValue(.device(address, "device"))
      else { continue }
      let driver: String?
      do {
        driver = try sysfs.linkName(.device(address, "driver"))
      } catch {
        problems.append("PF \(address): its driver link cannot be read (\(error)); it is not managed")
        continue
      }
      guard
        selectors.contains(where: {
          $0.matches(address: address, vendor: UInt16(vendor), device: UInt16(device), driver: driver)
        })
      else { continue }
      // One device that cannot be read costs that device only: it is reported, and when it was
      // read before its VFs are kept (so no allocation ends) but none of them is handed out.
      do {
        pfs.append(
          try readPF(address, vendor: UInt16(vendor), device: UInt16(device), driver: driver, problems: &problems))
      } catch {
        problems.append("PF \(address) cannot be read (\(error)): none of its VFs is allocated until it reads cleanly")
        if var known = cached[address] {
          for index in known.vfs.indices { known.vfs[index].iommuGroup = -1 }
          pfs.append(known)
        }
      }
    }
    return DiscoveredNode(pfs: pfs, problems: problems)
  }

  /// A PF's VFs with their IOMMU groups, from links only (no attribute that takes a lock).
  public func vfGroups(of pf: PCIAddress) -> [(vf: PCIAddress, group: Int)] {
    var found: [(vf: PCIAddress, group: Int)] = []
    for entry in (try? sysfs.list(.device(pf))) ?? [] where entry.hasPrefix("virtfn") {
      guard let name = try? sysfs.linkName(.device(pf, entry)), let vf = PCIAddress(name),
        let group = (try? sysfs.linkName(.device(vf, "iommu_group"))).flatMap({ $0.flatMap { Int($0) } })
      else { continue }
      found.append((vf, group))
    }
    return found.sorted { $0.vf < $1.vf }
  }

  func readPF(
    _ address: PCIAddress, vendor: UInt16, device: UInt16, driver: String?, problems: inout [String]
  ) throws(SysfsError) -> DiscoveredPF {
    let sriov = sysfs.exists(.device(address, "sriov_totalvfs"))
    var vfDevice = 0
    if sriov {
      do {
        vfDevice = try hexValue(.device(address, "sriov_vf_device"))
      } catch {
        problems.append("PF \(address): \(error); its VFs are listed without their device id")
      }
    }
    let function = PhysicalFunction(
      address: address, vendorID: vendor, deviceID: device,
      vfDeviceID: UInt16(vfDevice),
      totalVFs: sriov ? try intValue(.device(address, "sriov_totalvfs")) : 0,
      numVFs: sriov ? try intValue(.device(address, "sriov_numvfs")) : 0,
      vfOffset: sriov ? try intValue(.device(address, "sriov_offset")) : 0,
      vfStride: sriov ? try intValue(.device(address, "sriov_stride")) : 0,
      driversAutoprobe: sriov ? try intValue(.device(address, "sriov_drivers_autoprobe")) != 0 : false,
      driver: driver, numaNode: (try? intValue(.device(address, "numa_node"))) ?? -1,
      qmax: (try? intValue(.device(address, "qdma", "qmax"))) ?? 0)
    var pfFunction = function
    pfFunction.readings = readings(address, expectedDriver: nil, driver: driver)
    var vfs: [VirtualFunction] = []
    for entry in try sysfs.list(.device(address)) where entry.hasPrefix("virtfn") {
      guard let index = Int(entry.dropFirst(6)), let name = try sysfs.linkName(.device(address, entry)),
        let vfAddress = PCIAddress(name)
      else { continue }
      do {
        vfs.append(try readVF(vfAddress, pf: address, index: index))
      } catch {
        // Listed (so an allocation on it stays) but unhealthy: no IOMMU group, never handed out.
        problems.append("VF \(vfAddress) of PF \(address) cannot be read (\(error)): it is not allocated")
        vfs.append(
          VirtualFunction(
            address: vfAddress, pfAddress: address, index: index, vendorID: vendor, deviceID: UInt16(vfDevice),
            iommuGroup: -1, numaNode: function.numaNode, driver: nil, driverOverride: nil, vfioDevice: nil))
      }
    }
    return DiscoveredPF(function: pfFunction, vfs: vfs.sorted { $0.index < $1.index })
  }

  func readVF(_ address: PCIAddress, pf: PCIAddress, index: Int) throws(SysfsError) -> VirtualFunction {
    let driver = try sysfs.linkName(.device(address, "driver"))
    let override = (try? sysfs.read(.device(address, "driver_override"))).flatMap {
      $0.isEmpty || $0 == "(null)" ? nil : $0
    }
    let group = try sysfs.linkName(.device(address, "iommu_group")).flatMap { Int($0) } ?? -1
    let vfio =
      group >= 0 && driver == "vfio-pci" && sysfs.deviceNodeExists("vfio/\(group)") ? "/dev/vfio/\(group)" : nil
    var function = VirtualFunction(
      address: address, pfAddress: pf, index: index,
      vendorID: UInt16(try hexValue(.device(address, "vendor"))),
      deviceID: UInt16(try hexValue(.device(address, "device"))),
      iommuGroup: group, numaNode: (try? intValue(.device(address, "numa_node"))) ?? -1,
      driver: driver, driverOverride: override, vfioDevice: vfio)
    // The agent binds its VFs through driver_override: one that names a driver other than
    // the bound one was unbound (or rebound) behind its back.
    function.readings = readings(address, expectedDriver: override == "none" ? nil : override, driver: driver)
    function.pcieRoot = pcieRoot(address)
    return function
  }

  /// The root complex a device sits under: `pciDDDD:BB`, the first such component of its
  /// `bus/pci/devices` link (`../../../devices/pci0000:3a/0000:3a:00.0/0000:3b:00.4`).
  func pcieRoot(_ address: PCIAddress) -> String? {
    guard let components = try? sysfs.linkComponents(.device(address)) else { return nil }
    return components.first { component in
      component.hasPrefix("pci") && component.count == 10 && component.dropFirst(3).split(separator: ":").count == 2
    }
  }

  /// What sysfs says of a device's health: AER counters (`TOTAL_ERR_*` of `aer_dev_*`), the
  /// link's speed and width against their maxima, and whether config space answers (a device
  /// that fell off the bus reads all ones). Attributes the kernel does not offer stay nil.
  func readings(_ address: PCIAddress, expectedDriver: String?, driver: String?) -> HealthReadings {
    func total(_ file: String, _ key: String) -> UInt64? {
      guard let text = try? sysfs.read(.device(address, file)) else { return nil }
      for line in text.split(separator: "\n") {
        let fields = line.split(separator: " ")
        if fields.count == 2, fields[0] == key { return UInt64(fields[1]) }
      }
      return nil
    }
    func text(_ file: String) -> String? {
      guard let value = try? sysfs.read(.device(address, file)), !value.isEmpty, !value.hasPrefix("Unknown") else {
        return nil
      }
      return value
    }
    // A device that left the bus reads all ones everywhere. Not the first dword: a VF's vendor
    // and device ids read 0xffff by the SR-IOV specification. The class code dword (offset 8) is
    // implemented by PFs and VFs alike.
    let config = Array(((try? sysfs.readBytes(.device(address, "config"), count: 12)) ?? []).dropFirst(8))
    return HealthReadings(
      correctableErrors: total("aer_dev_correctable", "TOTAL_ERR_COR"),
      nonfatalErrors: total("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL"),
      fatalErrors: total("aer_dev_fatal", "TOTAL_ERR_FATAL"),
      linkSpeed: text("current_link_speed"), maxLinkSpeed: text("max_link_speed"),
      linkWidth: text("current_link_width").flatMap { Int($0) },
      maxLinkWidth: text("max_link_width").flatMap { Int($0) },
      configAllOnes: config.count == 4 && config.allSatisfy { $0 == 0xff },
      expectedDriver: expectedDriver, driver: driver)
  }

  func hexValue(_ path: SysfsPath) throws(SysfsError) -> Int {
    let text = try sysfs.read(path)
    let digits = text.hasPrefix("0x") ? text.dropFirst(2) : Substring(text)
    guard let value = Int(digits, radix: 16), (0...0xffff).contains(value) else {
      throw SysfsError(operation: "parse hex \"\(text)\" of", path: path.description, errno: 22)
    }
    return value
  }

  func intValue(_ path: SysfsPath) throws(SysfsError) -> Int {
    let text = try sysfs.read(path)
    guard let value = Int(text) else {
      throw SysfsError(operation: "parse number \"\(text)\" of", path: path.description, errno: 22)
    }
    return value
  }
}
