import FPGACore
public import FPGALinux

/// The simulated node as a kernel behind the Linux platform's `Sysfs` seam: the attributes,
/// links and listings `LinuxDiscovery` reads are rendered from the node's state, and every write
/// goes to the node's kernel rules (`writeNumVFs`, `writeAutoprobe`, `writeDriverOverride`,
/// `unbind`, `probe`, `writeQmax`), so `platform: simulated` runs the production `LinuxPlatform`
/// and the rules exist once. VMs hold VFs open through the node (`hold`), which is also how the
/// platform finds a group's holders.
extension SimulatedNode: Sysfs, VFIOHolderFinding {
  /// What a path names in the simulated tree.
  private enum Entry {
    case devices, drivers, iommuGroups, driversProbe
    case pf(PCIAddress, [String])
    case vf(PCIAddress, [String])
    case driver(String, [String])
    case missing
  }

  private func entry(_ path: SysfsPath, _ state: State) -> Entry {
    let c = path.components
    switch c.count {
    case 3 where c == SysfsPath.devices.components: return .devices
    case 3 where c == SysfsPath.drivers.components: return .drivers
    case 3 where c == SysfsPath.driversProbe.components: return .driversProbe
    case 2 where c == SysfsPath.iommuGroups.components: return .iommuGroups
    default: break
    }
    guard c.count >= 4, c[0] == "bus", c[1] == "pci" else { return .missing }
    let rest = Array(c.dropFirst(4))
    if c[2] == "devices", let address = PCIAddress(c[3]) {
      if state.pfs[address] != nil { return .pf(address, rest) }
      if state.vfs[address] != nil { return .vf(address, rest) }
    }
    if c[2] == "drivers", state.loadedDrivers.contains(c[3]) { return .driver(c[3], rest) }
    return .missing
  }

  private static func notFound(_ operation: String, _ path: SysfsPath) -> SysfsError {
    SysfsError(operation: operation, path: path.description, errno: KernelErrno.ENOENT.rawValue)
  }

  // MARK: Reads

  public func read(_ path: SysfsPath) throws(SysfsError) -> String {
    let value: String? = state.withLock { state in
      switch entry(path, state) {
      case .pf(let address, let rest):
        let pf = state.pfs[address]!
        switch rest {
        case ["vendor"]: return "0x" + hex(Int(pf.vendorID ?? Self.vendorID), width: 4)
        case ["device"]: return "0x" + hex(Int(pf.deviceID), width: 4)
        case ["numa_node"]: return "\(pf.numaNode)"
        case ["sriov_totalvfs"]: return "\(pf.totalVFs)"
        case ["sriov_numvfs"]: return "\(pf.numVFs)"
        case ["sriov_offset"]: return "\(pf.offset)"
        case ["sriov_stride"]: return "\(pf.stride)"
        case ["sriov_vf_device"]: return hex(Int(pf.vfDeviceID), width: 4)
        case ["sriov_drivers_autoprobe"]: return pf.autoprobe ? "1" : "0"
        case ["driver_override"]: return pf.driverOverride ?? "(null)"
        case ["qdma", "qmax"]: return Self.isQDMA(pf.driver) ? "\(pf.qmax)" : nil
        default: return nil
        }
      case .vf(let address, let rest):
        let vf = state.vfs[address]!
        let pf = state.pfs[vf.pf]
        switch rest {
        case ["vendor"]: return "0x" + hex(Int(pf?.vendorID ?? Self.vendorID), width: 4)
        case ["device"]: return "0x" + hex(Int(pf?.vfDeviceID ?? 0), width: 4)
        case ["numa_node"]: return "\(pf?.numaNode ?? -1)"
        case ["driver_override"]: return vf.driverOverride ?? "(null)"
        default: return nil
        }
      default: return nil
      }
    }
    guard let value else { throw Self.notFound("open", path) }
    return value
  }

  /// Config space: the ids (a VF's read 0xffff, as the SR-IOV specification has it), then the
  /// class code of a processing accelerator (0x1200).
  public func readBytes(_ path: SysfsPath, count: Int) throws(SysfsError) -> [UInt8] {
    let ids: (UInt16, UInt16)? = state.withLock { state in
      switch entry(path, state) {
      case .pf(let address, ["config"]):
        let pf = state.pfs[address]!
        return (pf.vendorID ?? Self.vendorID, pf.deviceID)
      case .vf(_, ["config"]): return (0xffff, 0xffff)
      default: return nil
      }
    }
    guard let (vendor, device) = ids else { throw Self.notFound("open", path) }
    let bytes: [UInt8] = [
      UInt8(vendor & 0xff), UInt8(vendor >> 8), UInt8(device & 0xff), UInt8(device >> 8), 0, 0, 0x10, 0, 0, 0, 0, 0x12,
    ]
    return Array(bytes.prefix(count))
  }

  public func linkName(_ path: SysfsPath) throws(SysfsError) -> String? {
    linkComponents(path: path)?.last
  }

  public func linkComponents(_ path: SysfsPath) throws(SysfsError) -> [String]? {
    linkComponents(path: path)
  }

  private func linkComponents(path: SysfsPath) -> [String]? {
    state.withLock { state -> [String]? in
      switch entry(path, state) {
      case .pf(let address, let rest):
        let pf = state.pfs[address]!
        switch rest {
        case []: return Self.deviceLink(address, root: pf.pcieRoot)
        case ["driver"]: return pf.driver.map { ["..", "..", "..", "bus", "pci", "drivers", $0] }
        case ["iommu_group"]: return pf.iommuGroup.map { ["..", "..", "..", "kernel", "iommu_groups", "\($0)"] }
        default:
          guard rest.count == 1, rest[0].hasPrefix("virtfn"), let index = Int(rest[0].dropFirst(6)),
            let vf = Self.vfAddresses(state, of: address).dropFirst(index).first
          else { return nil }
          return ["..", vf.description]
        }
      case .vf(let address, let rest):
        let vf = state.vfs[address]!
        switch rest {
        case []: return Self.deviceLink(address, root: state.pfs[vf.pf]?.pcieRoot)
        case ["driver"]: return vf.driver.map { ["..", "..", "..", "bus", "pci", "drivers", $0] }
        case ["physfn"]: return ["..", vf.pf.description]
        case ["iommu_group"]:
          return vf.iommuGroup < 0 ? nil : ["..", "..", "..", "kernel", "iommu_groups", "\(vf.iommuGroup)"]
        default: return nil
        }
      default: return nil
      }
    }
  }

  /// `bus/pci/devices/X` → `../../../devices/ROOT/X`; ROOT is the card's bus unless the
  /// function says otherwise.
  private static func deviceLink(_ address: PCIAddress, root: String?) -> [String] {
    [
      "..", "..", "..", "devices",
      root ?? "pci\(hex(Int(address.domain), width: 4)):\(hex(Int(address.bus), width: 2))", address.description,
    ]
  }

  public func list(_ path: SysfsPath) throws(SysfsError) -> [String] {
    state.withLock { state in
      switch entry(path, state) {
      case .devices: return (Array(state.pfs.keys) + Array(state.vfs.keys)).sorted().map(\.description)
      case .drivers: return state.loadedDrivers.sorted()
      case .iommuGroups:
        let groups = state.vfs.values.map(\.iommuGroup) + state.pfs.values.compactMap(\.iommuGroup)
        return Set(groups.filter { $0 >= 0 }).sorted().map(String.init)
      case .pf(let address, []):
        let pf = state.pfs[address]!
        var names = [
          "config", "device", "driver_override", "numa_node", "sriov_drivers_autoprobe", "sriov_numvfs", "sriov_offset",
          "sriov_stride", "sriov_totalvfs", "sriov_vf_device", "vendor",
        ]
        if pf.driver != nil { names.append("driver") }
        if pf.iommuGroup != nil { names.append("iommu_group") }
        if Self.isQDMA(pf.driver) { names.append("qdma") }
        names += (0..<pf.numVFs).map { "virtfn\($0)" }
        return names.sorted()
      case .vf(let address, []):
        var names = ["config", "device", "driver_override", "numa_node", "physfn", "vendor"]
        if state.vfs[address]!.driver != nil { names.append("driver") }
        if state.vfs[address]!.iommuGroup >= 0 { names.append("iommu_group") }
        return names.sorted()
      default: return []
      }
    }
  }

  public func exists(_ path: SysfsPath) -> Bool {
    let target = state.withLock { entry(path, $0) }
    switch target {
    case .missing: return false
    case .devices, .drivers, .iommuGroups, .driversProbe: return true
    case .driver(_, let rest):
      return rest.isEmpty || (rest.count == 1 && ["bind", "unbind", "new_id"].contains(rest[0]))
    case .pf(let address, let rest), .vf(let address, let rest):
      if rest.isEmpty { return true }
      if rest == ["qdma", "qmax"] { return (try? read(path)) != nil }
      guard rest.count == 1 else { return false }
      return ((try? list(.device(address))) ?? []).contains(rest[0])
    }
  }

  /// `/dev/vfio/vfio`, and `/dev/vfio/N` while a VF of group N is bound to vfio-pci.
  public func deviceNodeExists(_ relative: String) -> Bool {
    guard relative.hasPrefix("vfio/") else { return false }
    let name = relative.dropFirst(5)
    if name == "vfio" { return state.withLock { $0.loadedDrivers.contains("vfio-pci") } }
    guard let group = Int(name) else { return false }
    return state.withLock { state in state.vfs.values.contains { $0.iommuGroup == group && $0.driver == "vfio-pci" } }
  }

  // MARK: Writes: each to its kernel rule

  public func write(_ path: SysfsPath, _ value: String) throws(SysfsError) {
    let text = value.hasSuffix("\n") ? String(value.dropLast()) : value
    let target = state.withLock { entry(path, $0) }
    do throws(KernelErrno) {
      switch target {
      case .pf(let address, ["sriov_numvfs"]): try writeNumVFsBlocking(pf: address, text)
      case .pf(let address, ["sriov_drivers_autoprobe"]): try writeAutoprobe(pf: address, text)
      case .pf(let address, ["qdma", "qmax"]): try writeQmax(pf: address, text)
      case .vf(let address, ["driver_override"]), .pf(let address, ["driver_override"]):
        try writeDriverOverride(vf: address, text)
      case .driver(let driver, ["unbind"]):
        guard let device = PCIAddress(text) else { throw KernelErrno.ENODEV }
        do throws(KernelErrno) {
          try unbind(vf: device, from: driver)
        } catch {
          throw error == .ENOENT ? .ENODEV : error  // nothing bound: not this driver's device either
        }
      case .driversProbe:
        guard let device = PCIAddress(text) else { throw KernelErrno.ENODEV }
        try probe(vf: device)
      case .missing: throw KernelErrno.ENOENT
      default: throw KernelErrno.EPERM
      }
    } catch {
      throw SysfsError(operation: "write", path: path.description, errno: error.rawValue)
    }
  }

  // MARK: Holders

  /// The VM holding group `group` open, as "VM NAME".
  public func holders(ofGroup group: Int) -> [String] {
    state.withLock { state in
      state.vfs.values.filter { $0.iommuGroup == group && group >= 0 }.compactMap { $0.holder.map { "VM \($0)" } }
    }
  }

  static func isQDMA(_ driver: String?) -> Bool { driver == "qdma-pf" || driver == "qdma-vf" }
}
