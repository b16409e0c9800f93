import FPGACore
import FPGASimulator
import Synchronization
import Testing

/// A hand-written hypervisor that records what it is asked and fails on demand.
final class RecordingHypervisor: Hypervisor {
  let passesThroughVFIO = true
  let calls = Mutex<[String]>([])
  let failDetach = Mutex<AgentError?>(nil)
  let names: [String]

  init(machines names: [String] = ["vm1", "vm2"]) { self.names = names }

  func machines() async -> [VirtualMachineInfo] {
    names.map {
      VirtualMachineInfo(
        name: $0, state: .running, qemuStatus: "running", qmpSocket: "/x", rootPorts: 2, freeRootPorts: 2)
    }
  }

  func attach(vf: PCIAddress, to vm: String, deviceID: String) async throws(AgentError) -> String {
    calls.withLock { $0.append("attach \(vf) \(vm) \(deviceID)") }
    return "rp1"
  }

  func detach(deviceID: String, from vm: String, timeout: Duration) async throws(AgentError) {
    calls.withLock { $0.append("detach \(deviceID) \(vm)") }
    if let error = failDetach.withLock({ $0 }) { throw error }
  }

  /// Devices found plugged, and VMs whose devices cannot be read, for `scanPluggedDevices`.
  let plugged = Mutex<[PluggedDevice]>([])
  let unread = Mutex<Set<String>>([])

  func pluggedDevices() async -> [PluggedDevice] { plugged.withLock { $0 } }

  func scanPluggedDevices() async -> PluggedDeviceScan {
    PluggedDeviceScan(devices: plugged.withLock { $0 }, unread: unread.withLock { $0 })
  }

  func pause(deviceID: String, in vm: String) async throws(AgentError) {
    calls.withLock { $0.append("pause \(deviceID) \(vm)") }
  }

  func resume(deviceID: String, in vm: String) async throws(AgentError) {
    calls.withLock { $0.append("resume \(deviceID) \(vm)") }
  }
}

@Suite struct AttachTests {
  func engine(_ hypervisor: RecordingHypervisor) async throws -> (NodeEngine, SimulatedNode) {
    let node = SimulatedNode(
      config: SimulatorConfig(cards: [
        .init(bus: 0x3b, numaNode: 0, enabledVFs: [2, 0, 0, 0], bindToVFIO: false)
      ]))
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node), clock: StillClock(), hypervisor: hypervisor)
    try await engine.rescan()
    return (engine, node)
  }

  /// A VM listed as running whose devices could not be read (libvirtd restarting between the
  /// two listings, a QMP socket that stopped answering) keeps its attachments; one read without
  /// the device loses it.
  @Test func reconcileKeepsTheAttachmentsOfAVMWhoseDevicesCouldNotBeRead() async throws {
    let hypervisor = RecordingHypervisor()
    let (engine, _) = try await engine(hypervisor)
    let allocation = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    _ = try await engine.attach(AttachRequest(allocationID: allocation.id, vm: "vm1"))
    hypervisor.unread.withLock { $0 = ["vm1"] }
    #expect(await engine.reconcile().isEmpty)
    #expect(try await engine.snapshot().allocations.first { $0.id == allocation.id }?.attached == true)
    hypervisor.unread.withLock { $0 = [] }
    let found = await engine.reconcile()
    #expect(found.count == 1 && found[0].contains("which does not have device \(allocation.id): now unattached"))
    #expect(try await engine.snapshot().allocations.first { $0.id == allocation.id }?.attached == false)
  }

  /// The agent stopped after the VMM plugged the device and before the attach was recorded:
  /// at the next start the device in the VM makes the allocation attached, so its VF is never
  /// handed out while a VM holds it.
  @Test func reconcileAdoptsAnAttachTheAgentDidNotRecord() async throws {
    let hypervisor = RecordingHypervisor()
    let (engine, _) = try await engine(hypervisor)
    let allocation = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    hypervisor.plugged.withLock {
      $0 = [PluggedDevice(vm: "vm2", deviceID: allocation.id, host: allocation.vf, rootPort: "rp2")]
    }
    let found = await engine.reconcile()
    #expect(found.count == 1 && found[0].contains("VM vm2 holds it as device \(allocation.id) at rp2"))
    let adopted = try #require(try await engine.snapshot().allocations.first { $0.id == allocation.id })
    #expect(adopted.attached && adopted.vm == "vm2" && adopted.rootPort == "rp2")
    // Released now, the VF would be handed out again while vm2 holds it: the agent refuses.
    await #expect(throws: AgentError.self) { _ = try await engine.release(ReleaseRequest(allocationID: allocation.id)) }
  }

  @Test func attachBindsTheVFToVFIOFirst() async throws {
    let hypervisor = RecordingHypervisor()
    let (engine, node) = try await engine(hypervisor)
    let allocation = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    #expect(node.scan().pfs[0].vfs[0].driver == "qdma-vf")
    let result = try await engine.attach(AttachRequest(allocationID: allocation.id, vm: "vm1"))
    #expect(result.rootPort == "rp1" && result.allocation.attached)
    #expect(node.scan().pfs[0].vfs[0].driver == "vfio-pci")
    #expect(
      node.writeLog.suffix(3) == [
        "0000:3b:00.4/driver_override=vfio-pci", "0000:3b:00.4/driver/unbind", "drivers_probe=0000:3b:00.4",
      ])
    #expect(hypervisor.calls.withLock { $0 } == ["attach 0000:3b:00.4 vm1 \(allocation.id)"])
    let view = try await engine.snapshot().cards[0].pfs[0].vfs[0]
    #expect(view.state == .attached && view.vm == "vm1" && view.function.driver == "vfio-pci")
  }

  @Test func aFailedDetachLeavesTheAllocationDetaching() async throws {
    let hypervisor = RecordingHypervisor()
    let (engine, _) = try await engine(hypervisor)
    let allocation = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    _ = try await engine.attach(AttachRequest(allocationID: allocation.id, vm: "vm1"))
    hypervisor.failDetach.withLock { $0 = AgentError(.unavailable, "no acknowledgement") }
    await #expect(throws: AgentError(.unavailable, "no acknowledgement")) {
      try await engine.detach(DetachRequest(allocationID: allocation.id))
    }
    let held = try await engine.snapshot().allocations.first
    #expect(held?.attached == true && held?.detaching == true)
    #expect(try await engine.snapshot().cards[0].pfs[0].vfs[0].state == .detaching)
    hypervisor.failDetach.withLock { $0 = nil }
    let detached = try await engine.detach(DetachRequest(allocationID: allocation.id))
    #expect(!detached.allocation.attached && !detached.allocation.detaching)
    _ = try await engine.release(ReleaseRequest(allocationID: allocation.id))
  }

  @Test func attachIsIdempotentAndGuarded() async throws {
    let hypervisor = RecordingHypervisor()
    let (engine, _) = try await engine(hypervisor)
    let allocation = try await engine.allocate(AllocateRequest(owner: "o", vm: "vm1")).allocation
    let request = AttachRequest(meta: RequestMeta(idempotencyKey: "a1"), allocationID: allocation.id, vm: "vm1")
    _ = try await engine.attach(request)
    #expect(try await engine.attach(request).replayed)
    await #expect(throws: AgentError.self) {
      try await engine.attach(AttachRequest(allocationID: allocation.id, vm: "vm2"))
    }
    let other = try await engine.allocate(AllocateRequest(owner: "o", vm: "vm1")).allocation
    await #expect(
      throws: AgentError(
        .failedPrecondition, "allocation \(other.id) was made for VM vm1, not vm2; allocate another VF for vm2")
    ) {
      try await engine.attach(AttachRequest(allocationID: other.id, vm: "vm2"))
    }
    #expect(hypervisor.calls.withLock { $0.count } == 1)
  }
}
