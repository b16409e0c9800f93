import Dispatch
import Foundation
import Synchronization

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// Why a call through libvirt failed: no connection (libvirtd down, the URI unreachable), or
/// libvirt's own error.
enum LibvirtFailure: Error, Hashable, Sendable {
  case disconnected(String)
  case libvirt(LibvirtError)
}

/// A domain as one listing saw it.
struct DomainSnapshot: Hashable, Sendable {
  var name: String
  /// `virDomainState`.
  var state: Int32
  var persistent: Bool
  var xml: String
}

/// What libvirt said about a device of a domain (`DEVICE_REMOVED`, `DEVICE_REMOVAL_FAILED`).
enum DeviceEvent: Hashable, Sendable {
  case removed, removalFailed
}

/// One connection to libvirtd: every call runs on one serial queue (libvirt's calls block on
/// the daemon's answer; none runs on Swift's cooperative threads), events arrive on libvirt's
/// default event loop, run by a thread of the agent's own. The connection is opened on first use
/// and reopened after libvirtd closes it (a restart, keepalive expiry); `closes` says when.
final class LibvirtConnection: Sendable {
  let library: LibvirtLibrary
  let uri: String
  private let queue = DispatchQueue(label: "fpga-agent.libvirt.calls")
  /// Touched only on `queue` (the pointer) and in callbacks (the flag).
  private let state = Mutex(State())
  private let waiters = Mutex<[ObjectIdentifier: DeviceWait]>([:])
  /// A domain started, stopped, paused, resumed, was defined or undefined, its metadata changed,
  /// or a device came or went; also the connection was lost or regained. Coalesced.
  let changes: AsyncStream<Void>
  private let changed: AsyncStream<Void>.Continuation
  /// libvirtd closed the connection.
  let closes: AsyncStream<Void>
  private let closed: AsyncStream<Void>.Continuation

  /// A `virConnectPtr`: used only on the calls queue.
  private struct Handle: @unchecked Sendable {
    let pointer: OpaquePointer
  }

  private struct State {
    var connection: Handle?
    var callbackIDs: [Int32] = []
    /// libvirt said the connection closed; it is released and reopened on the queue.
    var lost = false
    var lastFailure: String?
    /// Connections opened since the start (the first, then one per reconnect).
    var opens = 0
  }

  /// Whether this connection registers for domain events (the monitor connection does not).
  private let events: Bool

  init(library: LibvirtLibrary, uri: String, events: Bool = true) {
    self.library = library
    self.uri = uri
    self.events = events
    (changes, changed) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    (closes, closed) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    LibvirtEventLoop.start(library)
  }

  /// True when a connection is open and libvirt has not reported it closed.
  var isOpen: Bool { state.withLock { $0.connection != nil && !$0.lost } }

  /// Why the last attempt to connect failed, or why the connection was lost.
  var lastFailure: String? { state.withLock { $0.lastFailure } }

  /// Connections opened since the start: the first, then one per reconnect.
  var opens: Int { state.withLock { $0.opens } }

  // MARK: Calls

  /// Runs `body` on the calls queue with an open connection (opening it if needed).
  func call<T: Sendable>(
    _ body: @escaping @Sendable (LibvirtLibrary, OpaquePointer) -> Result<T, LibvirtFailure>
  ) async -> Result<T, LibvirtFailure> {
    await withCheckedContinuation { continuation in
      queue.async {
        switch self.openOnQueue() {
        case .success(let connection): continuation.resume(returning: body(self.library, connection))
        case .failure(let failure): continuation.resume(returning: .failure(failure))
        }
      }
    }
  }

  /// Opens the connection now unless it is open (the reconnect loop's step).
  func connect() async -> Result<Void, LibvirtFailure> {
    await call { _, _ in .success(()) }
  }

  /// Every active domain (running, paused, …) with its state and live XML. A domain that
  /// vanishes during the listing is left out.
  func activeDomains() async -> Result<[DomainSnapshot], LibvirtFailure> {
    await call { library, connection in
      var list: UnsafeMutablePointer<OpaquePointer?>?
      let count = library.connectListAllDomains(connection, &list, 1)  // VIR_CONNECT_LIST_DOMAINS_ACTIVE
      guard count >= 0, let list else { return .failure(.libvirt(library.lastError())) }
      defer { free(list) }
      var domains: [DomainSnapshot] = []
      for index in 0..<Int(count) {
        guard let domain = list[index] else { continue }
        defer { _ = library.domainFree(domain) }
        if case .success(let snapshot) = Self.snapshot(library, domain) { domains.append(snapshot) }
      }
      return .success(domains.sorted { $0.name < $1.name })
    }
  }

  /// One domain by name (active or not).
  func domain(_ name: String) async -> Result<DomainSnapshot, LibvirtFailure> {
    await withDomain(name) { library, domain in Self.snapshot(library, domain) }
  }

  func withDomain<T: Sendable>(
    _ name: String, _ body: @escaping @Sendable (LibvirtLibrary, OpaquePointer) -> Result<T, LibvirtFailure>
  ) async -> Result<T, LibvirtFailure> {
    await call { library, connection in
      guard let domain = library.domainLookupByName(connection, name) else {
        return .failure(.libvirt(library.lastError()))
      }
      defer { _ = library.domainFree(domain) }
      return body(library, domain)
    }
  }

  private static func snapshot(_ library: LibvirtLibrary, _ domain: OpaquePointer) -> Result<
    DomainSnapshot, LibvirtFailure
  > {
    guard let name = library.domainGetName(domain).map({ String(cString: $0) }) else {
      return .failure(.libvirt(library.lastError()))
    }
    var state: Int32 = 0
    var reason: Int32 = 0
    guard library.domainGetState(domain, &state, &reason, 0) == 0 else {
      return .failure(.libvirt(library.lastError()))
    }
    guard let xml = library.domainGetXMLDesc(domain, 0) else { return .failure(.libvirt(library.lastError())) }
    defer { free(xml) }
    let persistent = library.domainIsPersistent(domain) == 1
    return .success(DomainSnapshot(name: name, state: state, persistent: persistent, xml: String(cString: xml)))
  }

  // MARK: Device events

  /// Starts listening for `DEVICE_REMOVED` / `DEVICE_REMOVAL_FAILED` of `alias` in `domain`
  /// (before the request, so that a quick answer is not missed).
  func expectRemoval(of alias: String, in domain: String) -> DeviceWait {
    let wait = DeviceWait(domain: domain, alias: alias)
    waiters.withLock { $0[ObjectIdentifier(wait)] = wait }
    return wait
  }

  func forget(_ wait: DeviceWait) {
    _ = waiters.withLock { $0.removeValue(forKey: ObjectIdentifier(wait)) }
  }

  fileprivate func deviceEvent(_ event: DeviceEvent, domain: String, alias: String) {
    let matching = waiters.withLock { $0.values.filter { $0.domain == domain && $0.alias == alias } }
    for wait in matching { wait.resolve(.event(event)) }
    changed.yield()
  }

  fileprivate func lifecycleEvent() { changed.yield() }

  fileprivate func connectionClosed(reason: Int32) {
    // virConnectCloseReason: 0 error, 1 end of file, 2 keepalive, 3 client.
    let why = ["an error on the connection", "libvirtd closed it", "keepalive timeout", "closed by the agent"]
    state.withLock {
      $0.lost = true
      $0.lastFailure = "the connection to libvirt at \(uri) was lost (\(why[safe: Int(reason)] ?? "reason \(reason)"))"
    }
    closed.yield()
    changed.yield()
  }

  // MARK: Opening and releasing (on the queue)

  private func openOnQueue() -> Result<OpaquePointer, LibvirtFailure> {
    dispatchPrecondition(condition: .onQueue(queue))
    let (current, lost) = state.withLock { ($0.connection?.pointer, $0.lost) }
    if let current, !lost, library.connectIsAlive(current) == 1 { return .success(current) }
    if current != nil { releaseOnQueue() }
    guard let connection = library.connectOpen(uri) else {
      let failure = "libvirt at \(uri) is unreachable: \(library.lastError().message)"
      state.withLock { $0.lastFailure = failure }
      return .failure(.disconnected(failure))
    }
    // Keepalive: a daemon that stops answering is noticed within about 15 s (5 s × 3).
    _ = library.connectSetKeepAlive(connection, 5, 3)
    let opaque = Unmanaged.passRetained(self).toOpaque()
    if library.connectRegisterCloseCallback(connection, LibvirtCallbacks.close, opaque, LibvirtCallbacks.release) != 0 {
      Unmanaged<LibvirtConnection>.fromOpaque(opaque).release()
    }
    var ids: [Int32] = []
    let events: [(Int32, UnsafeRawPointer)] = [
      (0, unsafeBitCast(LibvirtCallbacks.lifecycle, to: UnsafeRawPointer.self)),  // LIFECYCLE
      (15, unsafeBitCast(LibvirtCallbacks.removed, to: UnsafeRawPointer.self)),  // DEVICE_REMOVED
      (19, unsafeBitCast(LibvirtCallbacks.added, to: UnsafeRawPointer.self)),  // DEVICE_ADDED
      (22, unsafeBitCast(LibvirtCallbacks.removalFailed, to: UnsafeRawPointer.self)),  // DEVICE_REMOVAL_FAILED
      // METADATA_CHANGE: a domain tagged or untagged for `libvirt.metadata_namespace`.
      (23, unsafeBitCast(LibvirtCallbacks.metadata, to: UnsafeRawPointer.self)),
    ]
    for (id, callback) in self.events ? events : [] {
      let opaque = Unmanaged.passRetained(self).toOpaque()
      let registered = library.connectDomainEventRegisterAny(
        connection, nil, id, callback, opaque, LibvirtCallbacks.release)
      if registered >= 0 {
        ids.append(registered)
      } else {
        Unmanaged<LibvirtConnection>.fromOpaque(opaque).release()
      }
    }
    state.withLock {
      $0.connection = Handle(pointer: connection)
      $0.callbackIDs = ids
      $0.lost = false
      $0.lastFailure = nil
      $0.opens += 1
    }
    changed.yield()
    return .success(connection)
  }

  private func releaseOnQueue() {
    let (connection, ids) = state.withLock { state in
      defer {
        state.connection = nil
        state.callbackIDs = []
      }
      return (state.connection, state.callbackIDs)
    }
    guard let connection = connection?.pointer else { return }
    for id in ids { _ = library.connectDomainEventDeregisterAny(connection, id) }
    _ = library.connectUnregisterCloseCallback(connection, LibvirtCallbacks.close)
    _ = library.connectClose(connection)
  }
}

/// Waits for libvirt's answer to one unplug request.
final class DeviceWait: Sendable {
  enum Outcome: Hashable, Sendable {
    case event(DeviceEvent)
    case timedOut
    case cancelled
  }

  let domain: String
  let alias: String
  private let state = Mutex<(outcome: Outcome?, continuation: CheckedContinuation<Outcome, Never>?)>((nil, nil))

  init(domain: String, alias: String) {
    self.domain = domain
    self.alias = alias
  }

  /// The first outcome wins; later ones are ignored.
  func resolve(_ outcome: Outcome) {
    let continuation = state.withLock { state -> CheckedContinuation<Outcome, Never>? in
      guard state.outcome == nil else { return nil }
      state.outcome = outcome
      defer { state.continuation = nil }
      return state.continuation
    }
    continuation?.resume(returning: outcome)
  }

  /// The event, or `timedOut` after `timeout`, or `cancelled` if the caller goes away.
  func wait(timeout: Duration) async -> Outcome {
    await withTaskGroup(of: Outcome?.self) { group in
      group.addTask {
        await withTaskCancellationHandler {
          await withCheckedContinuation { continuation in
            let ready = self.state.withLock { state -> Outcome? in
              if let outcome = state.outcome { return outcome }
              state.continuation = continuation
              return nil
            }
            if let ready { continuation.resume(returning: ready) }
          }
        } onCancel: {
          self.resolve(.cancelled)
        }
      }
      group.addTask {
        try? await Task.sleep(for: timeout)
        return Task.isCancelled ? nil : .timedOut
      }
      var result: Outcome = .cancelled
      for await outcome in group {
        guard let outcome else { continue }
        result = outcome
        break
      }
      // The first answer decides: a timeout ends the event wait, an event ends the sleep.
      resolve(result)
      group.cancelAll()
      return Task.isCancelled ? .cancelled : result
    }
  }
}

/// libvirt's default event loop (`virEventRegisterDefaultImpl`, then `virEventRunDefaultImpl`
/// forever), on a thread the agent starts once per process, before the first connection.
/// libvirt's event implementation is process-wide and cannot be unregistered, so the thread
/// lives as long as the process.
enum LibvirtEventLoop {
  private static let started = Mutex(false)

  static func start(_ library: LibvirtLibrary) {
    let first = started.withLock { started in
      defer { started = true }
      return !started
    }
    guard first else { return }
    _ = library.eventRegisterDefaultImpl()
    let thread = Thread {
      while true { _ = library.eventRunDefaultImpl() }
    }
    thread.name = "fpga-agent libvirt events"
    thread.start()
  }
}

/// The C callbacks libvirt calls on its event loop thread; `opaque` is the connection.
private enum LibvirtCallbacks {
  static func connection(_ opaque: UnsafeMutableRawPointer?) -> LibvirtConnection? {
    opaque.map { Unmanaged<LibvirtConnection>.fromOpaque($0).takeUnretainedValue() }
  }

  static func name(_ library: LibvirtLibrary, _ domain: OpaquePointer?) -> String {
    domain.flatMap { library.domainGetName($0) }.map { String(cString: $0) } ?? ""
  }

  static let release: LibvirtLibrary.FreeCallback = { opaque in
    if let opaque { Unmanaged<LibvirtConnection>.fromOpaque(opaque).release() }
  }

  static let close: LibvirtLibrary.CloseCallback = { _, reason, opaque in
    connection(opaque)?.connectionClosed(reason: reason)
  }

  static let lifecycle: LibvirtLibrary.LifecycleCallback = { _, _, _, _, opaque in
    connection(opaque)?.lifecycleEvent()
    return 0
  }

  static let removed: LibvirtLibrary.DeviceCallback = { _, domain, alias, opaque in
    guard let connection = connection(opaque), let alias else { return }
    connection.deviceEvent(.removed, domain: name(connection.library, domain), alias: String(cString: alias))
  }

  static let removalFailed: LibvirtLibrary.DeviceCallback = { _, domain, alias, opaque in
    guard let connection = connection(opaque), let alias else { return }
    connection.deviceEvent(.removalFailed, domain: name(connection.library, domain), alias: String(cString: alias))
  }

  static let added: LibvirtLibrary.DeviceCallback = { _, _, _, opaque in
    connection(opaque)?.lifecycleEvent()
  }

  static let metadata: LibvirtLibrary.MetadataCallback = { _, _, _, _, opaque in
    connection(opaque)?.lifecycleEvent()
  }
}

extension Array {
  fileprivate subscript(safe index: Int) -> Element? { indices.contains(index) ? self[index] : nil }
}
