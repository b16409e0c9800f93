public import FPGACore
public import FPGALinux
import Foundation

/// A simulated node that behaves like the kernel's SR-IOV and VFIO sysfs interface: every
/// operation is a sysfs write with the kernel's errno answers (drivers/pci/iov.c, the QDMA
/// driver, vfio-pci), so tests of the agent meet the rules they will meet on a real host.
public final class SimulatedNode: Sendable {
  struct PF: Sendable, Codable, Hashable {
    var deviceID: UInt16
    var vfDeviceID: UInt16
    var totalVFs: Int
    var numVFs = 0
    var offset: Int
    var stride = 1
    var autoprobe = true
    var driver: String? = "qdma-pf"
    var mailbox = true
    var numaNode: Int
    var qmax = 0
    /// Optional so that hardware files written before these existed still load.
    var vendorID: UInt16?
    var driverOverride: String?
    /// QDMA when pci_enable_sriov fails: the write succeeds and no VF appears.
    var enableFailsSilently: Bool?
    var iommuGroup: Int?
    /// The root complex the function sits under (`pciDDDD:BB`); nil: its own bus.
    var pcieRoot: String?
  }

  struct VF: Sendable, Codable, Hashable {
    var pf: PCIAddress
    var index: Int
    var driver: String?
    var driverOverride: String?
    var iommuGroup: Int
    /// Who holds the VF's /dev/vfio/N open (a VM name), nil when nobody.
    var holder: String?
  }

  struct State: Sendable {
    var pfs: [PCIAddress: PF] = [:]
    var vfs: [PCIAddress: VF] = [:]
    var nextGroup: Int
    var loadedDrivers: Set<String> = ["qdma-pf", "qdma-vf", "vfio-pci"]
    /// Whether the host has an IOMMU: without one no function has a group.
    var iommu = true
    /// Writes of 0 waiting for held VFs to be released.
    var blockedWrites: [CheckedContinuation<Void, Never>] = []
    var writes: [String] = []
    /// The simulated kernel's boot id: new at every `reboot()`.
    var bootID = SimulatedNode.newBootID()
  }

  static let vendorID: UInt16 = 0x10ee
  static let queueLimit = 2048

  let state: Locked<State>
  /// Signalled when a VM lets go of a VF: a blocked synchronous write of 0 tries again.
  private let releasedSignal = NSCondition()
  /// Called with the hardware's state after every accepted write (to keep it in a file, so the
  /// simulated cards outlive the agent's process like real ones).
  private let onChange: (@Sendable (Hardware) -> Void)?

  /// What the simulated cards are now: kept across agent restarts with `simulator.state_file`.
  public struct Hardware: Sendable, Codable, Hashable {
    var pfs: [PCIAddress: PF]
    var vfs: [PCIAddress: VF]
    var nextGroup: Int
    var loadedDrivers: Set<String>
    /// Optional so that hardware files written before it existed still load.
    var bootID: String?
  }

  /// A node whose cards are in `hardware` (from an earlier run), or built from `config`.
  public convenience init(
    config: SimulatorConfig = .default, hardware: Hardware?, onChange: @escaping @Sendable (Hardware) -> Void
  ) {
    self.init(config: config, onChange: onChange)
    if let hardware {
      state.withLock { state in
        state.pfs = hardware.pfs
        state.vfs = hardware.vfs.mapValues {
          var vf = $0; vf.holder = nil; return vf
        }
        state.nextGroup = hardware.nextGroup
        state.loadedDrivers = hardware.loadedDrivers
        if let bootID = hardware.bootID { state.bootID = bootID }
      }
    }
    save()
  }

  public var hardware: Hardware {
    state.withLock {
      Hardware(pfs: $0.pfs, vfs: $0.vfs, nextGroup: $0.nextGroup, loadedDrivers: $0.loadedDrivers, bootID: $0.bootID)
    }
  }

  /// The simulated kernel's id of this boot.
  public func bootID() -> String? { state.withLock { $0.bootID } }

  /// A host reboot: every PF comes back with no VFs, autoprobe on, no driver override, qmax 0;
  /// no VM holds anything; the boot id changes. What `hardware` keeps follows.
  public func reboot() {
    state.withLock { state in
      // Groups are handed out again from where the VFs' started, as a kernel enumerating the
      // same devices in the same order does.
      if let first = state.vfs.values.map(\.iommuGroup).min() { state.nextGroup = first }
      state.vfs = [:]
      for address in state.pfs.keys {
        state.pfs[address]!.numVFs = 0
        state.pfs[address]!.autoprobe = true
        state.pfs[address]!.driverOverride = nil
        state.pfs[address]!.qmax = 0
      }
      state.bootID = Self.newBootID()
    }
    save()
  }

  static func newBootID() -> String { UUID().uuidString.lowercased() }

  private func save() { onChange?(hardware) }

  public convenience init(config: SimulatorConfig = .default) {
    self.init(config: config, onChange: nil)
  }

  /// One PCI function with SR-IOV, as a test lays out a host (any vendor, ids and VF layout).
  public struct FunctionSpec: Sendable {
    public var address: PCIAddress
    public var vendor: UInt16 = 0x10ee
    public var device: UInt16 = 0x903f
    public var vfDevice: UInt16 = 0xa03f
    public var totalVFs = 64
    public var offset = 4
    public var stride = 1
    public var driver: String? = "qdma-pf"
    public var numaNode = 0
    public var mailbox = true
    public var enableFailsSilently = false
    public var pcieRoot: String?

    public init(
      address: PCIAddress, device: UInt16 = 0x903f, vfDevice: UInt16 = 0xa03f, totalVFs: Int = 64, offset: Int = 4
    ) {
      self.address = address
      self.device = device
      self.vfDevice = vfDevice
      self.totalVFs = totalVFs
      self.offset = offset
    }
  }

  /// A host with exactly these functions, these drivers loaded, an IOMMU or not; groups are
  /// numbered from `firstIOMMUGroup` in order (functions first, then VFs as they appear).
  public convenience init(functions: [FunctionSpec], drivers: Set<String>, iommu: Bool, firstIOMMUGroup: Int = 20) {
    self.init(config: SimulatorConfig(cards: [], firstIOMMUGroup: firstIOMMUGroup), onChange: nil)
    state.withLock { state in
      state.loadedDrivers = drivers
      state.iommu = iommu
      for spec in functions {
        state.pfs[spec.address] = PF(
          deviceID: spec.device, vfDeviceID: spec.vfDevice, totalVFs: spec.totalVFs, offset: spec.offset,
          // A function is bound only to a driver that is loaded.
          stride: spec.stride, driver: spec.driver.flatMap { drivers.contains($0) ? $0 : nil }, mailbox: spec.mailbox,
          numaNode: spec.numaNode,
          vendorID: spec.vendor, enableFailsSilently: spec.enableFailsSilently,
          iommuGroup: iommu ? state.nextGroup : nil, pcieRoot: spec.pcieRoot)
        if iommu { state.nextGroup += 1 }
      }
    }
  }

  private init(config: SimulatorConfig, onChange: (@Sendable (Hardware) -> Void)?) {
    self.onChange = onChange
    var state = State(nextGroup: config.firstIOMMUGroup)
    for card in config.cards {
      var routing = 0
      for (index, total) in card.totalVFs.enumerated() {
        // PFs take functions 0..3; PF p's VFs follow the VFs of PFs 0..p-1 on the same bus.
        let pfCount = card.totalVFs.count
        let offset = pfCount - index + routing
        routing += total
        let address = PCIAddress(domain: card.domain, bus: card.bus, device: 0, function: UInt8(index))!
        state.pfs[address] = PF(
          deviceID: 0x903f + UInt16(index) * 0x100, vfDeviceID: 0xa03f + UInt16(index) * 0x100,
          totalVFs: total, offset: offset, mailbox: card.mailbox, numaNode: card.numaNode,
          // PFs' groups count down from below the VFs' first, so VF groups stay as configured.
          iommuGroup: config.firstIOMMUGroup - 1 - state.pfs.count)
        let enabled = index < card.enabledVFs.count ? card.enabledVFs[index] : 0
        if enabled > 0 {
          state.pfs[address]!.autoprobe = !card.bindToVFIO
          Self.enable(&state, pf: address, count: enabled)
          if card.bindToVFIO {
            for vf in Self.vfAddresses(state, of: address) {
              state.vfs[vf]!.driverOverride = "vfio-pci"
              state.vfs[vf]!.driver = "vfio-pci"
            }
          }
        }
      }
    }
    self.state = Locked(state)
  }

  // MARK: Reading (what sysfs shows)

  /// Every PF with its VFs, as a platform scan sees them: the Linux platform's own discovery
  /// over this node's sysfs (one reading of sysfs, not a second model of it).
  public func scan() -> DiscoveredNode {
    (try? LinuxDiscovery(sysfs: self, selectors: [.any]).discover()) ?? DiscoveredNode(pfs: [])
  }

  /// The drivers currently loaded.
  public var loadedDrivers: Set<String> { state.withLock { $0.loadedDrivers } }

  /// Every write made, as `path=value` (oldest first), for tests.
  public var writeLog: [String] { state.withLock { $0.writes } }

  // MARK: Writing (what sysfs accepts)

  /// `echo VALUE > /sys/bus/pci/devices/PF/sriov_numvfs`. A write of 0 blocks, like vfio-pci's
  /// remove path, while a VF of the PF is held open by a VM (the task waits).
  public func writeNumVFs(pf address: PCIAddress, _ value: String) async throws(KernelErrno) {
    while try !attemptNumVFs(pf: address, value) {
      await withCheckedContinuation { continuation in
        state.withLock { $0.blockedWrites.append(continuation) }
      }
    }
  }

  /// The same write from a thread that may block (the Linux platform's worker, through the
  /// `Sysfs` seam): it waits, uninterruptibly like `vfio_unregister_group_dev`, for the release.
  func writeNumVFsBlocking(pf address: PCIAddress, _ value: String) throws(KernelErrno) {
    while try !attemptNumVFs(pf: address, value) {
      releasedSignal.lock()
      _ = releasedSignal.wait(until: Date().addingTimeInterval(0.05))
      releasedSignal.unlock()
    }
  }

  /// The kernel's rules for a VF count write (drivers/pci/iov.c, the QDMA driver, vfio-pci):
  /// true when done, false when it must wait for a holder to let go.
  private func attemptNumVFs(pf address: PCIAddress, _ value: String) throws(KernelErrno) -> Bool {
    let outcome: Result<Bool, KernelErrno> = state.withLock { state in
      state.writes.append("\(address)/sriov_numvfs=\(value)")
      guard let pf = state.pfs[address] else { return .failure(.ENOENT) }
      guard let count = Int(value), count >= 0 else { return .failure(.EINVAL) }
      if count > pf.totalVFs { return .failure(.ERANGE) }
      if count == pf.numVFs { return .success(true) }
      guard let driver = pf.driver, state.loadedDrivers.contains(driver) else { return .failure(.ENOENT) }
      if !pf.mailbox { return .failure(.EPERM) }
      if count != 0 && pf.numVFs != 0 { return .failure(.EBUSY) }
      if count == 0 {
        if Self.vfAddresses(state, of: address).contains(where: { state.vfs[$0]?.holder != nil }) {
          state.writes.removeLast()  // the write is retried when a holder lets go
          return .success(false)
        }
        for vf in Self.vfAddresses(state, of: address) { state.vfs[vf] = nil }
        state.pfs[address]!.numVFs = 0
      } else if pf.enableFailsSilently != true {
        Self.enable(&state, pf: address, count: count)
      }
      return .success(true)
    }
    let done = try outcome.get()
    if done { save() }
    return done
  }

  /// `echo 0|1 > sriov_drivers_autoprobe`.
  public func writeAutoprobe(pf address: PCIAddress, _ value: String) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("\(address)/sriov_drivers_autoprobe=\(value)")
      guard state.pfs[address] != nil else { throw .ENOENT }
      switch value {
      case "0": state.pfs[address]!.autoprobe = false
      case "1": state.pfs[address]!.autoprobe = true
      default: throw .EINVAL
      }
    }
  }

  /// `echo NAME > driver_override` of a function; an empty write clears it.
  public func writeDriverOverride(vf address: PCIAddress, _ value: String) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("\(address)/driver_override=\(value)")
      guard value.utf8.count < 4096 else { throw .EINVAL }
      if state.pfs[address] != nil {
        state.pfs[address]!.driverOverride = value.isEmpty ? nil : value
        return
      }
      guard state.vfs[address] != nil else { throw .ENOENT }
      state.vfs[address]!.driverOverride = value.isEmpty ? nil : value
    }
  }

  /// `echo BDF > driver/unbind`. ENOENT when no driver is bound (the file is absent); ENODEV
  /// when written to another driver's `unbind` than the bound one (`from`, checked in the same
  /// step as the unbinding); EBUSY for a VF a VM holds. A PF's VFs stay enabled.
  public func unbind(vf address: PCIAddress, from expected: String? = nil) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("\(address)/driver/unbind")
      if let pf = state.pfs[address] {
        guard let driver = pf.driver else { throw .ENOENT }
        if let expected, expected != driver { throw .ENODEV }
        state.pfs[address]!.driver = nil
        return
      }
      guard let vf = state.vfs[address], let driver = vf.driver else { throw .ENOENT }
      if let expected, expected != driver { throw .ENODEV }
      if vf.holder != nil { throw .EBUSY }
      state.vfs[address]!.driver = nil
    }
  }

  /// `echo BDF > /sys/bus/pci/drivers_probe`: binds the function to its override driver, or a
  /// VF to qdma-vf when there is none; nothing when already bound or the override is `none`.
  /// vfio-pci refuses a PF with SR-IOV enabled: the probe fails, the write succeeds.
  public func probe(vf address: PCIAddress) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("drivers_probe=\(address)")
      if let pf = state.pfs[address] {
        guard pf.driver == nil, let wanted = pf.driverOverride, wanted != "none",
          state.loadedDrivers.contains(wanted), !(wanted == "vfio-pci" && pf.numVFs > 0)
        else { return }
        state.pfs[address]!.driver = wanted
        return
      }
      guard let vf = state.vfs[address] else { throw .ENODEV }
      guard vf.driver == nil else { return }
      let wanted = vf.driverOverride ?? "qdma-vf"
      guard wanted != "none", state.loadedDrivers.contains(wanted) else { return }
      state.vfs[address]!.driver = wanted
    }
  }

  /// `echo N > qdma/qmax` of a PF. The QDMA soft IP has 2048 queue sets per card.
  public func writeQmax(pf address: PCIAddress, _ value: String) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("\(address)/qdma/qmax=\(value)")
      guard state.pfs[address] != nil else { throw .ENOENT }
      guard let qmax = Int(value), qmax >= 0 else { throw .EINVAL }
      let others = state.pfs.filter { $0.key.busID == address.busID && $0.key != address }
        .reduce(0) { $0 + $1.value.qmax }
      guard others + qmax <= Self.queueLimit else { throw .EINVAL }
      state.pfs[address]!.qmax = qmax
    }
  }

  // MARK: What VMs and modules do (test controls)

  /// A VM opens the VF's /dev/vfio/N. Only possible when bound to vfio-pci.
  /// (`requireVFIO: false`: a test's stand-in for any holder of the device.)
  public func hold(vf address: PCIAddress, by vm: String, requireVFIO: Bool = true) throws(KernelErrno) {
    try state.withLock { (state) throws(KernelErrno) in
      guard let vf = state.vfs[address] else { throw .ENODEV }
      guard vf.driver == "vfio-pci" || !requireVFIO else { throw .ENODEV }
      guard vf.holder == nil else { throw .EBUSY }
      state.vfs[address]!.holder = vm
    }
  }

  /// Who holds which VF of `pf` open.
  public func holders(of pf: PCIAddress) -> [(vf: PCIAddress, vm: String)] {
    state.withLock { state in
      Self.vfAddresses(state, of: pf).compactMap { vf in state.vfs[vf]?.holder.map { (vf, $0) } }
    }
  }

  /// The VM closes the VF; blocked writes of 0 go on.
  public func release(vf address: PCIAddress) {
    let waiting = state.withLock { state in
      state.vfs[address]?.holder = nil
      defer { state.blockedWrites = [] }
      return state.blockedWrites
    }
    for continuation in waiting { continuation.resume() }
    releasedSignal.lock()
    releasedSignal.broadcast()
    releasedSignal.unlock()
  }

  /// `modprobe -r` / `modprobe` of a driver.
  public func setDriverLoaded(_ driver: String, _ loaded: Bool) {
    state.withLock { state in
      if loaded {
        state.loadedDrivers.insert(driver)
      } else {
        state.loadedDrivers.remove(driver)
        for (address, pf) in state.pfs where pf.driver == driver { state.pfs[address]!.driver = nil }
        for (address, vf) in state.vfs where vf.driver == driver { state.vfs[address]!.driver = nil }
      }
    }
  }

  /// Binds or unbinds a PF's driver (`nil`: no driver).
  public func setPFDriver(_ pf: PCIAddress, _ driver: String?) {
    state.withLock { $0.pfs[pf]?.driver = driver }
  }

  // MARK: Kernel internals

  static func vfAddresses(_ state: State, of pf: PCIAddress) -> [PCIAddress] {
    guard let entry = state.pfs[pf] else { return [] }
    return (0..<entry.numVFs).compactMap {
      PCIAddress(domain: pf.domain, routingID: pf.routingID + entry.offset + entry.stride * $0)
    }
  }

  /// pci_enable_sriov: creates VFs 0..count-1, each in its own IOMMU group, probed by qdma-vf
  /// when autoprobe is on.
  private static func enable(_ state: inout State, pf address: PCIAddress, count: Int) {
    state.pfs[address]!.numVFs = count
    let autoprobe = state.pfs[address]!.autoprobe
    for (index, vf) in vfAddresses(state, of: address).enumerated() {
      let driver = autoprobe && state.loadedDrivers.contains("qdma-vf") ? "qdma-vf" : nil
      state.vfs[vf] = VF(pf: address, index: index, driver: driver, iommuGroup: state.iommu ? state.nextGroup : -1)
      if state.iommu { state.nextGroup += 1 }
    }
  }
}

/// The simulated node as the agent's platform: the production `LinuxPlatform` (discovery, VF
/// counts, vfio-pci binding, holders) over the node's sysfs, named `simulated`.
public struct SimulatedPlatform: NodePlatform {
  public let node: SimulatedNode
  public let linux: LinuxPlatform

  /// `blockReportDelay`: how long a blocked VF count write waits before it is reported.
  public init(node: SimulatedNode, blockReportDelay: Duration = .milliseconds(200)) {
    self.node = node
    linux = LinuxPlatform(
      sysfs: node, selectors: [.qdma], watchdog: .seconds(15), writeReportDelay: blockReportDelay, holders: node,
      name: "simulated")
  }

  public func discover() async throws(AgentError) -> DiscoveredNode { try await linux.discover() }

  public func prepareForPassthrough(vf: PCIAddress) async throws(AgentError) -> String {
    try await linux.prepareForPassthrough(vf: vf)
  }

  public func setVFCount(
    pf: PCIAddress, to count: Int, whileBlocked: @escaping @Sendable (String) async -> Void
  ) async throws(AgentError) {
    try await linux.setVFCount(pf: pf, to: count, whileBlocked: whileBlocked)
  }

  public func vfHolders(pf: PCIAddress) async -> [PCIAddress: String] { await linux.vfHolders(pf: pf) }

  public func capabilities() async -> PlatformCapabilities { await linux.capabilities() }

  public func bootID() async -> String? { await linux.bootID() }

  public func setQueueCount(pf: PCIAddress, to qmax: Int) async throws(AgentError) {
    try await linux.setQueueCount(pf: pf, to: qmax)
  }
}
