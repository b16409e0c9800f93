import FPGACore
import FPGALinux
import FPGATestSupport
import Foundation
import Testing
import FPGASimulator

/// The Linux platform against the kernel-faithful fake tree: discovery and every SR-IOV rule.
@Suite struct LinuxPlatformTests {
  static func qdmaCard() -> [FakeKernelSysfs.PF] {
    [
      .init("0000:3b:00.0", device: 0x903f, vfDevice: 0xa03f, totalVFs: 64, offset: 4),
      .init("0000:3b:00.1", device: 0x913f, vfDevice: 0xa13f, totalVFs: 60, offset: 67),
    ]
  }

  let pf0 = PCIAddress("0000:3b:00.0")!

  @Test func discoversPFsAndVFsFromTheTreeAlone() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    let platform = LinuxPlatform(sysfs: tree)
    try await platform.setVFCount(pf: pf0, to: 3)
    _ = try await platform.bindToVFIO(vf: PCIAddress("0000:3b:00.5")!)
    let node = try await platform.discover()
    #expect(node.pfs.map(\.function.address.description) == ["0000:3b:00.0", "0000:3b:00.1"])
    let pf = node.pfs[0]
    #expect(pf.function.vendorID == 0x10ee && pf.function.deviceID == 0x903f && pf.function.vfDeviceID == 0xa03f)
    #expect(pf.function.totalVFs == 64 && pf.function.numVFs == 3)
    #expect(pf.function.vfOffset == 4 && pf.function.vfStride == 1)
    #expect(pf.function.driver == "qdma-pf" && !pf.function.driversAutoprobe)
    #expect(pf.function.qmax == 0 && pf.function.numaNode == 0)
    #expect(pf.vfs.map(\.address.description) == ["0000:3b:00.4", "0000:3b:00.5", "0000:3b:00.6"])
    #expect(pf.vfs.map(\.index) == [0, 1, 2])
    #expect(pf.vfs.map(\.driver) == [nil, "vfio-pci", nil], "autoprobe was off: only the bound VF has a driver")
    #expect(pf.vfs[1].driverOverride == "vfio-pci" && pf.vfs[0].driverOverride == nil)
    #expect(pf.vfs[1].vfioDevice == "/dev/vfio/\(pf.vfs[1].iommuGroup)")
    #expect(Set(pf.vfs.map(\.iommuGroup)).count == 3)
    #expect(pf.vfs.allSatisfy { $0.pcieRoot == "pci0000:00" }, "the root complex, from the device's sysfs link")
    let capabilities = await platform.capabilities()
    #expect(capabilities.iommu && capabilities.vfioPCI && capabilities.qdmaDriver == "qdma-pf")
    #expect(capabilities.problems.isEmpty)
  }

  @Test func selectorsChooseWhatIsManaged() async throws {
    var other = FakeKernelSysfs.PF("0000:01:00.0", device: 0x0010, vfDevice: 0x0010, totalVFs: 4, offset: 1)
    other.vendor = 0x1b36
    other.driver = "nvme"
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard() + [other], drivers: ["qdma-pf", "qdma-vf", "vfio-pci", "nvme"])
    func managed(_ selectors: [PFSelector]) async throws -> [String] {
      try await LinuxPlatform(sysfs: tree, selectors: selectors).discover().pfs.map(\.function.address.description)
    }
    #expect(try await managed([.qdma]) == ["0000:3b:00.0", "0000:3b:00.1"])
    #expect(try await managed([PFSelector(vendors: [0x1b36], devices: [0x0010])]) == ["0000:01:00.0"])
    #expect(try await managed([PFSelector(drivers: ["nvme"])]) == ["0000:01:00.0"])
    #expect(try await managed([PFSelector(pciAddresses: [PCIAddress("0000:3b:00.1")!])]) == ["0000:3b:00.1"])
    #expect(try await managed([.any]).count == 3)
    // VFs are never taken for PFs.
    try await LinuxPlatform(sysfs: tree, selectors: [.any]).setVFCount(pf: pf0, to: 2)
    #expect(try await managed([.any]).count == 3)
  }

  @Test func enablingTurnsAutoprobeOffFirstAndGoesThroughZero() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    let platform = LinuxPlatform(sysfs: tree)
    try await platform.setVFCount(pf: pf0, to: 4)
    try await platform.setVFCount(pf: pf0, to: 8)
    try await platform.setVFCount(pf: pf0, to: 8)  // no-op
    try await platform.setVFCount(pf: pf0, to: 0)
    #expect(
      tree.writes == [
        "bus/pci/devices/0000:3b:00.0/sriov_drivers_autoprobe=0",
        "bus/pci/devices/0000:3b:00.0/sriov_numvfs=4",
        "bus/pci/devices/0000:3b:00.0/sriov_drivers_autoprobe=0",
        "bus/pci/devices/0000:3b:00.0/sriov_numvfs=0",
        "bus/pci/devices/0000:3b:00.0/sriov_numvfs=8",
        "bus/pci/devices/0000:3b:00.0/sriov_numvfs=0",
      ])
    #expect(try await platform.discover().pfs[0].vfs.isEmpty)
  }

  @Test func theFakeKernelAnswersLikeTheKernel() throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    let numvfs = SysfsPath.device(pf0, "sriov_numvfs")
    #expect(throws: SysfsError(operation: "write", path: "bus/pci/devices/0000:3b:00.0/sriov_numvfs", errno: 22)) {
      try tree.write(numvfs, "abc")
    }
    #expect(throws: SysfsError(operation: "write", path: "bus/pci/devices/0000:3b:00.0/sriov_numvfs", errno: 34)) {
      try tree.write(numvfs, "65")
    }
    try tree.write(numvfs, "2")
    #expect(throws: SysfsError(operation: "write", path: "bus/pci/devices/0000:3b:00.0/sriov_numvfs", errno: 16)) {
      try tree.write(numvfs, "3")
    }
    // Range is checked before busy, as in the kernel.
    #expect(throws: SysfsError(operation: "write", path: "bus/pci/devices/0000:3b:00.0/sriov_numvfs", errno: 34)) {
      try tree.write(numvfs, "65")
    }
    try tree.write(numvfs, "2")  // the current value: success
    try tree.unbindPFDriver("0000:3b:00.0")
    #expect(throws: SysfsError(operation: "write", path: "bus/pci/devices/0000:3b:00.0/sriov_numvfs", errno: 2)) {
      try tree.write(numvfs, "0")
    }
    #expect(tree.exists(.device(PCIAddress("0000:3b:00.5")!)), "VFs stay when the PF driver goes")
  }

  @Test func errnosBecomePreciseErrors() async throws {
    var noMailbox = Self.qdmaCard()[0]
    noMailbox.mailbox = false
    var silent = Self.qdmaCard()[1]
    silent.enableFailsSilently = true
    let tree = try FakeKernelSysfs(pfs: [noMailbox, silent])
    let platform = LinuxPlatform(sysfs: tree)
    await #expect(
      throws: AgentError(
        .failedPrecondition,
        "PF 0000:3b:00.0 cannot enable VFs: its bitstream has no mailbox, so SR-IOV is unavailable",
        cause: "sriov_numvfs write of 2 returned EPERM (errno 1)")
    ) {
      try await platform.setVFCount(pf: pf0, to: 2)
    }
    await #expect(
      throws: AgentError(
        .invalidArgument, "PF 0000:3b:00.0 supports at most 64 VFs (sriov_totalvfs); 65 asked",
        cause: "checked against sriov_totalvfs=64 before writing anything")
    ) {
      try await platform.setVFCount(pf: pf0, to: 65)
    }
    do {
      try await platform.setVFCount(pf: PCIAddress("0000:3b:00.1")!, to: 4)
      Issue.record("QDMA's silent failure must be caught by re-reading")
    } catch {
      #expect(error.message.hasPrefix("PF 0000:3b:00.1: the driver enabled 0 VFs instead of 4"))
    }
    try tree.unbindPFDriver("0000:3b:00.1")
    await #expect(throws: AgentError.self) { try await platform.setVFCount(pf: PCIAddress("0000:3b:00.1")!, to: 4) }
    #expect(await platform.capabilities().problems.isEmpty, "driverless PFs are the core's finding, from the inventory")
  }

  @Test func aWriteBlockedByAHeldVFTripsTheWatchdogAndFinishesWhenReleased() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    // Short enough to trip on the held write, long enough for a scan on a loaded machine.
    let platform = LinuxPlatform(sysfs: tree, watchdog: .seconds(2))
    // Enabled with the default watchdog: only the write a VM blocks is to trip the short one.
    try await LinuxPlatform(sysfs: tree).setVFCount(pf: pf0, to: 2)
    _ = try await platform.discover()
    tree.hold("0000:3b:00.5")
    do {
      try await platform.setVFCount(pf: pf0, to: 0)
      Issue.record("expected the watchdog to fire")
    } catch {
      #expect(error.code == .unavailable)
      #expect(
        error.message
          == "PF 0000:3b:00.0: the VF count write is still blocked in the kernel; a VF of it is still held by a VM")
    }
    #expect(platform.worker.isBusy("0000:3b:00.0"))
    await #expect(throws: AgentError.self) { try await platform.setVFCount(pf: pf0, to: 0) }
    // The agent still answers: discovery works while the write hangs, and gives the PF as last
    // seen (reading its sriov_numvfs would block: the kernel's show takes the device lock).
    #expect(try await platform.discover().pfs[0].vfs.count == 2)
    tree.release("0000:3b:00.5")
    while platform.worker.isBusy("0000:3b:00.0") { try await Task.sleep(for: .milliseconds(10)) }
    #expect(try await platform.discover().pfs[0].vfs.isEmpty)
  }

  @Test func bindingToVFIOVerifiesTheLinkAndTheDeviceNode() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    let platform = LinuxPlatform(sysfs: tree)
    try tree.write(.device(pf0, "sriov_drivers_autoprobe"), "1")
    try tree.write(.device(pf0, "sriov_numvfs"), "2")
    let vf = PCIAddress("0000:3b:00.4")!
    #expect(try tree.linkName(.device(vf, "driver")) == "qdma-vf")
    let node = try await platform.bindToVFIO(vf: vf)
    #expect(try tree.linkName(.device(vf, "driver")) == "vfio-pci")
    #expect(node.hasPrefix("/dev/vfio/"))
    #expect(
      tree.writes.suffix(3) == [
        "bus/pci/devices/0000:3b:00.4/driver_override=vfio-pci",
        "bus/pci/drivers/qdma-vf/unbind=0000:3b:00.4",
        "bus/pci/drivers_probe=0000:3b:00.4",
      ])
    try platform.unbind(vf: vf)
    #expect(try tree.linkName(.device(vf, "driver")) == nil)
    await #expect(throws: AgentError.self) { try await platform.bindToVFIO(vf: pf0) }

    let noVFIO = try FakeKernelSysfs(pfs: Self.qdmaCard(), drivers: ["qdma-pf", "qdma-vf"])
    try noVFIO.write(.device(pf0, "sriov_numvfs"), "1")
    await #expect(throws: AgentError(.failedPrecondition, "vfio-pci is not loaded: run `modprobe vfio-pci`")) {
      try await LinuxPlatform(sysfs: noVFIO).bindToVFIO(vf: vf)
    }
  }

  @Test func aVFInUseByAVMIsNeverUnbound() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    let platform = LinuxPlatform(sysfs: tree, holders: ProcVFIOHolders(procRoot: tree.procRoot, devRoot: tree.devRoot))
    try await platform.setVFCount(pf: pf0, to: 1)
    let vf = PCIAddress("0000:3b:00.4")!
    let node = try await platform.bindToVFIO(vf: vf)
    tree.hold("0000:3b:00.4")
    let group = node.split(separator: "/").last!
    #expect(
      throws: AgentError(
        .failedPrecondition,
        "VF 0000:3b:00.4 is in use: /dev/vfio/\(group) is held open by qemu-system-x86 (pid \(4242 + Int(group)!)); detach it from its VM first"
      )
    ) {
      try platform.unbind(vf: vf)
    }
    #expect(try tree.linkName(.device(vf, "driver")) == "vfio-pci")
    // Binding it again is a no-op: nothing is written.
    let before = tree.writes.count
    _ = try await platform.bindToVFIO(vf: vf)
    #expect(tree.writes.count == before)
    tree.release("0000:3b:00.4")
    try platform.unbind(vf: vf)
    #expect(try tree.linkName(.device(vf, "driver")) == nil)
  }

  @Test func overrideNoneOptsOutOfBinding() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    try tree.write(.device(pf0, "sriov_numvfs"), "1")
    let vf = PCIAddress("0000:3b:00.4")!
    try tree.write(.driver("qdma-vf", "unbind"), vf.description)
    try tree.write(.device(vf, "driver_override"), "none")
    try tree.write(.driversProbe, vf.description)
    #expect(try tree.linkName(.device(vf, "driver")) == nil)
    #expect(try tree.read(.device(vf, "driver_override")) == "none")
    try tree.write(.device(vf, "driver_override"), "")
    #expect(try tree.read(.device(vf, "driver_override")) == "(null)", "an empty write clears it")
  }

  @Test func drivers_probeSucceedsEvenWhenTheProbeFails() throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    try tree.write(.device(pf0, "sriov_numvfs"), "2")
    try tree.write(.driver("qdma-pf", "unbind"), pf0.description)
    try tree.write(.device(pf0, "driver_override"), "vfio-pci")
    try tree.write(.driversProbe, pf0.description)  // no error...
    #expect(try tree.linkName(.device(pf0, "driver")) == nil, "...and no driver: only the link tells")
  }

  @Test func qmaxIsSetOnQDMAFunctionsOnly() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard())
    let platform = LinuxPlatform(sysfs: tree)
    try platform.setQmax(pf: pf0, to: 1024)
    #expect(try await platform.discover().pfs[0].function.qmax == 1024)
    try tree.unbindPFDriver("0000:3b:00.0")
    #expect(
      throws: AgentError(.failedPrecondition, "0000:3b:00.0 has no qdma/qmax: it is not bound to the QDMA driver")
    ) {
      try platform.setQmax(pf: pf0, to: 8)
    }
  }

  @Test func startupChecksSayWhatIsMissing() async throws {
    let tree = try FakeKernelSysfs(pfs: Self.qdmaCard(), drivers: ["qdma-pf"], iommu: false)
    let capabilities = await LinuxPlatform(sysfs: tree).capabilities()
    #expect(!capabilities.iommu && !capabilities.vfioPCI)
    #expect(capabilities.problems.count == 2)
    #expect(capabilities.problems[0].hasPrefix("no IOMMU groups in sysfs"))
    #expect(capabilities.problems[1] == "vfio-pci is not loaded (no bus/pci/drivers/vfio-pci): run `modprobe vfio-pci`")
  }
}

@Suite struct LinuxSysfsConfinementTests {
  @Test func pathsNeverLeaveTheRoot() throws {
    let tree = try FakeKernelSysfs(pfs: [.init("0000:3b:00.0")])
    // A link inside the tree that points outside it.
    try FileManager.default.createSymbolicLink(
      atPath: tree.sysRoot + "/bus/pci/devices/0000:66:00.0", withDestinationPath: "/etc")
    let sysfs = try LinuxSysfs(root: tree.sysRoot, devRoot: tree.devRoot)
    #expect(throws: SysfsError.self) { try sysfs.read(.device(PCIAddress("0000:66:00.0")!, "passwd")) }
    do {
      _ = try sysfs.read(.device(PCIAddress("0000:66:00.0")!, "passwd"))
    } catch {
      #expect(error.errno == 18, "EXDEV: resolves outside the sysfs root")
    }
    #expect(!sysfs.exists(.device(PCIAddress("0000:66:00.0")!)))
    #expect(throws: SysfsError.self) { try sysfs.read(SysfsPath(["bus", "..", "..", "etc", "passwd"])) }
    #expect(throws: SysfsError.self) { try sysfs.write(SysfsPath(["bus/pci", "x"]), "1") }
    #expect(!sysfs.deviceNodeExists("../etc/passwd"))
  }
}

/// Discovery on this machine's real /sys, read-only.
@Suite struct RealSysfsTests {
  @Test func theDefaultSelectorsFindNoQDMACardHereWithoutError() async throws {
    let platform = LinuxPlatform(sysfs: try LinuxSysfs())
    let node = try await platform.discover()
    let hasQDMA = try FileManager.default.contentsOfDirectory(atPath: "/sys/bus/pci/devices").contains {
      (try? String(contentsOfFile: "/sys/bus/pci/devices/\($0)/vendor", encoding: .utf8))?.hasPrefix("0x10ee") == true
    }
    if !hasQDMA { #expect(node.pfs.isEmpty) }
    _ = await platform.capabilities()
  }

  @Test func aPermissiveSelectorListsTheRealPCIDevices() async throws {
    let platform = LinuxPlatform(sysfs: try LinuxSysfs(), selectors: [.any])
    let found = try await platform.discover().pfs.map(\.function.address.description)
    let entries = try FileManager.default.contentsOfDirectory(atPath: "/sys/bus/pci/devices")
      .filter { !FileManager.default.fileExists(atPath: "/sys/bus/pci/devices/\($0)/physfn") }.sorted()
    #expect(found == entries)
    #expect(!found.isEmpty, "a PCI machine has PCI devices")
  }
}

@Suite struct OddDeviceTests {
  /// Three PFs: a healthy one, one without `sriov_vf_device`, and one whose VF's IOMMU group
  /// link points outside the sysfs root. The node is served; each odd device is named.
  @Test func oneOddDeviceCostsOnlyThatDevice() async throws {
    let tree = try FakeKernelSysfs(pfs: [
      .init("0000:3b:00.0", totalVFs: 8, offset: 4),
      .init("0000:3b:00.1", device: 0x913f, vfDevice: 0xa13f, totalVFs: 8, offset: 67),
      .init("0000:3b:00.2", device: 0x923f, vfDevice: 0xa23f, totalVFs: 8, offset: 130),
    ])
    let platform = LinuxPlatform(sysfs: tree)
    for (pf, count) in [("0000:3b:00.0", 2), ("0000:3b:00.1", 2), ("0000:3b:00.2", 2)] {
      try await platform.setVFCount(pf: PCIAddress(pf)!, to: count)
    }
    let devices = tree.sysRoot + "/devices/pci0000:00/"
    try FileManager.default.removeItem(atPath: devices + "0000:3b:00.1/sriov_vf_device")
    let oddVF = try #require(try await platform.discover().pfs[2].vfs.first?.address)
    try FileManager.default.removeItem(atPath: devices + "\(oddVF)/iommu_group")
    try FileManager.default.createSymbolicLink(atPath: devices + "\(oddVF)/iommu_group", withDestinationPath: "/tmp")

    let engine = NodeEngine(nodeID: "n", platform: platform, clock: FixedClock())
    try await engine.rescan()
    let status = await engine.status()
    #expect(status.health == .degraded)
    #expect(status.capabilities.problems.contains { $0.contains("0000:3b:00.1") && $0.contains("sriov_vf_device") })
    #expect(status.capabilities.problems.contains { $0.contains("VF \(oddVF)") && $0.contains("not allocated") })
    // Every healthy VF is handed out; the odd one never is.
    var taken: [PCIAddress] = []
    while let result = try? await engine.allocate(AllocateRequest(owner: "o")) { taken.append(result.allocation.vf) }
    #expect(taken.count == 5)
    #expect(!taken.contains(oddVF))
  }
}

final class FixedClock: WallClock {
  func now() -> WallTime { WallTime(seconds: 1_800_000_000) }
}

/// The worker's watchdog never answers for a call that returned: its cancelled sleep used to race
/// the call's own answer, and an instant call (a scan of the simulated kernel) could be reported
/// as blocked for 15 s.
@Suite struct BlockingWorkerTests {
  @Test func aCallThatReturnsIsNeverReportedBlocked() async {
    let worker = BlockingWorker()
    var blocked = 0
    for index in 0..<10_000 {
      if case .stillBlocked = await worker.run(key: "k", watchdog: .seconds(60), { index }) { blocked += 1 }
    }
    #expect(blocked == 0)
    #expect(!worker.isBusy("k"))
  }
}

@Suite struct QDMADriverProblemTests {
  /// With the default (QDMA) selectors and no QDMA PF driver loaded, the startup checks say so.
  @Test func aMissingQDMADriverIsAProblem() async throws {
    let tree = try FakeKernelSysfs(pfs: LinuxPlatformTests.qdmaCard(), drivers: ["qdma-vf", "vfio-pci"])
    let problems = await LinuxPlatform(sysfs: tree).capabilities().problems
    #expect(problems.contains { $0.hasPrefix("no QDMA PF driver is loaded") }, "\(problems)")
    #expect(await LinuxPlatform(sysfs: tree, selectors: [.any]).capabilities().problems.isEmpty)
  }
}
