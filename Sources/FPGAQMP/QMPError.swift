/// A failure talking to QEMU, precise enough to tell the user what happened.
public struct QMPError: Error, Hashable, Sendable, CustomStringConvertible {
  public enum Kind: String, Hashable, Sendable {
    /// The socket could not be reached (QEMU not running, wrong path).
    case connectFailed
    /// QEMU closed the connection (exited or was killed).
    case disconnected
    /// No reply within the time allowed.
    case timeout
    /// The waiting task was cancelled (the agent is stopping, or the caller went away).
    case cancelled
    /// QEMU answered with an error (`errorClass` and the message are QEMU's own).
    case commandFailed
    /// Something that is not QMP arrived.
    case protocolViolation
  }

  public var kind: Kind
  public var message: String
  /// QEMU's error class (`GenericError`, `DeviceNotFound`, `CommandNotFound`, …) for commandFailed.
  public var errorClass: String?

  public init(_ kind: Kind, _ message: String, errorClass: String? = nil) {
    self.kind = kind
    self.message = message
    self.errorClass = errorClass
  }

  public var description: String {
    errorClass.map { "\(kind.rawValue) (\($0)): \(message)" } ?? "\(kind.rawValue): \(message)"
  }
}

/// An asynchronous event from QEMU (`DEVICE_DELETED`, `STOP`, `RESUME`, `SHUTDOWN`, …).
public struct QMPEvent: Hashable, Sendable {
  public var name: String
  public var data: JSONValue

  public init(name: String, data: JSONValue) {
    self.name = name
    self.data = data
  }
}
