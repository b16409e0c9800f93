public import FPGACore

/// Simulated VMs for the embedded default node, so attach and detach can be tried without QEMU.
/// They follow QEMU's rules: a device goes into a free root port, an unplug completes only when
/// the guest acknowledges it, and a plugged VF holds its /dev/vfio/N open (so the simulated
/// kernel blocks a VF count write of 0 until it is released).
public actor SimulatedHypervisor: Hypervisor {
  public struct VM: Hashable, Sendable {
    public var name: String
    public var rootPorts: Int
    /// The VMM can pause a VFIO device.
    public var vfioPause: Bool
    /// The guest acknowledges unplug requests (false: a guest that never does).
    public var acknowledgesUnplug: Bool

    public init(name: String, rootPorts: Int = 4, vfioPause: Bool = false, acknowledgesUnplug: Bool = true) {
      self.name = name
      self.rootPorts = rootPorts
      self.vfioPause = vfioPause
      self.acknowledgesUnplug = acknowledgesUnplug
    }
  }

  /// Two VMs: one whose VMM can pause VFIO devices, one that cannot.
  public static let defaultVMs = [
    VM(name: "vm-1", rootPorts: 4, vfioPause: true), VM(name: "vm-2", rootPorts: 2, vfioPause: false),
  ]

  public nonisolated let passesThroughVFIO = true
  public nonisolated var whichVMs: String { "the simulated VMs (simulator.vms)" }
  private let node: SimulatedNode
  private var vms: [String: VM]
  /// vm → port → (device id, VF).
  private var plugged: [String: [String: (id: String, vf: PCIAddress)]] = [:]
  /// Devices whose host VF is closed (paused), by device id.
  private var paused: Set<String> = []

  public init(node: SimulatedNode, vms: [VM] = SimulatedHypervisor.defaultVMs) {
    self.node = node
    self.vms = Dictionary(vms.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
  }

  public func machines() async -> [VirtualMachineInfo] {
    vms.values.sorted { $0.name < $1.name }.map { vm in
      VirtualMachineInfo(
        name: vm.name, state: .running, qemuStatus: "running", qmpSocket: "(simulated)", rootPorts: vm.rootPorts,
        freeRootPorts: vm.rootPorts - (plugged[vm.name]?.count ?? 0), vfioPause: vm.vfioPause)
    }
  }

  public func attach(vf: PCIAddress, to name: String, deviceID: String) async throws(AgentError) -> String {
    guard let vm = vms[name] else { throw AgentError(.notFound, "VM \(name) is not known") }
    let used = plugged[name] ?? [:]
    if used.values.contains(where: { $0.id == deviceID }) {
      throw AgentError(
        .failedPrecondition, "the VMM of VM \(name) refused device_add: Duplicate device ID '\(deviceID)'")
    }
    guard let port = (1...max(vm.rootPorts, 1)).map({ "rp\($0)" }).first(where: { used[$0] == nil }), vm.rootPorts > 0
    else {
      throw AgentError(
        .resourceExhausted,
        "VM \(name) has no free hot-pluggable root port (\(vm.rootPorts) ports, all occupied): start it with more empty pcie-root-port devices"
      )
    }
    do {
      try node.hold(vf: vf, by: name)
    } catch {
      throw AgentError(.failedPrecondition, "the VMM of VM \(name) refused device_add of VF \(vf): \(error)")
    }
    plugged[name, default: [:]][port] = (deviceID, vf)
    return port
  }

  public func detach(deviceID: String, from name: String, timeout: Duration) async throws(AgentError) {
    guard let vm = vms[name], let (port, device) = plugged[name]?.first(where: { $0.value.id == deviceID }) else {
      return  // already gone
    }
    guard vm.acknowledgesUnplug else {
      try? await Task.sleep(for: timeout)
      throw AgentError(
        .unavailable,
        "VM \(name) has not acknowledged the unplug of \(deviceID) within \(timeout): the device stays in the guest, "
          + "state detaching; the guest OS must handle PCIe hot-unplug (retry DetachVF to keep waiting)")
    }
    plugged[name]?[port] = nil
    if paused.remove(deviceID) == nil { node.release(vf: device.vf) }
  }

  /// Like the patched QEMU: the host VF is closed, the guest keeps its device.
  public func pause(deviceID: String, in name: String) async throws(AgentError) {
    let device = try pausable(deviceID, name)
    guard !paused.contains(deviceID) else { return }
    node.release(vf: device.vf)
    paused.insert(deviceID)
  }

  /// Re-opens the VF (re-created and bound to vfio-pci by then).
  public func resume(deviceID: String, in name: String) async throws(AgentError) {
    let device = try pausable(deviceID, name)
    guard paused.contains(deviceID) else { return }
    do {
      try node.hold(vf: device.vf, by: name)
    } catch {
      throw AgentError(
        .failedPrecondition, "the VMM of VM \(name) cannot re-open VF \(device.vf) for \(deviceID): \(error)")
    }
    paused.remove(deviceID)
  }

  private func pausable(_ deviceID: String, _ name: String) throws(AgentError) -> (id: String, vf: PCIAddress) {
    guard let vm = vms[name], let device = plugged[name]?.values.first(where: { $0.id == deviceID }) else {
      throw AgentError(.notFound, "VM \(name) has no device \(deviceID)")
    }
    guard vm.vfioPause else {
      throw AgentError(
        .failedPrecondition, "the VMM of VM \(name) cannot pause VFIO devices; use the detach-reattach strategy")
    }
    return device
  }

  public func pluggedDevices() async -> [PluggedDevice] {
    plugged.flatMap { vm, ports in
      ports.map { PluggedDevice(vm: vm, deviceID: $0.value.id, host: $0.value.vf, rootPort: $0.key) }
    }
  }
}
