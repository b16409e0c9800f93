import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif
import Logging
import ServiceLifecycle

/// The systemd notification protocol (sd_notify(3)): datagrams of `KEY=VALUE` lines sent to the
/// socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
public struct SystemdNotifySocket: Sendable {
  public let path: String

  /// The socket systemd gave this process, if any.
  public init?(environment: [String: String]) {
    guard let path = environment["NOTIFY_SOCKET"], path.hasPrefix("/") || path.hasPrefix("@") else { return nil }
    self.path = path
  }

  /// Sends one message; returns the errno on failure (0 when sent).
  @discardableResult
  public func send(_ message: String) -> Int32 {
    #if os(Linux)
      let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    #else
      let fd = socket(AF_UNIX, SOCK_DGRAM, 0)
    #endif
    guard fd >= 0 else { return errno }
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    var bytes = Array(path.utf8)
    if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
    let capacity = MemoryLayout.size(ofValue: address.sun_path)
    guard bytes.count < capacity else { return ENAMETOOLONG }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (index, byte) in bytes.enumerated() { raw[index] = byte }
    }
    // An abstract name is exactly as long as its bytes; a path carries its terminating zero.
    let length = MemoryLayout<sa_family_t>.size + bytes.count + (bytes.first == 0 ? 0 : 1)
    let sent = message.utf8CString.withUnsafeBufferPointer { text in
      withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
          sendto(fd, text.baseAddress, text.count - 1, Int32(MSG_NOSIGNAL), $0, socklen_t(length))
        }
      }
    }
    return sent < 0 ? errno : 0
  }
}

/// Tells systemd the agent is ready once its listeners are bound (`READY=1`), keeps its watchdog
/// fed while the node engine answers (`WATCHDOG=1` every half `WATCHDOG_USEC`), and says
/// `STOPPING=1` when a graceful shutdown begins. Placed last in the service group, so it is the
/// first told to stop. Without `NOTIFY_SOCKET` it does nothing.
struct SystemdNotifier: Service {
  let socket: SystemdNotifySocket?
  let watchdogInterval: Duration?
  let logger: Logger
  /// Returns once every listener is bound.
  let listening: @Sendable () async throws -> Void
  /// Returns once the engine has answered; a wedged engine starves the watchdog.
  let alive: @Sendable () async -> String

  init(
    environment: [String: String], logger: Logger, listening: @escaping @Sendable () async throws -> Void,
    alive: @escaping @Sendable () async -> String
  ) {
    socket = SystemdNotifySocket(environment: environment)
    if let micros = environment["WATCHDOG_USEC"].flatMap(Int64.init), micros > 0,
      environment["WATCHDOG_PID"].flatMap(Int32.init).map({ $0 == getpid() }) ?? true
    {
      watchdogInterval = .microseconds(micros / 2)
    } else {
      watchdogInterval = nil
    }
    self.logger = logger
    self.listening = listening
    self.alive = alive
  }

  func run() async throws {
    guard let socket else {
      try? await gracefulShutdown()
      return
    }
    try await listening()
    let status = await alive()
    notify(socket, "READY=1\nSTATUS=serving: \(status)\nMAINPID=\(getpid())")
    if let watchdogInterval {
      for await _ in PeriodicTicks(interval: watchdogInterval).cancelOnGracefulShutdown() {
        let status = await alive()
        notify(socket, "WATCHDOG=1\nSTATUS=serving: \(status)")
      }
    } else {
      try? await gracefulShutdown()
    }
    notify(socket, "STOPPING=1\nSTATUS=stopping")
  }

  private func notify(_ socket: SystemdNotifySocket, _ message: String) {
    let failure = socket.send(message)
    if failure != 0 {
      logger.warning(
        "cannot notify systemd", metadata: ["fpga.socket": "\(socket.path)", "fpga.errno": "\(failure)"])
    }
  }
}
