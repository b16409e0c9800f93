public import FPGACore
import FPGAQMP
import Foundation

/// VMs reached over QMP: a configured list of name → socket and/or a directory scanned for
/// sockets. Connections are made on first use and remade after QEMU restarts.
public actor QEMUHypervisor: Hypervisor {
  public struct Settings: Sendable {
    /// name → QMP socket path.
    public var sockets: [String: String] = [:]
    /// A directory whose sockets (`NAME.sock` or `NAME.qmp`, or any socket named NAME) are VMs.
    public var socketDirectory: String?
    /// The QEMU device model for VFs: `vfio-pci`, or an emulated stand-in (`edu`) in tests.
    public var deviceModel = "vfio-pci"
    /// QMP commands that pause/resume a VFIO device, when this QEMU has them.
    public var pauseCommands = ["x-vfio-pause", "x-vfio-resume"]
    public var commandTimeout: Duration = .seconds(10)

    public init() {}
  }

  private let settings: Settings
  private var clients: [String: QMPClient] = [:]
  /// The commands each connected QEMU offers (they do not change while connected).
  private var commandCache: [ObjectIdentifier: Set<String>] = [:]
  /// Ports with an attach in progress, per VM.
  private var reserved: [String: Set<String>] = [:]

  public init(settings: Settings) {
    self.settings = settings
  }

  public nonisolated var passesThroughVFIO: Bool { settings.deviceModel == "vfio-pci" }

  // MARK: Hypervisor

  public func machines() async -> [VirtualMachineInfo] {
    var result: [VirtualMachineInfo] = []
    for (name, path) in vmSockets().sorted(by: { $0.key < $1.key }) {
      do throws(AgentError) {
        let (client, reply) = try await queryStatus(name)
        let status = reply["status"]?.stringValue ?? "?"
        let commands: Set<String>
        do {
          commands = try await commandNames(client)
        } catch {
          throw map(error, vm: name, doing: "query-commands")
        }
        let ports = try await rootPorts(client)
        let state: VirtualMachineInfo.State =
          switch status {
          case "running": .running
          case "paused": .paused
          case "prelaunch": .prelaunch
          case "shutdown": .shutdown
          default: .other
          }
        result.append(
          VirtualMachineInfo(
            name: name, state: state, qemuStatus: status, qmpSocket: path, rootPorts: ports.all.count,
            freeRootPorts: ports.free.count, vfioPause: settings.pauseCommands.allSatisfy(commands.contains)))
      } catch {
        result.append(
          VirtualMachineInfo(name: name, state: .unreachable, qmpSocket: path, error: error.message))
      }
    }
    return result
  }

  public func attach(vf: PCIAddress, to vm: String, deviceID: String) async throws(AgentError) -> String {
    let client = try await client(vm)
    let ports = try await rootPorts(client)
    guard let port = ports.free.first(where: { !(reserved[vm]?.contains($0) ?? false) }) else {
      throw AgentError(
        .resourceExhausted,
        "VM \(vm) has no free hot-pluggable root port (\(ports.all.count) ports, all occupied): start it with more empty pcie-root-port devices"
      )
    }
    reserved[vm, default: []].insert(port)
    defer { reserved[vm]?.remove(port) }
    var arguments: [String: JSONValue] = [
      "driver": .string(settings.deviceModel), "id": .string(deviceID), "bus": .string(port),
    ]
    if settings.deviceModel == "vfio-pci" { arguments["host"] = .string(vf.description) }
    do {
      _ = try await client.execute("device_add", .object(arguments), timeout: settings.commandTimeout)
      let present = try await peripheralNames(client)
      guard present.contains(deviceID) else {
        throw AgentError(.internal, "QEMU of VM \(vm) accepted device_add of \(deviceID) but does not list it")
      }
    } catch let error as QMPError {
      throw map(error, vm: vm, doing: "device_add of VF \(vf) into \(port)")
    } catch {
      throw error as? AgentError ?? AgentError(.internal, "\(error)")
    }
    return port
  }

  public func detach(deviceID: String, from vm: String, timeout: Duration) async throws(AgentError) {
    let client = try await client(vm)
    let deleted = client.expectEvent("DEVICE_DELETED") { $0["device"]?.stringValue == deviceID }
    do {
      do {
        _ = try await client.execute("device_del", ["id": .string(deviceID)], timeout: settings.commandTimeout)
      } catch let error where error.kind == .commandFailed && error.message.contains("already in the process of unplug")
      {
        // An earlier request is pending: keep waiting for the guest.
      } catch let error where error.errorClass == "DeviceNotFound" {
        deleted.cancel()
        return  // already gone
      }
      _ = try await deleted.wait(timeout: timeout)
    } catch {
      deleted.cancel()
      if error.kind == .cancelled {
        throw AgentError(
          .unavailable,
          "the wait for VM \(vm) to acknowledge the unplug of \(deviceID) was abandoned (the agent is stopping or the "
            + "caller went away): the device stays in the guest, state detaching; retry DetachVF to keep waiting")
      }
      if error.kind == .timeout {
        throw AgentError(
          .unavailable,
          "VM \(vm) has not acknowledged the unplug of \(deviceID) within \(timeout): the device stays in the guest, "
            + "state detaching; the guest OS must handle PCIe hot-unplug (retry DetachVF to keep waiting)")
      }
      throw map(error, vm: vm, doing: "device_del of \(deviceID)")
    }
  }

  public func pause(deviceID: String, in vm: String) async throws(AgentError) {
    try await pauseCommand(settings.pauseCommands.first, deviceID: deviceID, vm: vm, doing: "pause")
  }

  public func resume(deviceID: String, in vm: String) async throws(AgentError) {
    try await pauseCommand(settings.pauseCommands.last, deviceID: deviceID, vm: vm, doing: "resume")
  }

  private func pauseCommand(_ command: String?, deviceID: String, vm: String, doing: String) async throws(AgentError) {
    let client = try await client(vm)
    let commands: Set<String>
    do {
      commands = try await commandNames(client)
    } catch {
      throw map(error, vm: vm, doing: "query-commands")
    }
    guard settings.pauseCommands.count == 2, let command, commands.contains(command) else {
      throw AgentError(
        .failedPrecondition,
        "QEMU of VM \(vm) cannot \(doing) a VFIO device (no \(command ?? "pause") command); use the detach-reattach strategy"
      )
    }
    do {
      _ = try await client.execute(command, ["id": .string(deviceID)], timeout: settings.commandTimeout)
    } catch {
      throw map(error, vm: vm, doing: "\(command) of \(deviceID)")
    }
  }

  public func pluggedDevices() async -> [PluggedDevice] {
    await scanPluggedDevices().devices
  }

  public func scanPluggedDevices() async -> PluggedDeviceScan {
    var devices: [PluggedDevice] = []
    var unread = Set<String>()
    for name in vmSockets().keys.sorted() {
      guard let client = try? await client(name), let names = try? await peripheralNames(client) else {
        unread.insert(name)
        continue
      }
      for id in names where id.hasPrefix("alloc-") {
        let path = "/machine/peripheral/" + id
        let host = try? await client.execute("qom-get", ["path": .string(path), "property": "host"]).stringValue
        let bus = try? await client.execute("qom-get", ["path": .string(path), "property": "parent_bus"]).stringValue
        devices.append(
          PluggedDevice(
            vm: name, deviceID: id, host: host.flatMap { PCIAddress($0) },
            rootPort: bus.flatMap { $0.split(separator: "/").dropLast().last.map(String.init) }))
      }
    }
    return PluggedDeviceScan(devices: devices, unread: unread)
  }

  // MARK: Connections

  /// `query-status`, over a fresh connection once if QEMU restarted since the last use.
  private func queryStatus(_ name: String) async throws(AgentError) -> (QMPClient, JSONValue) {
    let cached = try await client(name)
    do {
      return (cached, try await cached.execute("query-status", timeout: settings.commandTimeout))
    } catch  where error.kind == .disconnected {
      clients[name] = nil
    } catch {
      throw map(error, vm: name, doing: "query-status")
    }
    let fresh = try await client(name)
    do {
      return (fresh, try await fresh.execute("query-status", timeout: settings.commandTimeout))
    } catch {
      throw map(error, vm: name, doing: "query-status")
    }
  }

  /// The VMs and their sockets: configured ones, then those found in the directory.
  nonisolated func vmSockets() -> [String: String] {
    var sockets = settings.sockets
    if let directory = settings.socketDirectory,
      let names = try? FileManager.default.contentsOfDirectory(atPath: directory)
    {
      for file in names {
        let path = directory + "/" + file
        guard let type = try? FileManager.default.attributesOfItem(atPath: path)[.type] as? FileAttributeType,
          type == .typeSocket
        else { continue }
        var name = file
        for suffix in [".sock", ".qmp"] where name.hasSuffix(suffix) { name = String(name.dropLast(suffix.count)) }
        if (try? Validate.vmName(name)) != nil, sockets[name] == nil { sockets[name] = path }
      }
    }
    return sockets
  }

  private func client(_ vm: String) async throws(AgentError) -> QMPClient {
    if let client = clients[vm], client.isConnected { return client }
    guard let path = vmSockets()[vm] else {
      throw AgentError(.notFound, "VM \(vm) is not configured (--qmp-socket NAME=PATH or --qmp-dir DIR)")
    }
    do {
      let client = try await QMPClient.connect(path: path, timeout: settings.commandTimeout)
      if let old = clients[vm] { commandCache[ObjectIdentifier(old)] = nil }
      clients[vm] = client
      return client
    } catch {
      throw map(error, vm: vm, doing: "connecting")
    }
  }

  private func rootPorts(_ client: QMPClient) async throws(AgentError) -> (all: [String], free: [String]) {
    do {
      let entries =
        try await client.execute("qom-list", ["path": "/machine/peripheral"], timeout: settings.commandTimeout)
        .arrayValue ?? []
      var ports: [String] = []
      var devices: [String] = []
      for entry in entries {
        guard let name = entry["name"]?.stringValue, let type = entry["type"]?.stringValue, type.hasPrefix("child<")
        else {
          continue
        }
        if type == "child<pcie-root-port>" { ports.append(name) } else { devices.append(name) }
      }
      var occupied = Set<String>()
      for device in devices {
        let bus = try await client.execute(
          "qom-get", ["path": .string("/machine/peripheral/" + device), "property": "parent_bus"],
          timeout: settings.commandTimeout)
        // "/machine/peripheral/rp2/rp2": the port is the last path component but one.
        if let port = bus.stringValue?.split(separator: "/").dropLast().last { occupied.insert(String(port)) }
      }
      return (ports.sorted(), ports.sorted().filter { !occupied.contains($0) })
    } catch {
      throw map(error, vm: vmName(of: client), doing: "listing root ports")
    }
  }

  private func vmName(of client: QMPClient) -> String {
    clients.first { $0.value === client }?.key ?? client.path
  }

  private func peripheralNames(_ client: QMPClient) async throws(QMPError) -> Set<String> {
    let entries = try await client.execute(
      "qom-list", ["path": "/machine/peripheral"], timeout: settings.commandTimeout)
    return Set(
      (entries.arrayValue ?? []).compactMap { entry in
        entry["type"]?.stringValue?.hasPrefix("child<") == true ? entry["name"]?.stringValue : nil
      })
  }

  private func commandNames(_ client: QMPClient) async throws(QMPError) -> Set<String> {
    if let cached = commandCache[ObjectIdentifier(client)] { return cached }
    let list = try await client.execute("query-commands", timeout: settings.commandTimeout)
    let names = Set((list.arrayValue ?? []).compactMap { $0["name"]?.stringValue })
    commandCache[ObjectIdentifier(client)] = names
    return names
  }

  /// QEMU's answers as the agent's errors: unreachable QEMU is UNAVAILABLE, a refusal is
  /// FAILED_PRECONDITION with QEMU's own text.
  private func map(_ error: QMPError, vm: String, doing: String) -> AgentError {
    switch error.kind {
    case .connectFailed:
      return AgentError(.unavailable, "VM \(vm) is unreachable: \(error.message)", cause: doing)
    case .disconnected:
      clients[vm] = nil
      return AgentError(
        .unavailable, "the QEMU of VM \(vm) went away during \(doing) (it exited or was killed)", cause: error.message)
    case .timeout:
      return AgentError(.unavailable, "the QEMU of VM \(vm) did not answer \(doing) in time", cause: error.message)
    case .cancelled:
      return AgentError(
        .unavailable, "\(doing) in VM \(vm) was abandoned: the agent is stopping or the caller went away",
        cause: error.message)
    case .commandFailed:
      return AgentError(
        error.errorClass == "DeviceNotFound" ? .notFound : .failedPrecondition,
        "the QEMU of VM \(vm) refused \(doing): \(error.message)", cause: error.errorClass)
    case .protocolViolation:
      return AgentError(.internal, "VM \(vm) spoke something other than QMP during \(doing)", cause: error.message)
    }
  }
}
