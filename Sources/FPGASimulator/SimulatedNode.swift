import FPGACore
import Synchronization

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
    /// Writes of 0 waiting for held VFs to be released.
    var blockedWrites: [CheckedContinuation<Void, Never>] = []
    var writes: [String] = []
  }

  static let vendorID: UInt16 = 0x10ee
  static let queueLimit = 2048

  private let state: Mutex<State>
  /// Called with the hardware's state after every accepted write (to keep it in a file, so the
  /// simulated cards outlive the agent's process like real ones).
  private let onChange: (@Sendable (Hardware) -> Void)?

  /// What the simulated cards are now: kept across agent restarts with `simulator.state_file`.
  public struct Hardware: Sendable, Codable, Hashable {
    var pfs: [PCIAddress: PF]
    var vfs: [PCIAddress: VF]
    var nextGroup: Int
    var loadedDrivers: Set<String>
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
      }
    }
    save()
  }

  public var hardware: Hardware {
    state.withLock { Hardware(pfs: $0.pfs, vfs: $0.vfs, nextGroup: $0.nextGroup, loadedDrivers: $0.loadedDrivers) }
  }

  private func save() { onChange?(hardware) }

  public convenience init(config: SimulatorConfig = .default) {
    self.init(config: config, onChange: nil)
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
          totalVFs: total, offset: offset, mailbox: card.mailbox, numaNode: card.numaNode)
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
    self.state = Mutex(state)
  }

  // MARK: Reading (what sysfs shows)

  /// Every PF with its VFs, as a platform scan sees them.
  public func scan() -> DiscoveredNode {
    state.withLock { state in
      let pfs = state.pfs.keys.sorted().map { address in
        let pf = state.pfs[address]!
        let function = PhysicalFunction(
          address: address, vendorID: Self.vendorID, deviceID: pf.deviceID, vfDeviceID: pf.vfDeviceID,
          totalVFs: pf.totalVFs, numVFs: pf.numVFs, vfOffset: pf.offset, vfStride: pf.stride,
          driversAutoprobe: pf.autoprobe, driver: pf.driver, numaNode: pf.numaNode, qmax: pf.qmax)
        let vfs = Self.vfAddresses(state, of: address).map { vfAddress in
          let vf = state.vfs[vfAddress]!
          return VirtualFunction(
            address: vfAddress, pfAddress: address, index: vf.index, vendorID: Self.vendorID,
            deviceID: pf.vfDeviceID, iommuGroup: vf.iommuGroup, numaNode: pf.numaNode,
            driver: vf.driver, driverOverride: vf.driverOverride,
            vfioDevice: vf.driver == "vfio-pci" ? "/dev/vfio/\(vf.iommuGroup)" : nil)
        }
        return DiscoveredPF(function: function, vfs: vfs)
      }
      return DiscoveredNode(pfs: pfs)
    }
  }

  /// The drivers currently loaded.
  public var loadedDrivers: Set<String> { state.withLock { $0.loadedDrivers } }

  /// Every write made, as `path=value` (oldest first), for tests.
  public var writeLog: [String] { state.withLock { $0.writes } }

  // MARK: Writing (what sysfs accepts)

  /// `echo VALUE > /sys/bus/pci/devices/PF/sriov_numvfs`. A write of 0 blocks, like vfio-pci's
  /// remove path, while a VF of the PF is held open by a VM.
  public func writeNumVFs(pf address: PCIAddress, _ value: String) async throws(KernelErrno) {
    while true {
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
        } else {
          Self.enable(&state, pf: address, count: count)
        }
        return .success(true)
      }
      switch outcome {
      case .failure(let errno): throw errno
      case .success(true):
        save()
        return
      case .success(false):
        await withCheckedContinuation { continuation in
          state.withLock { $0.blockedWrites.append(continuation) }
        }
      }
    }
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

  /// `echo NAME > driver_override` of a VF; an empty write clears it.
  public func writeDriverOverride(vf address: PCIAddress, _ value: String) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("\(address)/driver_override=\(value)")
      guard state.vfs[address] != nil else { throw .ENOENT }
      guard value.utf8.count < 4096 else { throw .EINVAL }
      state.vfs[address]!.driverOverride = value.isEmpty ? nil : value
    }
  }

  /// `echo BDF > driver/unbind` of a VF. ENOENT when no driver is bound (the file is absent).
  public func unbind(vf address: PCIAddress) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("\(address)/driver/unbind")
      guard let vf = state.vfs[address], vf.driver != nil else { throw .ENOENT }
      if vf.holder != nil { throw .EBUSY }
      state.vfs[address]!.driver = nil
    }
  }

  /// `echo BDF > /sys/bus/pci/drivers_probe`: binds the VF to its override driver, or to
  /// qdma-vf when there is none; nothing when already bound or the override is `none`.
  public func probe(vf address: PCIAddress) throws(KernelErrno) {
    defer { save() }
    try state.withLock { (state) throws(KernelErrno) in
      state.writes.append("drivers_probe=\(address)")
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
  public func hold(vf address: PCIAddress, by vm: String) throws(KernelErrno) {
    try state.withLock { (state) throws(KernelErrno) in
      guard let vf = state.vfs[address] else { throw .ENODEV }
      guard vf.driver == "vfio-pci" else { throw .ENODEV }
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

  private static func vfAddresses(_ state: State, of pf: PCIAddress) -> [PCIAddress] {
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
      state.vfs[vf] = VF(pf: address, index: index, driver: driver, iommuGroup: state.nextGroup)
      state.nextGroup += 1
    }
  }
}

/// The simulated node as the agent's platform.
public struct SimulatedPlatform: NodePlatform {
  public let node: SimulatedNode
  /// How long a blocked VF count write waits before it is reported.
  public var blockReportDelay: Duration

  public init(node: SimulatedNode, blockReportDelay: Duration = .milliseconds(200)) {
    self.node = node
    self.blockReportDelay = blockReportDelay
  }

  public func discover() async throws(AgentError) -> DiscoveredNode { node.scan() }

  /// The same sequence as on Linux: driver_override, unbind, drivers_probe, verify.
  public func prepareForPassthrough(vf: PCIAddress) async throws(AgentError) -> String {
    guard let found = node.scan().pfs.flatMap(\.vfs).first(where: { $0.address == vf }) else {
      throw AgentError(.notFound, "VF \(vf) does not exist")
    }
    if found.driver != "vfio-pci" {
      do {
        try node.writeDriverOverride(vf: vf, "vfio-pci")
        if found.driver != nil { try node.unbind(vf: vf) }
        try node.probe(vf: vf)
      } catch {
        throw AgentError(.failedPrecondition, "VF \(vf) could not be bound to vfio-pci", cause: error.description)
      }
    }
    guard let bound = node.scan().pfs.flatMap(\.vfs).first(where: { $0.address == vf }), bound.driver == "vfio-pci",
      let device = bound.vfioDevice
    else {
      throw AgentError(.failedPrecondition, "VF \(vf) did not bind to vfio-pci: is vfio-pci loaded?")
    }
    return device
  }

  /// Autoprobe off, through 0, re-read: the Linux platform's sequence. A write the simulated
  /// kernel blocks is reported after `blockReportDelay`, then awaited.
  public func setVFCount(
    pf: PCIAddress, to count: Int, whileBlocked: @escaping @Sendable (String) async -> Void
  ) async throws(AgentError) {
    guard let found = node.scan().pfs.first(where: { $0.function.address == pf })?.function else {
      throw AgentError(.notFound, "PF \(pf) does not exist")
    }
    guard count != found.numVFs else { return }
    guard (0...found.totalVFs).contains(count) else {
      throw SRIOVErrors.numVFsWrite(.ERANGE, pf: pf, requested: count, current: found.numVFs, total: found.totalVFs)
    }
    do throws(KernelErrno) {
      if count > 0 { try node.writeAutoprobe(pf: pf, "0") }
    } catch {
      throw SRIOVErrors.numVFsWrite(error, pf: pf, requested: count, current: found.numVFs, total: found.totalVFs)
    }
    if found.numVFs != 0 { try await write(pf: pf, 0, current: found.numVFs, total: found.totalVFs, whileBlocked) }
    if count > 0 { try await write(pf: pf, count, current: 0, total: found.totalVFs, whileBlocked) }
    let after = node.scan().pfs.first { $0.function.address == pf }?.function.numVFs ?? 0
    guard after == count else {
      throw AgentError(.internal, "PF \(pf): the driver enabled \(after) VFs instead of \(count)")
    }
  }

  private func write(
    pf: PCIAddress, _ value: Int, current: Int, total: Int, _ whileBlocked: @escaping @Sendable (String) async -> Void
  ) async throws(AgentError) {
    let node = self.node
    let write = Task { () -> KernelErrno? in
      do throws(KernelErrno) {
        try await node.writeNumVFs(pf: pf, String(value))
        return nil
      } catch {
        return error
      }
    }
    let reporter = Task {
      try await Task.sleep(for: blockReportDelay)
      let held = node.holders(of: pf).map { "VF \($0.vf) held by VM \($0.vm)" }
      await whileBlocked(
        "the kernel blocks the write of \(value) to sriov_numvfs of \(pf) until its VFs are released: "
          + held.joined(separator: "; "))
    }
    let errno = await write.value
    reporter.cancel()
    if let errno {
      throw SRIOVErrors.numVFsWrite(errno, pf: pf, requested: value, current: current, total: total)
    }
  }

  public func vfHolders(pf: PCIAddress) async -> [PCIAddress: String] {
    Dictionary(node.holders(of: pf).map { ($0.vf, "VM \($0.vm)") }, uniquingKeysWith: { a, _ in a })
  }

  public func capabilities() async -> PlatformCapabilities {
    let drivers = node.loadedDrivers
    var problems: [String] = []
    if !drivers.contains("vfio-pci") {
      problems.append("vfio-pci is not loaded: VFs cannot be passed to VMs (modprobe vfio-pci)")
    }
    if !drivers.contains("qdma-pf") {
      problems.append("qdma-pf is not loaded: VF counts cannot change (modprobe qdma-pf)")
    }
    return PlatformCapabilities(
      platform: "simulated", iommu: true, vfioPCI: drivers.contains("vfio-pci"),
      qdmaDriver: drivers.contains("qdma-pf") ? "qdma-pf" : nil, vfioPause: false, problems: problems)
  }
}
