public import FPGACore

/// VMs managed by libvirt (`hypervisor: libvirt`): every running or paused domain of the
/// connection is a VM. libvirt owns each domain's QMP monitor, so the agent goes through
/// libvirt's API and events, never around it: devices are plugged with
/// `virDomainAttachDeviceFlags` (a `<hostdev managed='no'>` the agent bound to vfio-pci itself,
/// user alias `ua-` + the allocation id), unplugged with `virDomainDetachDeviceAlias` and
/// confirmed by libvirt's `DEVICE_REMOVED` event. By default nothing here marks a domain
/// tainted: VFIO pause (QEMU monitor commands libvirt does not know) is used only when the
/// operator opts in (`libvirt.qemu_monitor_pause`), through libvirt's monitor passthrough
/// (`virDomainQemuMonitorCommand`), which libvirt marks as the `custom-monitor` taint.
public actor LibvirtHypervisor: Hypervisor {
  public struct Settings: Sendable {
    /// The connection URI (`qemu:///system`).
    public var uri = "qemu:///system"
    /// Attach to a persistent domain's definition too (`libvirt.persistent_attach`).
    public var persistentAttach = false
    /// First delay before reconnecting after libvirtd went away; doubled up to `maximumBackoff`.
    public var initialBackoff: Duration = .milliseconds(500)
    public var maximumBackoff: Duration = .seconds(15)
    /// Pause and resume VFIO devices through libvirt's QEMU monitor passthrough
    /// (`libvirt.qemu_monitor_pause`): each running domain is asked `query-commands` once per
    /// start, and libvirt marks it tainted (`custom-monitor`).
    public var monitorPause = false
    /// The QMP commands that pause and resume a VFIO device (`qemu.pause_commands`).
    public var pauseCommands = ["x-vfio-pause", "x-vfio-resume"]
    /// Serve only domains whose name matches one of these shell patterns (`libvirt.domains`);
    /// empty: every domain.
    public var domainPatterns: [String] = []
    /// Serve only domains with an element of this namespace in their `<metadata>`
    /// (`libvirt.metadata_namespace`).
    public var metadataNamespace: String?

    public init() {}
  }

  public nonisolated let passesThroughVFIO = true

  public nonisolated var connectionProblem: String? {
    let status = connectionStatus
    guard !status.connected, status.opens > 0 || status.lastFailure != nil else { return nil }
    return (status.lastFailure ?? "libvirt at \(settings.uri) is unreachable")
      + "; its VMs are unreachable until the agent reconnects"
  }

  public nonisolated var whichVMs: String {
    "the running and paused libvirt domains at \(settings.uri)" + (filter.isEmpty ? "" : " (\(filter.description))")
  }
  private let settings: Settings
  private let connection: LibvirtConnection
  /// With `monitorPause`: libvirt's QEMU library, and a connection of its own for monitor
  /// commands (libvirt runs one call at a time per connection here, and a monitor command waits
  /// for the domain's job lock and QEMU's answer: a busy domain must not hold up the rest).
  private let qemu: (library: LibvirtQEMULibrary, connection: LibvirtConnection)?
  private let filter: DomainFilter
  /// The last VMs seen while connected: shown `unreachable` while the connection is down.
  private var lastSeen: [VirtualMachineInfo] = []
  /// Listings started: only the newest one to finish writes `lastSeen` (listings overlap
  /// across their awaits).
  private var listings = 0
  /// What each running domain's QEMU said of the pause commands, by name and libvirt id (a
  /// restarted domain has a new id, and maybe a new emulator): asked once per start; a failed
  /// question is asked again after `retryUnknownPause`. Forgotten when the connection is
  /// reopened (libvirtd restarted: ids may be reused).
  private var pauseCapable: [DomainKey: PauseCapability] = [:]
  private var pauseCapableOpens = 0
  private static let retryUnknownPause: Duration = .seconds(30)

  private enum PauseCapability: Sendable {
    case capable, incapable
    /// libvirt or QEMU could not be asked (a busy or starting domain): why, and when.
    case unknown(String, ContinuousClock.Instant)
  }
  /// Root ports with an attach in progress, per VM.
  private var reserved: [String: Set<String>] = [:]

  /// Fails when libvirt's library (`libvirt.so.0`, and `libvirt-qemu.so.0` with `monitorPause`)
  /// cannot be loaded: the message says what to install.
  public init(settings: Settings) throws(AgentError) {
    let library: LibvirtLibrary
    do {
      library = try LibvirtLibrary.shared()
      qemu =
        settings.monitorPause
        ? (try LibvirtQEMULibrary.shared(), LibvirtConnection(library: library, uri: settings.uri, events: false))
        : nil
    } catch {
      throw AgentError(.failedPrecondition, error.description)
    }
    self.settings = settings
    self.filter = DomainFilter(patterns: settings.domainPatterns, metadataNamespace: settings.metadataNamespace)
    self.connection = LibvirtConnection(library: library, uri: settings.uri)
  }

  private struct DomainKey: Hashable {
    var name: String
    var id: Int
  }

  /// The connection to libvirtd now, for `/metrics`.
  public struct ConnectionStatus: Sendable, Hashable {
    /// The connection URI (`libvirt.uri`).
    public var uri: String
    /// A connection is open and libvirt has not reported it closed.
    public var connected: Bool
    /// Connections opened after the first (libvirtd restarted, keepalive expired).
    public var reconnects: Int
    /// Why the last attempt failed or the connection was lost, while it is down.
    public var lastFailure: String?
    /// VFIO pause through the QEMU monitor passthrough is on (`monitorPause`).
    public var monitorPause: Bool
    /// Connections opened since the start.
    public var opens: Int
  }

  public nonisolated var connectionStatus: ConnectionStatus {
    let connected = connection.isOpen
    return ConnectionStatus(
      uri: settings.uri, connected: connected, reconnects: max(connection.opens - 1, 0),
      lastFailure: connected ? nil : connection.lastFailure, monitorPause: settings.monitorPause,
      opens: connection.opens)
  }

  /// What the VM list shows as the endpoint of each VM.
  private var endpoint: String { "libvirt:" + settings.uri }

  // MARK: Events and the connection

  /// Yields when libvirt reports a change (a domain started, stopped, paused, resumed, defined,
  /// undefined, its metadata changed; a device added or removed) or the connection was lost or
  /// regained. Coalesced: one rescan covers a burst.
  public nonisolated var changes: AsyncStream<Void> { connection.changes }

  /// What happened to the connection, for the agent's log.
  public enum ConnectionEvent: Sendable, Hashable {
    /// Opened: the first time (`reconnects` 0) or again after a loss.
    case connected(reconnects: Int)
    /// libvirtd closed it, or keepalive expired: libvirt's reason.
    case lost(String)
    /// An attempt to open it failed: libvirt's reason, and whether the attempt before failed
    /// for the same reason.
    case failed(String, repeated: Bool)
  }

  /// Keeps the connection open: reconnects after libvirtd closes it, with a doubling backoff
  /// (jittered) capped at `maximumBackoff`, and says what happens to `report`. Returns when the
  /// calling task is cancelled.
  public nonisolated func maintainConnection(report: @escaping @Sendable (ConnectionEvent) -> Void = { _ in }) async {
    var delay = settings.initialBackoff
    var closes = connection.closes.makeAsyncIterator()
    var reportedOpen = false
    var lastFailure: String?
    while !Task.isCancelled {
      if connection.isOpen {
        if !reportedOpen { report(.connected(reconnects: max(connection.opens - 1, 0))) }
        reportedOpen = true
        lastFailure = nil
        delay = settings.initialBackoff
        guard await closes.next() != nil else { return }  // cancelled
        if !connection.isOpen {
          report(.lost(connection.lastFailure ?? "the connection to libvirt at \(settings.uri) was closed"))
          reportedOpen = false
        }
        continue
      }
      reportedOpen = false
      if case .failure(let failure) = await connection.connect() {
        let reason = message(failure)
        report(.failed(reason, repeated: reason == lastFailure))
        lastFailure = reason
      } else {
        continue
      }
      let jittered = delay * Double.random(in: 0.5...1.0)
      do {
        try await Task.sleep(for: jittered)
      } catch {
        return
      }
      delay = min(delay * 2, settings.maximumBackoff)
    }
  }

  // MARK: Hypervisor

  public func machines() async -> [VirtualMachineInfo] {
    switch await connection.activeDomains() {
    case .success(let domains):
      listings += 1
      let listing = listings
      var seen: [VirtualMachineInfo] = []
      var running = Set<DomainKey>()
      for domain in domains {
        let description = try? DomainDescription(xml: domain.xml)
        guard filter.admits(name: domain.name, metadataNamespaces: description?.metadataNamespaces) else { continue }
        var vm = info(domain, description)
        if let id = description?.id, Self.isActive(domain.state) {
          running.insert(DomainKey(name: domain.name, id: id))
          if case .capable = await pauseCapability(domain.name, id: id) { vm.vfioPause = true }
        }
        seen.append(vm)
      }
      guard listing == listings else { return seen }  // a newer listing started meanwhile: it decides
      pauseCapable = pauseCapable.filter { running.contains($0.key) }
      lastSeen = seen
      return seen
    case .failure(let failure):
      let reason = message(failure)
      return lastSeen.map {
        VirtualMachineInfo(
          name: $0.name, state: .unreachable, qemuStatus: $0.qemuStatus, qmpSocket: $0.qmpSocket,
          rootPorts: $0.rootPorts, freeRootPorts: 0, vfioPause: false, error: reason)
      }
    }
  }

  /// libvirt's domain states with a QEMU process: running, blocked, paused.
  private static func isActive(_ state: Int32) -> Bool { state == 1 || state == 2 || state == 3 }

  private func info(_ domain: DomainSnapshot, _ description: DomainDescription?) -> VirtualMachineInfo {
    // virDomainState: 1 running, 2 blocked, 3 paused, 4 shutting down, 5 shut off, 6 crashed,
    // 7 suspended by the guest's power management.
    let (state, status): (VirtualMachineInfo.State, String) =
      switch domain.state {
      case 1: (.running, "running")
      case 2: (.running, "blocked")
      case 3: (.paused, "paused")
      case 4: (.shutdown, "shutdown")
      case 5: (.shutdown, "shutoff")
      case 6: (.other, "crashed")
      case 7: (.other, "pmsuspended")
      default: (.other, "nostate")
      }
    let where_ = endpoint + (domain.persistent ? "" : " (transient)")
    guard let description else {
      return VirtualMachineInfo(
        name: domain.name, state: .other, qemuStatus: status, qmpSocket: where_,
        error: "libvirt's live XML of domain \(domain.name) could not be read")
    }
    guard (try? Validate.vmName(domain.name)) != nil else {
      // Listed, so the operator sees why nothing can be plugged into it.
      return VirtualMachineInfo(
        name: domain.name, state: .other, qemuStatus: status, qmpSocket: where_,
        rootPorts: description.hotPluggableRootPorts, freeRootPorts: 0,
        error: "the agent serves VM names of 1-64 of A-Z a-z 0-9 . _ -: rename the domain, or leave it out with "
          + "libvirt.domains")
    }
    return VirtualMachineInfo(
      name: domain.name, state: state, qemuStatus: status, qmpSocket: where_,
      rootPorts: description.hotPluggableRootPorts, freeRootPorts: description.freeRootPorts.count, vfioPause: false)
  }

  public func attach(vf: PCIAddress, to vm: String, deviceID: String) async throws(AgentError) -> String {
    let description = try await liveDescription(vm, doing: "reading the domain's XML")
    let definitionToo = try await changesDefinition(vm)
    let alias = DomainXML.alias(deviceID: deviceID)
    if let present = description.hostDevices.first(where: { $0.alias == alias }) {
      throw AgentError(
        .failedPrecondition,
        "VM \(vm) already holds a device with alias \(alias) (host \(present.source?.description ?? "?"))")
    }
    let free = description.freeRootPorts
    guard let port = free.first(where: { !(reserved[vm]?.contains($0.alias) ?? false) }) else {
      let fixed = description.rootPorts.filter { !$0.hotPluggable }.count
      throw AgentError(
        .resourceExhausted,
        "VM \(vm) has no free hot-pluggable root port (\(description.rootPorts.count - fixed) hot-pluggable, all "
          + "occupied or being attached to" + (fixed > 0 ? "; \(fixed) more with hotplug='off'" : "") + "): add "
          + "empty <controller type='pci' model='pcie-root-port'/> elements to the domain")
    }
    reserved[vm, default: []].insert(port.alias)
    defer { reserved[vm]?.remove(port.alias) }
    let xml = DomainXML.hostdev(vf: vf, alias: alias, bus: port.bus)
    let attached = await connection.withDomain(vm) { library, domain in
      // VIR_DOMAIN_AFFECT_LIVE (1): the running domain; with VIR_DOMAIN_AFFECT_CONFIG (2), its
      // persistent definition too (`libvirt.persistent_attach`).
      library.domainAttachDeviceFlags(domain, xml, definitionToo ? 3 : 1) == 0
        ? .success(()) : .failure(.libvirt(library.lastError()))
    }
    if case .failure(let failure) = attached {
      throw map(failure, vm: vm, doing: "the attach of VF \(vf) into \(port.alias)")
    }
    let after = try await liveDescription(vm, doing: "reading the domain's XML after the attach")
    guard after.hostDevices.contains(where: { $0.alias == alias }) else {
      throw AgentError(.internal, "libvirt accepted the attach of \(deviceID) to VM \(vm) but its XML does not list it")
    }
    return port.alias
  }

  public func detach(deviceID: String, from vm: String, timeout: Duration) async throws(AgentError) {
    try await detachLive(deviceID: deviceID, from: vm, timeout: timeout)
    guard try await changesDefinition(vm) else { return }
    // Out of the running domain: out of its definition too (where `persistent_attach` put it).
    let alias = DomainXML.alias(deviceID: deviceID)
    let removed = await connection.withDomain(vm) { library, domain in
      library.domainDetachDeviceAlias(domain, alias, 2) == 0 ? .success(()) : .failure(.libvirt(library.lastError()))
    }
    switch removed {
    case .success: return
    case .failure(.libvirt(let error)) where error.code == LibvirtError.deviceMissing: return  // attached live only
    case .failure(let failure):
      throw map(failure, vm: vm, doing: "the removal of \(deviceID) from the domain's persistent definition")
    }
  }

  /// Whether an attach or detach in `vm` changes its persistent definition too.
  private func changesDefinition(_ vm: String) async throws(AgentError) -> Bool {
    guard settings.persistentAttach else { return false }
    switch await connection.domain(vm) {
    case .success(let domain): return domain.persistent
    case .failure(let failure): throw map(failure, vm: vm, doing: "reading whether the domain is persistent")
    }
  }

  private func detachLive(deviceID: String, from vm: String, timeout: Duration) async throws(AgentError) {
    let alias = DomainXML.alias(deviceID: deviceID)
    let wait = connection.expectRemoval(of: alias, in: vm)
    defer { connection.forget(wait) }
    let requested = await connection.withDomain(vm) { library, domain in
      // VIR_DOMAIN_AFFECT_LIVE; returns once QEMU was asked: the guest's answer is an event.
      library.domainDetachDeviceAlias(domain, alias, 1) == 0 ? .success(()) : .failure(.libvirt(library.lastError()))
    }
    switch requested {
    case .success: break
    case .failure(.libvirt(let error)) where error.code == LibvirtError.deviceMissing:
      return  // already gone
    case .failure(.libvirt(let error)) where error.message.contains("already in the process of unplug"):
      break  // an earlier request is pending: keep waiting for the guest
    case .failure(let failure):
      throw map(failure, vm: vm, doing: "the detach of \(deviceID)")
    }
    let outcome = await wait.wait(timeout: timeout)
    switch outcome {
    case .event(.removed):
      return
    case .cancelled:
      throw AgentError(
        .unavailable,
        "the wait for VM \(vm) to acknowledge the unplug of \(deviceID) was abandoned (the agent is stopping or the "
          + "caller went away): the device stays in the guest, state detaching; retry DetachVF to keep waiting")
    case .timedOut, .event(.removalFailed):
      // An event missed while the connection was down: the live XML decides.
      if case .success(let domain) = await connection.domain(vm),
        let description = try? DomainDescription(xml: domain.xml),
        !description.hostDevices.contains(where: { $0.alias == alias })
      {
        return
      }
      let reported = outcome == .event(.removalFailed) ? " (libvirt reported DEVICE_REMOVAL_FAILED)" : ""
      throw AgentError(
        .unavailable,
        "VM \(vm) has not acknowledged the unplug of \(deviceID) within \(timeout)\(reported): the device stays in the "
          + "guest, state detaching; the guest OS must handle PCIe hot-unplug (retry DetachVF to keep waiting)")
    }
  }

  public func pluggedDevices() async -> [PluggedDevice] {
    await scanPluggedDevices().devices
  }

  public func scanPluggedDevices() async -> PluggedDeviceScan {
    guard case .success(let domains) = await connection.activeDomains() else {
      // libvirt did not answer: nothing is known of any domain's devices.
      return PluggedDeviceScan(devices: [], unread: Set(lastSeen.map(\.name)))
    }
    var devices: [PluggedDevice] = []
    var unread = Set<String>()
    for domain in domains {
      guard let description = try? DomainDescription(xml: domain.xml) else {
        unread.insert(domain.name)
        continue
      }
      guard filter.admits(name: domain.name, metadataNamespaces: description.metadataNamespaces) else {
        unread.insert(domain.name)  // not served: what it holds is not the agent's to judge
        continue
      }
      for device in description.hostDevices {
        guard let id = device.alias.flatMap(DomainXML.deviceID(alias:)) else { continue }
        devices.append(
          PluggedDevice(
            vm: domain.name, deviceID: id, host: device.source,
            rootPort: description.rootPorts.first { $0.bus == device.bus }?.alias))
      }
    }
    return PluggedDeviceScan(devices: devices, unread: unread)
  }

  public func pause(deviceID: String, in vm: String) async throws(AgentError) {
    try await pauseCommand(settings.pauseCommands.first, deviceID: deviceID, vm: vm, doing: "pause")
  }

  public func resume(deviceID: String, in vm: String) async throws(AgentError) {
    try await pauseCommand(settings.pauseCommands.last, deviceID: deviceID, vm: vm, doing: "resume")
  }

  /// `x-vfio-pause` / `x-vfio-resume` of the device whose qdev id is the agent's alias, through
  /// libvirt's monitor passthrough (opt-in). QEMU's refusal comes back with QEMU's text:
  /// `DeviceNotFound` as NOT_FOUND, any other as FAILED_PRECONDITION (a refused resume is then
  /// replaced by a replug of that device).
  private func pauseCommand(_ command: String?, deviceID: String, vm: String, doing: String) async throws(AgentError) {
    guard let qemu else {
      throw AgentError(
        .failedPrecondition,
        "libvirt VM \(vm) cannot \(doing) a VFIO device: libvirt.qemu_monitor_pause is off (the pause commands "
          + "go through libvirt's QEMU monitor passthrough, which marks the domain tainted: custom-monitor); "
          + "turn it on, or use the detach-reattach strategy")
    }
    guard settings.pauseCommands.count == 2, let command else {
      throw AgentError(.failedPrecondition, "qemu.pause_commands must name a pause and a resume command")
    }
    // A new pause only in a domain the agent serves; a resume always (the device is paused).
    let description =
      command == settings.pauseCommands.first
      ? try await liveDescription(vm, doing: "the \(command) of \(deviceID)")
      : try await runningDescription(vm, doing: "the \(command) of \(deviceID)")
    guard let id = description.id else {
      throw AgentError(.internal, "libvirt's live XML of running VM \(vm) has no domain id")
    }
    switch await pauseCapability(vm, id: id) {
    case .capable: break
    case .incapable:
      throw AgentError(
        .failedPrecondition,
        "the QEMU of libvirt VM \(vm) (\(description.emulator ?? "its emulator")) has no \(command) command: it "
          + "is not built with qemu/vfio-pause; use the detach-reattach strategy")
    case .unknown(let reason, _):
      throw AgentError(
        .unavailable, "the QEMU of libvirt VM \(vm) could not be asked for its commands (\(reason)); retry")
    }
    let text = MonitorQMP.command(command, id: DomainXML.alias(deviceID: deviceID))
    let sent = await qemu.connection.withDomain(vm) { library, domain in qemu.library.command(library, domain, text) }
    switch sent {
    case .failure(let failure):
      throw map(failure, vm: vm, doing: "the \(command) of \(deviceID)")
    case .success(let reply):
      do {
        _ = try MonitorQMP.result(reply)
      } catch let refusal as MonitorQMP.Refusal {
        throw AgentError(
          refusal.errorClass == "DeviceNotFound" ? .notFound : .failedPrecondition,
          "the QEMU of VM \(vm) refused the \(command) of \(deviceID): \(refusal.message)", cause: refusal.errorClass)
      } catch {
        throw AgentError(
          .internal, "libvirt returned an unreadable reply to the \(command) of \(deviceID) in VM \(vm): \(error)")
      }
    }
  }

  /// Whether the QEMU of running domain `name` (libvirt id `id`) has both pause commands: asked
  /// with `query-commands` once per start when `monitorPause` is on (else `incapable`). A
  /// question libvirt or QEMU could not answer is `unknown`, asked again after a while.
  private func pauseCapability(_ name: String, id: Int) async -> PauseCapability {
    guard let qemu, settings.pauseCommands.count == 2 else { return .incapable }
    let opens = connection.opens
    if opens != pauseCapableOpens {
      pauseCapable = [:]
      pauseCapableOpens = opens
    }
    let key = DomainKey(name: name, id: id)
    if let known = pauseCapable[key] {
      switch known {
      case .capable, .incapable: return known
      case .unknown(_, let at) where ContinuousClock.now - at < Self.retryUnknownPause: return known
      case .unknown: break
      }
    }
    let query = MonitorQMP.command("query-commands")
    let reply = await qemu.connection.withDomain(name) { library, domain in qemu.library.command(library, domain, query)
    }
    let answer: PauseCapability
    switch reply {
    case .failure(let failure):
      answer = .unknown(message(failure), .now)
    case .success(let text):
      do {
        answer = Set(settings.pauseCommands).isSubset(of: try MonitorQMP.commandNames(text)) ? .capable : .incapable
      } catch {
        answer = .unknown("its reply to query-commands could not be read: \(error)", .now)
      }
    }
    pauseCapable[key] = answer
    return answer
  }

  // MARK: Helpers

  /// The live XML of running domain `vm`, which the filters admit.
  private func liveDescription(_ vm: String, doing: String) async throws(AgentError) -> DomainDescription {
    let description = try await runningDescription(vm, doing: doing)
    guard filter.admits(name: vm, metadataNamespaces: description.metadataNamespaces) else {
      throw AgentError(
        .failedPrecondition,
        "libvirt domain \(vm) is not served by this agent (\(filter.description)): change the domain or the filter")
    }
    return description
  }

  /// The live XML of running domain `vm`, whatever the filters say.
  private func runningDescription(_ vm: String, doing: String) async throws(AgentError) -> DomainDescription {
    let domain: DomainSnapshot
    switch await connection.domain(vm) {
    case .success(let found): domain = found
    case .failure(let failure): throw map(failure, vm: vm, doing: doing)
    }
    guard Self.isActive(domain.state) else {
      throw AgentError(.failedPrecondition, "VM \(vm) is not running (libvirt domain state \(domain.state))")
    }
    do {
      return try DomainDescription(xml: domain.xml)
    } catch {
      throw AgentError(.internal, "libvirt's live XML of VM \(vm) could not be read: \(error)")
    }
  }

  private nonisolated func message(_ failure: LibvirtFailure) -> String {
    switch failure {
    case .disconnected(let reason): reason
    case .libvirt(let error): error.message
    }
  }

  /// libvirt's errors as the agent's, with libvirt's message: an unreachable daemon is
  /// UNAVAILABLE, an unknown domain or device NOT_FOUND, a refusal FAILED_PRECONDITION.
  func map(_ failure: LibvirtFailure, vm: String, doing: String) -> AgentError {
    switch failure {
    case .disconnected(let reason):
      return AgentError(.unavailable, "VM \(vm) is unreachable: \(reason)", cause: doing)
    case .libvirt(let error):
      return Self.map(error, vm: vm, uri: settings.uri, doing: doing)
    }
  }

  static func map(_ error: LibvirtError, vm: String, uri: String, doing: String) -> AgentError {
    let cause = "libvirt error \(error.code) (domain \(error.domain))"
    switch error.code {
    case LibvirtError.noDomain:
      return AgentError(.notFound, "VM \(vm) is not a libvirt domain at \(uri): \(error.message)", cause: cause)
    case LibvirtError.deviceMissing:
      return AgentError(.notFound, "libvirt found no such device in VM \(vm): \(error.message)", cause: cause)
    case LibvirtError.noConnect, LibvirtError.invalidConnection, LibvirtError.systemError, LibvirtError.rpc,
      LibvirtError.operationTimeout, LibvirtError.agentUnresponsive:
      return AgentError(
        .unavailable, "libvirt at \(uri) did not complete \(doing) in VM \(vm): \(error.message)", cause: cause)
    case LibvirtError.resourceBusy, LibvirtError.operationAborted:
      return AgentError(.aborted, "libvirt could not do \(doing) in VM \(vm) now: \(error.message)", cause: cause)
    case LibvirtError.noSupport:
      return AgentError(
        .unimplemented, "libvirt at \(uri) does not support \(doing) in VM \(vm): \(error.message)", cause: cause)
    case LibvirtError.xmlError, LibvirtError.xmlDetail, LibvirtError.invalidArgument:
      return AgentError(
        .internal, "libvirt rejected the agent's request for \(doing) in VM \(vm): \(error.message)", cause: cause)
    default:
      // CONFIG_UNSUPPORTED (no VFIO on this host), OPERATION_INVALID (not running),
      // OPERATION_FAILED, ACCESS_DENIED, …: the domain or host refuses; libvirt says why.
      return AgentError(.failedPrecondition, "libvirt refused \(doing) in VM \(vm): \(error.message)", cause: cause)
    }
  }
}
