public import FPGACore
import Synchronization

/// The agent's platform on a Linux host: discovery and operations on sysfs.
public struct LinuxPlatform: NodePlatform {
  public let sysfs: any Sysfs
  public let selectors: [PFSelector]
  public let watchdog: Duration
  public let worker = BlockingWorker()
  public let holders: any VFIOHolderFinding
  /// How long a VF count write may block before it is reported (default: `watchdog`).
  public let writeReportDelay: Duration
  /// The platform's name in its capabilities: `linux`, or `simulated` over the simulated kernel.
  public let name: String
  /// The last scan of each PF, returned for a PF whose VF count write is in flight.
  private let lastScan = LastScan()
  /// QDMA PF driver names, newest first.
  static let qdmaDrivers = ["qdma-pf", "qdma"]

  public init(
    sysfs: any Sysfs, selectors: [PFSelector] = [.qdma], watchdog: Duration = .seconds(15),
    writeReportDelay: Duration? = nil, holders: any VFIOHolderFinding = ProcVFIOHolders(), name: String = "linux"
  ) {
    self.sysfs = sysfs
    self.holders = holders
    self.selectors = selectors
    self.watchdog = watchdog
    self.writeReportDelay = writeReportDelay ?? watchdog
    self.name = name
  }

  /// Scans sysfs on a thread of its own (a read the kernel holds cannot freeze the agent's
  /// request threads). While an earlier scan is still blocked past the watchdog, the last one is
  /// returned with a problem saying so. Scans may run at once (a uevent's and a
  /// reconfiguration's verify): each reads sysfs itself, and the cache keeps the newest.
  public func discover() async throws(AgentError) -> DiscoveredNode {
    let busy = Set(worker.busyKeys.compactMap { PCIAddress($0) })
    let cached = lastScan.pfs.withLock { $0 }
    let sequence = lastScan.started.add(1, ordering: .relaxed).newValue
    if lastScan.blocked.load(ordering: .relaxed) > 0 {
      return DiscoveredNode(
        pfs: cached.values.sorted { $0.function.address < $1.function.address },
        problems: ["a sysfs scan has been blocked in the kernel for over \(watchdog): the last scan is shown"])
    }
    let discovery = LinuxDiscovery(sysfs: sysfs, selectors: selectors)
    let outcome = await worker.run(key: Self.scanKey, watchdog: watchdog) { () -> Result<DiscoveredNode, SysfsError> in
      do throws(SysfsError) {
        return .success(try discovery.discover(skipping: busy, cached: cached))
      } catch {
        return .failure(error)
      }
    }
    guard case .finished(let result) = outcome else {
      if case .stillBlocked(let completion) = outcome {
        lastScan.blocked.add(1, ordering: .relaxed)
        let state = lastScan
        Task.detached {
          _ = await completion.value
          state.blocked.subtract(1, ordering: .relaxed)
        }
      }
      throw AgentError(
        .unavailable, "reading sysfs has been blocked in the kernel for \(watchdog); the scan goes on in its thread")
    }
    switch result {
    case .success(let node):
      lastScan.pfs.withLock { cache in
        // A scan that started before the newest one applied must not bring its older view back.
        guard sequence > lastScan.applied.load(ordering: .relaxed) else { return }
        lastScan.applied.store(sequence, ordering: .relaxed)
        for pf in node.pfs where !busy.contains(pf.function.address) { cache[pf.function.address] = pf }
      }
      return node
    case .failure(let error):
      throw AgentError(.unavailable, "cannot read the PCI devices from sysfs", cause: error.description)
    }
  }

  /// The worker key of a scan (never a PCI address).
  static let scanKey = "scan"

  public func bootID() async -> String? { sysfs.bootID() }

  public func setQueueCount(pf: PCIAddress, to qmax: Int) async throws(AgentError) {
    try setQmax(pf: pf, to: qmax)
  }

  public func capabilities() async -> PlatformCapabilities {
    let groups = (try? sysfs.list(.iommuGroups)) ?? []
    let vfio = sysfs.exists(.driver("vfio-pci"))
    let qdma = Self.qdmaDrivers.first { sysfs.exists(.driver($0)) }
    var problems: [String] = []
    if groups.isEmpty {
      problems.append(
        "no IOMMU groups in sysfs (kernel/iommu_groups is empty): VFIO passthrough is impossible; "
          + "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on")
    }
    if !vfio {
      problems.append("vfio-pci is not loaded (no bus/pci/drivers/vfio-pci): run `modprobe vfio-pci`")
    }
    if qdma == nil, selectors == [.qdma] {
      problems.append(
        "no QDMA PF driver is loaded (no bus/pci/drivers/qdma-pf): VF counts cannot change; run `modprobe qdma-pf`")
    }
    return PlatformCapabilities(
      platform: name, iommu: !groups.isEmpty, vfioPCI: vfio, qdmaDriver: qdma, vfioPause: false,
      problems: problems)
  }

  // MARK: Operations

  public func prepareForPassthrough(vf: PCIAddress) async throws(AgentError) -> String {
    try await bindToVFIO(vf: vf)
  }

  /// Sets a PF's VF count the way the kernel requires: autoprobe off before enabling, through 0
  /// when a different non-zero count is enabled, each write in a worker under the watchdog, and
  /// the count re-read afterwards (QDMA may report success with fewer VFs).
  public func setVFCount(pf: PCIAddress, to count: Int) async throws(AgentError) {
    try await setVFCount(pf: pf, to: count, whileBlocked: nil)
  }

  public func setVFCount(
    pf: PCIAddress, to count: Int, whileBlocked: @escaping @Sendable (String) async -> Void
  ) async throws(AgentError) {
    try await setVFCount(pf: pf, to: count, whileBlocked: Optional(whileBlocked))
  }

  /// Without `whileBlocked`, a write still blocked when the watchdog fires fails with ETIMEDOUT
  /// (it goes on in the kernel); with it, the holders are reported and the write awaited.
  private func setVFCount(
    pf: PCIAddress, to count: Int, whileBlocked: (@Sendable (String) async -> Void)?
  ) async throws(AgentError) {
    let key = pf.description
    if worker.isBusy(key) {
      throw AgentError(
        .failedPrecondition,
        "PF \(pf): an earlier VF count write is still blocked in the kernel (a VM still holds one of its VFs)")
    }
    let total = try readInt(.device(pf, "sriov_totalvfs"), pf: pf, what: "sriov_totalvfs (is it an SR-IOV PF?)")
    let current = try readInt(.device(pf, "sriov_numvfs"), pf: pf, what: "sriov_numvfs")
    guard count != current else { return }
    guard (0...total).contains(count) else {
      var error = SRIOVErrors.numVFsWrite(.ERANGE, pf: pf, requested: count, current: current, total: total)
      error.cause = "checked against sriov_totalvfs=\(total) before writing anything"
      throw error
    }
    if count > 0 {
      try writeAttribute(.device(pf, "sriov_drivers_autoprobe"), "0", pf: pf)
    }
    // The VFs and their groups, read now: while a write of 0 is blocked the kernel has already
    // removed the virtfn links, yet the VFs are still held.
    let known = LinuxDiscovery(sysfs: sysfs, selectors: selectors).vfGroups(of: pf)
    if current != 0 {
      try await writeNumVFs(pf: pf, value: 0, current: current, total: total, known: known, whileBlocked: whileBlocked)
    }
    if count > 0 {
      try await writeNumVFs(pf: pf, value: count, current: 0, total: total, known: [], whileBlocked: whileBlocked)
    }
    let after = try readInt(.device(pf, "sriov_numvfs"), pf: pf, what: "sriov_numvfs")
    guard after == count else {
      throw AgentError(
        .internal,
        "PF \(pf): the driver enabled \(after) VFs instead of \(count) (the kernel log says why; QDMA reports success when pci_enable_sriov fails)"
      )
    }
  }

  private func writeNumVFs(
    pf: PCIAddress, value: Int, current: Int, total: Int, known: [(vf: PCIAddress, group: Int)],
    whileBlocked: (@Sendable (String) async -> Void)?
  ) async throws(AgentError) {
    let sysfs = self.sysfs
    let outcome = await worker.run(key: pf.description, watchdog: writeReportDelay) { () -> SysfsError? in
      do throws(SysfsError) {
        try sysfs.write(.device(pf, "sriov_numvfs"), String(value))
        return nil
      } catch {
        return error
      }
    }
    let result: SysfsError?
    switch outcome {
    case .finished(let error): result = error
    case .stillBlocked(let completion):
      guard let whileBlocked else {
        throw SRIOVErrors.numVFsWrite(.ETIMEDOUT, pf: pf, requested: value, current: current, total: total)
      }
      await whileBlocked(
        "the kernel blocks the write of \(value) to sriov_numvfs of \(pf) until its VFs are released: "
          + holdersDescription(known))
      result = await completion.value
    }
    if let result {
      throw SRIOVErrors.numVFsWrite(
        result.kernelErrno ?? .EIO, pf: pf, requested: value, current: current, total: total)
    }
  }

  /// Which processes hold which of `vfs`, e.g. "VF 0000:00:03.1 held by qemu (pid 812)".
  func holdersDescription(_ vfs: [(vf: PCIAddress, group: Int)]) -> String {
    let held = heldVFs(vfs).sorted { $0.key < $1.key }.map { "VF \($0.key) held by \($0.value)" }
    return held.isEmpty ? "no holder found in /proc (the write waits in the driver)" : held.joined(separator: "; ")
  }

  public func vfHolders(pf: PCIAddress) async -> [PCIAddress: String] {
    heldVFs(LinuxDiscovery(sysfs: sysfs, selectors: selectors).vfGroups(of: pf))
  }

  /// Never reads a lock-taking attribute: it runs while a write may hold the PF's lock.
  private func heldVFs(_ vfs: [(vf: PCIAddress, group: Int)]) -> [PCIAddress: String] {
    var held: [PCIAddress: String] = [:]
    for (vf, group) in vfs {
      let users = holders.holders(ofGroup: group)
      if !users.isEmpty { held[vf] = users.joined(separator: ", ") }
    }
    return held
  }

  /// Binds a VF to vfio-pci: driver_override, unbind from its current driver, drivers_probe,
  /// verify the driver link (drivers_probe succeeds even when the probe fails), wait for
  /// `/dev/vfio/N`. Returns the device node.
  @discardableResult
  public func bindToVFIO(vf: PCIAddress, clock: any Clock<Duration> = ContinuousClock()) async throws(AgentError)
    -> String
  {
    guard sysfs.exists(.device(vf, "physfn")) else {
      throw AgentError(.failedPrecondition, "\(vf) is not a VF (it has no physfn link); only VFs are bound to vfio-pci")
    }
    guard sysfs.exists(.driver("vfio-pci")) else {
      throw AgentError(.failedPrecondition, "vfio-pci is not loaded: run `modprobe vfio-pci`")
    }
    let current = try link(.device(vf, "driver"), vf)
    if current != "vfio-pci" {
      try writeAttribute(.device(vf, "driver_override"), "vfio-pci", pf: vf)
      if let current {
        try writeAttribute(.driver(current, "unbind"), vf.description, pf: vf)
      }
      try writeAttribute(.driversProbe, vf.description, pf: vf)
      let bound = try link(.device(vf, "driver"), vf)
      guard bound == "vfio-pci" else {
        throw AgentError(
          .failedPrecondition,
          "VF \(vf) did not bind to vfio-pci (driver now: \(bound ?? "none")): vfio-pci refused it; its IOMMU group may not be viable",
          cause: "driver link after drivers_probe")
      }
    }
    guard let group = try link(.device(vf, "iommu_group"), vf).flatMap({ Int($0) }) else {
      throw AgentError(.failedPrecondition, "VF \(vf) has no IOMMU group: the host has no IOMMU enabled")
    }
    for _ in 0..<100 {
      if sysfs.deviceNodeExists("vfio/\(group)") { return "/dev/vfio/\(group)" }
      try? await clock.sleep(for: .milliseconds(20))
    }
    throw AgentError(.unavailable, "VF \(vf) is bound to vfio-pci but /dev/vfio/\(group) did not appear within 2 s")
  }

  /// Unbinds a VF from its driver and clears driver_override; refused while a process (a VMM)
  /// holds its VFIO group open.
  public func unbind(vf: PCIAddress) throws(AgentError) {
    try refuseIfHeld(vf)
    if let current = try link(.device(vf, "driver"), vf) {
      try writeAttribute(.driver(current, "unbind"), vf.description, pf: vf)
    }
    try writeAttribute(.device(vf, "driver_override"), "\n", pf: vf)
  }

  /// Sets a QDMA function's queue count (`qdma/qmax`).
  public func setQmax(pf: PCIAddress, to qmax: Int) throws(AgentError) {
    guard sysfs.exists(.device(pf, "qdma", "qmax")) else {
      throw AgentError(.failedPrecondition, "\(pf) has no qdma/qmax: it is not bound to the QDMA driver")
    }
    try writeAttribute(.device(pf, "qdma", "qmax"), String(qmax), pf: pf)
  }

  /// Throws FAILED_PRECONDITION naming the holders when a process has the VF's group open.
  public func refuseIfHeld(_ vf: PCIAddress) throws(AgentError) {
    guard let group = try link(.device(vf, "iommu_group"), vf).flatMap({ Int($0) }),
      try link(.device(vf, "driver"), vf) == "vfio-pci"
    else { return }
    let users = holders.holders(ofGroup: group)
    guard users.isEmpty else {
      throw AgentError(
        .failedPrecondition,
        "VF \(vf) is in use: /dev/vfio/\(group) is held open by \(users.joined(separator: ", ")); detach it from its VM first"
      )
    }
  }

  // MARK: Helpers

  private func readInt(_ path: SysfsPath, pf: PCIAddress, what: String) throws(AgentError) -> Int {
    let text: String
    do {
      text = try sysfs.read(path)
    } catch {
      if error.errno == 2 { throw AgentError(.notFound, "\(pf) has no \(what)", cause: error.description) }
      throw AgentError(.unavailable, "cannot read \(what) of \(pf)", cause: error.description)
    }
    guard let value = Int(text) else { throw AgentError(.internal, "\(pf): \(what) is \(quoted(text)), not a number") }
    return value
  }

  private func link(_ path: SysfsPath, _ device: PCIAddress) throws(AgentError) -> String? {
    do {
      return try sysfs.linkName(path)
    } catch {
      throw AgentError(.unavailable, "cannot read \(path.components.last ?? "") of \(device)", cause: error.description)
    }
  }

  private func writeAttribute(_ path: SysfsPath, _ value: String, pf: PCIAddress) throws(AgentError) {
    do {
      try sysfs.write(path, value)
    } catch {
      throw AgentError(
        error.errno == 2 ? .notFound : .failedPrecondition, "\(pf): writing \(path.components.last ?? "") failed",
        cause: error.description)
    }
  }
}

/// The last scan of each PF (shared by copies of the platform).
final class LastScan: Sendable {
  let pfs = Mutex<[PCIAddress: DiscoveredPF]>([:])
  /// Scans started, and the sequence number of the newest scan applied to `pfs`.
  let started = Atomic<UInt64>(0)
  let applied = Atomic<UInt64>(0)
  /// Scans still blocked in the kernel past the watchdog.
  let blocked = Atomic<Int>(0)
}
