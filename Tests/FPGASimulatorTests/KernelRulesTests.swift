import FPGACore
import FPGASimulator
import Testing

/// The simulator obeys the kernel's SR-IOV and VFIO rules
/// (shared/reference/linux-sriov-qdma-vfio.md), so tests of the agent meet them.
@Suite struct KernelRulesTests {
  let pf0 = PCIAddress("0000:3b:00.0")!
  let pf2 = PCIAddress("0000:3b:00.2")!

  func pf(_ node: SimulatedNode, _ address: PCIAddress) -> DiscoveredPF {
    node.scan().pfs.first { $0.function.address == address }!
  }

  @Test func defaultNodeHasTwoQDMACardsWithTheSoftIPSplit() {
    let node = SimulatedNode()
    let pfs = node.scan().pfs
    #expect(pfs.count == 8)
    #expect(pfs.prefix(4).map(\.function.totalVFs) == [64, 60, 60, 68])
    #expect(pfs.prefix(4).map(\.function.deviceID) == [0x903f, 0x913f, 0x923f, 0x933f])
    #expect(pfs.prefix(4).map(\.function.vfDeviceID) == [0xa03f, 0xa13f, 0xa23f, 0xa33f])
    #expect(pfs.allSatisfy { $0.function.vendorID == 0x10ee })
    #expect(Set(pfs.map(\.function.numaNode)) == [0, 1])
    #expect(pfs.reduce(0) { $0 + $1.vfs.count } > 0, "some VFs are enabled at start")
  }

  @Test func vfAddressesFollowOffsetAndStrideAndNeverCollide() async throws {
    let node = SimulatedNode(config: .full(cards: 1))
    let pfs = node.scan().pfs
    var seen = Set<PCIAddress>(pfs.map(\.function.address))
    for pf in pfs {
      for vf in pf.vfs {
        #expect(vf.address == pf.function.vfAddress(index: vf.index))
        #expect(seen.insert(vf.address).inserted, "\(vf.address) collides")
        #expect(vf.address.bus == pf.function.address.bus)
      }
    }
    #expect(seen.count == 256)
    let groups = pfs.flatMap { $0.vfs.map(\.iommuGroup) }
    #expect(Set(groups).count == groups.count, "one IOMMU group per VF")
  }

  @Test func numVFsRefusesGarbageWithEINVALAndTooManyWithERANGE() async {
    let node = SimulatedNode()
    await #expect(throws: KernelErrno.EINVAL) { try await node.writeNumVFs(pf: pf2, "three") }
    await #expect(throws: KernelErrno.EINVAL) { try await node.writeNumVFs(pf: pf2, "-1") }
    await #expect(throws: KernelErrno.ERANGE) { try await node.writeNumVFs(pf: pf2, "61") }
  }

  @Test func writingTheCurrentValueIsANoOp() async throws {
    let node = SimulatedNode()
    let before = pf(node, pf0)
    try await node.writeNumVFs(pf: pf0, "16")
    #expect(pf(node, pf0) == before)
  }

  @Test func changingANonZeroCountIsEBUSYUntilZeroIsWritten() async throws {
    let node = SimulatedNode()
    await #expect(throws: KernelErrno.EBUSY) { try await node.writeNumVFs(pf: pf0, "32") }
    #expect(pf(node, pf0).vfs.count == 16)
    try await node.writeNumVFs(pf: pf0, "0")
    #expect(pf(node, pf0).vfs.isEmpty)
    try await node.writeNumVFs(pf: pf0, "32")
    #expect(pf(node, pf0).vfs.count == 32)
    #expect(pf(node, pf0).function.numVFs == 32)
  }

  @Test func noPFDriverIsENOENTAndNoMailboxIsEPERM() async throws {
    let node = SimulatedNode()
    node.setPFDriver(pf2, nil)
    await #expect(throws: KernelErrno.ENOENT) { try await node.writeNumVFs(pf: pf2, "4") }
    let noMailbox = SimulatedNode(
      config: SimulatorConfig(cards: [.init(bus: 0x3b, numaNode: 0, enabledVFs: [], mailbox: false)]))
    await #expect(throws: KernelErrno.EPERM) { try await noMailbox.writeNumVFs(pf: pf2, "4") }
  }

  @Test func autoprobeDecidesWhetherNewVFsGetAHostDriver() async throws {
    let node = SimulatedNode()
    try node.writeAutoprobe(pf: pf2, "1")
    try await node.writeNumVFs(pf: pf2, "2")
    #expect(pf(node, pf2).vfs.map(\.driver) == ["qdma-vf", "qdma-vf"])
    try await node.writeNumVFs(pf: pf2, "0")
    try node.writeAutoprobe(pf: pf2, "0")
    try await node.writeNumVFs(pf: pf2, "2")
    #expect(pf(node, pf2).vfs.map(\.driver) == [nil, nil])
    #expect(throws: KernelErrno.EINVAL) { try node.writeAutoprobe(pf: pf2, "yes") }
  }

  @Test func driverOverrideThenProbeBindsToVFIO() async throws {
    let node = SimulatedNode()
    try node.writeAutoprobe(pf: pf2, "1")
    try await node.writeNumVFs(pf: pf2, "1")
    let vf = pf(node, pf2).vfs[0].address
    try node.writeDriverOverride(vf: vf, "vfio-pci")
    try node.probe(vf: vf)
    #expect(pf(node, pf2).vfs[0].driver == "qdma-vf", "override alone does not unbind")
    try node.unbind(vf: vf)
    #expect(throws: KernelErrno.ENOENT) { try node.unbind(vf: vf) }
    try node.probe(vf: vf)
    let bound = pf(node, pf2).vfs[0]
    #expect(bound.driver == "vfio-pci")
    #expect(bound.vfioDevice == "/dev/vfio/\(bound.iommuGroup)")
    try node.unbind(vf: vf)
    try node.writeDriverOverride(vf: vf, "none")
    try node.probe(vf: vf)
    #expect(pf(node, pf2).vfs[0].driver == nil, "`none` opts out of binding")
  }

  @Test func writingZeroBlocksWhileAVMHoldsAVF() async throws {
    let node = SimulatedNode()
    let vf = pf(node, pf0).vfs[3].address
    try node.hold(vf: vf, by: "vm1")
    #expect(throws: KernelErrno.EBUSY) { try node.unbind(vf: vf) }
    let write = Task { try await node.writeNumVFs(pf: pf0, "0") }
    // The write stays blocked as long as the VF is held.
    for _ in 0..<20 { await Task.yield() }
    #expect(pf(node, pf0).vfs.count == 16)
    node.release(vf: vf)
    try await write.value
    #expect(pf(node, pf0).vfs.isEmpty)
  }

  @Test func qmaxIsLimitedTo2048QueueSetsPerCard() throws {
    let node = SimulatedNode()
    try node.writeQmax(pf: pf0, "1024")
    try node.writeQmax(pf: pf2, "1024")
    #expect(throws: KernelErrno.EINVAL) { try node.writeQmax(pf: PCIAddress("0000:3b:00.1")!, "1") }
    #expect(pf(node, pf0).function.qmax == 1024)
  }

  @Test func errnosBecomeActionableErrors() {
    let error = SRIOVErrors.numVFsWrite(.EBUSY, pf: pf0, requested: 8, current: 16, total: 64)
    #expect(error.code == .failedPrecondition)
    #expect(
      error.message == "PF 0000:3b:00.0 already has 16 VFs enabled; the kernel only changes a non-zero count through 0")
    #expect(error.cause == "sriov_numvfs write of 8 returned EBUSY (errno 16)")
    #expect(SRIOVErrors.numVFsWrite(.ERANGE, pf: pf0, requested: 65, current: 0, total: 64).code == .invalidArgument)
    #expect(SRIOVErrors.numVFsWrite(.ENOENT, pf: pf0, requested: 1, current: 0, total: 64).code == .failedPrecondition)
    #expect(SRIOVErrors.numVFsWrite(.EPERM, pf: pf0, requested: 1, current: 0, total: 64).message.contains("mailbox"))
  }

  @Test func configProblemsAreNamed() {
    let bad = SimulatorConfig(cards: [
      .init(bus: 0x3b, numaNode: 0, totalVFs: [200, 100], enabledVFs: [300]),
      .init(bus: 0x3b, numaNode: 0),
    ])
    let problems = bad.problems()
    #expect(problems.contains("simulator.cards[1].bus 3b is used by another card"))
    #expect(problems.contains("simulator.cards[0].total_vfs must be non-negative and add up to at most 252"))
    #expect(problems.contains("simulator.cards[0].enabled_vfs must give, per PF, a count between 0 and its total_vfs"))
  }
}
