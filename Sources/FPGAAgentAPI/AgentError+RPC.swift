public import FPGACore
public import GRPCCore

/// The one place where the agent's errors become gRPC statuses.
extension AgentError: RPCErrorConvertible {
  public var rpcErrorCode: RPCError.Code {
    switch code {
    case .invalidArgument: .invalidArgument
    case .notFound: .notFound
    case .failedPrecondition: .failedPrecondition
    case .resourceExhausted: .resourceExhausted
    case .aborted: .aborted
    case .unavailable: .unavailable
    case .unimplemented: .unimplemented
    case .internal: .internalError
    }
  }

  /// Marks errors raised by the agent itself, so clients tell them from transport failures.
  public var rpcErrorMetadata: Metadata { ["fpga-error-source": "agent"] }

  public var rpcErrorMessage: String {
    cause.map { "\(message) (\($0))" } ?? message
  }
}
