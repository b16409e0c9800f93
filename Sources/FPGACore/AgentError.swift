/// The one error type of the agent. Every failure that can reach a client is an `AgentError`,
/// mapped to a gRPC status once, in the API layer.
public struct AgentError: Error, Hashable, Sendable, CustomStringConvertible {
  /// What kind of failure this is; each maps to one gRPC status code.
  public enum Code: String, Hashable, Sendable {
    /// The request is malformed: fix the request.
    case invalidArgument
    /// The object named does not exist.
    case notFound
    /// The object exists but is in the wrong state for this request.
    case failedPrecondition
    /// Nothing free satisfies the request.
    case resourceExhausted
    /// A concurrent change won; retrying may succeed.
    case aborted
    /// The platform or a dependency cannot be reached now.
    case unavailable
    /// The capability belongs to a part of the agent that is not built yet.
    case unimplemented
    /// A bug or an unexpected platform answer.
    case `internal`
  }

  public var code: Code
  /// A sentence a person can act on.
  public var message: String
  /// Lower-level detail (an errno, a QMP error class), if any.
  public var cause: String?

  public init(_ code: Code, _ message: String, cause: String? = nil) {
    self.code = code
    self.message = message
    self.cause = cause
  }

  public var description: String {
    cause.map { "\(code.rawValue): \(message) (\($0))" } ?? "\(code.rawValue): \(message)"
  }
}

/// `text` in double quotes, with control characters and long input cut, for error messages.
public func quoted(_ text: String) -> String {
  let printable = text.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7f ? "?" : String($0) }
    .joined()
  let cut = printable.count > 80 ? String(printable.prefix(80)) + "…" : printable
  return "\"" + cut + "\""
}
