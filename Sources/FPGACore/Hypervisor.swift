/// What the agent knows of a VM it can plug VFs into.
public struct VirtualMachineInfo: Hashable, Sendable {
  public enum State: String, Hashable, Sendable {
    case running, paused, prelaunch, shutdown, unreachable, other
  }

  public var name: String
  public var state: State
  /// The QEMU run state as QEMU names it (`running`, `paused`, `prelaunch`, …).
  public var qemuStatus: String
  public var qmpSocket: String
  public var rootPorts: Int
  public var freeRootPorts: Int
  public var vfioPause: Bool
  /// Why it is unreachable, when it is.
  public var error: String?

  public init(
    name: String, state: State, qemuStatus: String = "", qmpSocket: String, rootPorts: Int = 0, freeRootPorts: Int = 0,
    vfioPause: Bool = false, error: String? = nil
  ) {
    self.name = name
    self.state = state
    self.qemuStatus = qemuStatus
    self.qmpSocket = qmpSocket
    self.rootPorts = rootPorts
    self.freeRootPorts = freeRootPorts
    self.vfioPause = vfioPause
    self.error = error
  }
}

/// A device found plugged into a VM (for rebuilding the VF → VM map at start-up).
public struct PluggedDevice: Hashable, Sendable {
  public var vm: String
  public var deviceID: String
  /// The host VF, when the device model says (vfio-pci's `host`).
  public var host: PCIAddress?
  public var rootPort: String?

  public init(vm: String, deviceID: String, host: PCIAddress?, rootPort: String?) {
    self.vm = vm
    self.deviceID = deviceID
    self.host = host
    self.rootPort = rootPort
  }
}

/// The seam between the core and the VMMs (QEMU over QMP).
public protocol Hypervisor: Sendable {
  /// True when VFs are plugged in as vfio-pci devices (they must be bound to vfio-pci first).
  var passesThroughVFIO: Bool { get }
  /// Which VMs this backend knows, for the message of a request naming another.
  var whichVMs: String { get }
  /// Why the backend cannot reach its VMs now (libvirtd unreachable), for the node's problems.
  var connectionProblem: String? { get }
  /// Every configured VM with its state now.
  func machines() async -> [VirtualMachineInfo]
  /// Plugs `vf` into a free hot-pluggable root port of `vm` as device `deviceID`; returns the port.
  func attach(vf: PCIAddress, to vm: String, deviceID: String) async throws(AgentError) -> String
  /// Unplugs device `deviceID` from `vm` and waits until the VMM confirms (`DEVICE_DELETED`).
  func detach(deviceID: String, from vm: String, timeout: Duration) async throws(AgentError)
  /// Devices the agent plugged (ids starting with `alloc-`), per VM.
  func pluggedDevices() async -> [PluggedDevice]
  /// The same, and the VMs whose devices could not be read now (their VMM or libvirt did not
  /// answer): what those hold is unknown, not absent.
  func scanPluggedDevices() async -> PluggedDeviceScan
  /// Closes the host side of VFIO device `deviceID` while the guest keeps its PCI device (a
  /// VMM with the pause capability, `vfioPause`). Pausing a paused device succeeds.
  func pause(deviceID: String, in vm: String) async throws(AgentError)
  /// Re-opens the host VF of a paused device. Resuming a running device succeeds.
  func resume(deviceID: String, in vm: String) async throws(AgentError)
}

extension Hypervisor {
  public var whichVMs: String { "the VMs configured with --qmp-socket NAME=PATH or --qmp-dir DIR" }
  public var connectionProblem: String? { nil }

  public func scanPluggedDevices() async -> PluggedDeviceScan {
    PluggedDeviceScan(devices: await pluggedDevices(), unread: [])
  }
}

/// What one listing of the plugged devices saw.
public struct PluggedDeviceScan: Hashable, Sendable {
  public var devices: [PluggedDevice]
  /// VMs whose devices could not be read.
  public var unread: Set<String>

  public init(devices: [PluggedDevice], unread: Set<String>) {
    self.devices = devices
    self.unread = unread
  }
}
