#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif
import Foundation
import Synchronization

/// A client of the QEMU Machine Protocol over a Unix socket: the greeting and
/// `qmp_capabilities`, commands matched to replies by id, events, timeouts, and QEMU's errors
/// turned into `QMPError`s. A reader thread owns the socket's input; callers never block a
/// thread. When QEMU goes away every pending command fails with `.disconnected`; reconnecting
/// is making a new client.
public final class QMPClient: Sendable {
  public let path: String
  /// QEMU's greeting (`{"QMP": {"version": …, "capabilities": …}}`).
  public let greeting: JSONValue
  /// Every event QEMU sends, until the connection ends.
  public let events: AsyncStream<QMPEvent>

  private let connection: Connection

  /// Connects, reads the greeting and negotiates capabilities.
  public static func connect(path: String, timeout: Duration = .seconds(5)) async throws(QMPError) -> QMPClient {
    let connection = try Connection.open(path: path)
    let (events, continuation) = AsyncStream.makeStream(of: QMPEvent.self, bufferingPolicy: .bufferingNewest(1024))
    connection.start(events: continuation)
    let greeting = try await connection.greeting(timeout: timeout)
    let client = QMPClient(path: path, greeting: greeting, events: events, connection: connection)
    _ = try await client.execute("qmp_capabilities", timeout: timeout)
    return client
  }

  private init(path: String, greeting: JSONValue, events: AsyncStream<QMPEvent>, connection: Connection) {
    self.path = path
    self.greeting = greeting
    self.events = events
    self.connection = connection
  }

  deinit { connection.shutdown() }

  /// QEMU's version as "major.minor.micro".
  public var version: String {
    let qemu = greeting["QMP"]?["version"]?["qemu"]
    return [qemu?["major"], qemu?["minor"], qemu?["micro"]].map { $0?.intValue.map(String.init) ?? "?" }
      .joined(separator: ".")
  }

  /// Runs a command; returns its `return` value.
  public func execute(_ command: String, _ arguments: JSONValue? = nil, timeout: Duration = .seconds(5))
    async throws(QMPError) -> JSONValue
  {
    try await connection.execute(command, arguments, timeout: timeout)
  }

  /// Starts waiting for an event (register before sending the command that causes it).
  public func expectEvent(_ name: String, where predicate: @escaping @Sendable (JSONValue) -> Bool = { _ in true })
    -> EventExpectation
  {
    connection.expect(name: name, predicate: predicate)
  }

  /// Whether the connection is still open.
  public var isConnected: Bool { connection.isOpen }

  /// Closes the connection; pending commands fail with `.disconnected`.
  public func close() { connection.shutdown() }
}

/// A pending wait for one event.
public final class EventExpectation: Sendable {
  fileprivate let id: UInt64
  fileprivate let connection: Connection

  fileprivate init(id: UInt64, connection: Connection) {
    self.id = id
    self.connection = connection
  }

  /// The event's data, or `.timeout` / `.disconnected`.
  public func wait(timeout: Duration) async throws(QMPError) -> JSONValue {
    try await connection.wait(expectation: id, timeout: timeout)
  }

  /// Stops waiting.
  public func cancel() { connection.cancel(expectation: id) }
}

/// The socket, the reader thread, and the tables of pending replies and event waits.
fileprivate final class Connection: Sendable {
  struct Waiter {
    var name: String
    var predicate: @Sendable (JSONValue) -> Bool
    var result: Result<JSONValue, QMPError>?
    var continuation: CheckedContinuation<JSONValue, any Error>?
  }

  struct State {
    var open = true
    var greeting: Result<JSONValue, QMPError>?
    var greetingContinuation: CheckedContinuation<JSONValue, any Error>?
    var pending: [String: CheckedContinuation<JSONValue, any Error>] = [:]
    var waiters: [UInt64: Waiter] = [:]
    var nextID: UInt64 = 1
    var events: AsyncStream<QMPEvent>.Continuation?
  }

  let fd: Int32
  let path: String
  private let state = Mutex(State())
  /// True while `fd` is ours. Every use of the descriptor (send, shutdown, close) happens under
  /// this lock, so a closed descriptor number, reused by someone else, is never touched.
  private let descriptorOpen = Mutex(true)

  private init(fd: Int32, path: String) {
    self.fd = fd
    self.path = path
  }

  static func open(path: String) throws(QMPError) -> Connection {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw QMPError(.connectFailed, "socket(): \(String(cString: strerror(errno)))") }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
      close(fd)
      throw QMPError(.connectFailed, "QMP socket path \(path) is longer than a Unix socket path may be")
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (index, byte) in bytes.enumerated() { raw[index] = byte }
    }
    let result = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    guard result == 0 else {
      let code = errno
      close(fd)
      throw QMPError(.connectFailed, "cannot connect to QMP socket \(path): \(String(cString: strerror(code)))")
    }
    return Connection(fd: fd, path: path)
  }

  var isOpen: Bool { state.withLock { $0.open } }

  func start(events: AsyncStream<QMPEvent>.Continuation) {
    state.withLock { $0.events = events }
    let thread = Thread { [self] in self.readLoop() }
    thread.name = "qmp reader \(path)"
    thread.start()
  }

  func greeting(timeout: Duration) async throws(QMPError) -> JSONValue {
    let timer = Task { [self] in
      try? await Task.sleep(for: timeout)
      self.failGreeting(QMPError(.timeout, "QEMU sent no QMP greeting on \(path) within \(timeout)"))
    }
    defer { timer.cancel() }
    do {
      return try await withCheckedThrowingContinuation { continuation in
        let ready: Result<JSONValue, QMPError>? = state.withLock { state in
          if let greeting = state.greeting { return greeting }
          state.greetingContinuation = continuation
          return nil
        }
        if let ready { continuation.resume(with: ready.mapError { $0 as any Error }) }
      }
    } catch {
      throw error as? QMPError ?? QMPError(.protocolViolation, "\(error)")
    }
  }

  private func failGreeting(_ error: QMPError) {
    let continuation = state.withLock { state -> CheckedContinuation<JSONValue, any Error>? in
      if state.greeting == nil { state.greeting = .failure(error) }
      defer { state.greetingContinuation = nil }
      return state.greetingContinuation
    }
    continuation?.resume(throwing: error)
  }

  func execute(_ command: String, _ arguments: JSONValue?, timeout: Duration) async throws(QMPError) -> JSONValue {
    let id = state.withLock { state -> String in
      defer { state.nextID += 1 }
      return "fpga-\(state.nextID)"
    }
    var message: [String: JSONValue] = ["execute": .string(command), "id": .string(id)]
    if let arguments { message["arguments"] = arguments }
    let line = JSONValue.object(message).serialized + Data("\n".utf8)
    let timer = Task { [self] in
      try? await Task.sleep(for: timeout)
      self.fail(id: id, QMPError(.timeout, "QEMU did not answer \(command) within \(timeout)"))
    }
    defer { timer.cancel() }
    let cancelled = QMPError(.cancelled, "\(command) was abandoned: the caller was cancelled")
    do {
      return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { continuation in
          let open = state.withLock { state -> Bool in
            guard state.open else { return false }
            state.pending[id] = continuation
            return true
          }
          guard open else {
            continuation.resume(throwing: QMPError(.disconnected, "the QMP connection to \(path) is closed"))
            return
          }
          if Task.isCancelled {
            fail(id: id, cancelled)
          } else if !send(line) {
            fail(id: id, QMPError(.disconnected, "QEMU closed the QMP connection \(path) while \(command) was sent"))
          }
        }
      } onCancel: {
        self.fail(id: id, cancelled)
      }
    } catch {
      throw error as? QMPError ?? QMPError(.protocolViolation, "\(error)")
    }
  }

  private func send(_ data: Data) -> Bool {
    descriptorOpen.withLock { open in
      guard open else { return false }
      return data.withUnsafeBytes { raw -> Bool in
        var offset = 0
        while offset < raw.count {
          let count = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
          if count < 0 {
            if errno == EINTR { continue }
            return false
          }
          offset += count
        }
        return true
      }
    }
  }

  private func fail(id: String, _ error: QMPError) {
    let continuation = state.withLock { $0.pending.removeValue(forKey: id) }
    continuation?.resume(throwing: error)
  }

  func expect(name: String, predicate: @escaping @Sendable (JSONValue) -> Bool) -> EventExpectation {
    let id = state.withLock { state -> UInt64 in
      defer { state.nextID += 1 }
      state.waiters[state.nextID] = Waiter(
        name: name, predicate: predicate,
        result: state.open ? nil : .failure(QMPError(.disconnected, "the QMP connection to \(path) is closed")))
      return state.nextID
    }
    return EventExpectation(id: id, connection: self)
  }

  func wait(expectation id: UInt64, timeout: Duration) async throws(QMPError) -> JSONValue {
    let timer = Task { [self] in
      try? await Task.sleep(for: timeout)
      self.finish(expectation: id, .failure(QMPError(.timeout, "no event within \(timeout)")))
    }
    defer { timer.cancel() }
    do {
      return try await withTaskCancellationHandler {
        try await waitForEvent(expectation: id)
      } onCancel: {
        self.finish(expectation: id, .failure(QMPError(.cancelled, "the wait for an event was cancelled")))
      }
    } catch {
      throw error as? QMPError ?? QMPError(.protocolViolation, "\(error)")
    }
  }

  private func waitForEvent(expectation id: UInt64) async throws -> JSONValue {
    try await withCheckedThrowingContinuation { continuation in
      let ready = state.withLock { state -> Result<JSONValue, QMPError>?? in
        guard var waiter = state.waiters[id] else { return .some(nil) }
        if let result = waiter.result {
          state.waiters[id] = nil
          return .some(result)
        }
        waiter.continuation = continuation
        state.waiters[id] = waiter
        return .none
      }
      switch ready {
      case .none:
        if Task.isCancelled {
          finish(expectation: id, .failure(QMPError(.cancelled, "the wait for an event was cancelled")))
        }
      case .some(nil): continuation.resume(throwing: QMPError(.protocolViolation, "this event was already waited for"))
      case .some(let result?): continuation.resume(with: result.mapError { $0 as any Error })
      }
    }
  }

  func cancel(expectation id: UInt64) {
    finish(expectation: id, .failure(QMPError(.timeout, "cancelled")))
    state.withLock { _ = $0.waiters.removeValue(forKey: id) }
  }

  /// Resolves a waiter: resumes it if it waits, or keeps the result for `wait`.
  private func finish(expectation id: UInt64, _ result: Result<JSONValue, QMPError>) {
    let continuation = state.withLock { state -> CheckedContinuation<JSONValue, any Error>? in
      guard var waiter = state.waiters[id], waiter.result == nil else { return nil }
      if let continuation = waiter.continuation {
        state.waiters[id] = nil
        return continuation
      }
      waiter.result = result
      state.waiters[id] = waiter
      return nil
    }
    continuation?.resume(with: result.mapError { $0 as any Error })
  }

  func shutdown() {
    descriptorOpen.withLock { open in
      if open { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }
    }
  }

  // MARK: Reading

  private func readLoop() {
    var buffer = Data()
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
      let count = Glibc.read(fd, &chunk, chunk.count)
      if count < 0 && errno == EINTR { continue }
      if count <= 0 { break }
      buffer.append(contentsOf: chunk[0..<count])
      while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
        let line = buffer[buffer.startIndex..<newline]
        buffer.removeSubrange(buffer.startIndex...newline)
        if line.allSatisfy({ $0 == UInt8(ascii: "\r") || $0 == UInt8(ascii: " ") }) { continue }
        dispatch(Data(line))
      }
    }
    descriptorOpen.withLock { open in
      open = false
      close(fd)
    }
    closed()
  }

  private func dispatch(_ line: Data) {
    guard let message = try? JSONValue.parse(line) else { return }
    if message["QMP"] != nil {
      let continuation = state.withLock { state -> CheckedContinuation<JSONValue, any Error>? in
        if state.greeting == nil { state.greeting = .success(message) }
        defer { state.greetingContinuation = nil }
        return state.greetingContinuation
      }
      continuation?.resume(returning: message)
    } else if let event = message["event"]?.stringValue {
      let data = message["data"] ?? .object([:])
      let (stream, matched) = state.withLock { state in
        (
          state.events,
          state.waiters.filter { $0.value.result == nil && $0.value.name == event && $0.value.predicate(data) }.map(
            \.key)
        )
      }
      stream?.yield(QMPEvent(name: event, data: data))
      for id in matched { finish(expectation: id, .success(data)) }
    } else if let id = message["id"]?.stringValue {
      let continuation = state.withLock { $0.pending.removeValue(forKey: id) }
      if let error = message["error"] {
        continuation?.resume(
          throwing: QMPError(
            .commandFailed, error["desc"]?.stringValue ?? "\(error)", errorClass: error["class"]?.stringValue))
      } else {
        continuation?.resume(returning: message["return"] ?? .null)
      }
    }
  }

  private func closed() {
    let error = QMPError(.disconnected, "QEMU closed the QMP connection \(path) (it exited or was killed)")
    let (pending, waiters, greeting, events) = state.withLock { state in
      state.open = false
      defer {
        state.pending = [:]
        state.greetingContinuation = nil
      }
      if state.greeting == nil { state.greeting = .failure(error) }
      return (Array(state.pending.values), Array(state.waiters.keys), state.greetingContinuation, state.events)
    }
    greeting?.resume(throwing: error)
    for continuation in pending { continuation.resume(throwing: error) }
    for id in waiters { finish(expectation: id, .failure(error)) }
    events?.finish()
  }
}
