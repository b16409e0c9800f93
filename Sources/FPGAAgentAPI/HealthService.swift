import FPGACore
public import GRPCCore
import Synchronization
import SwiftProtobuf

/// `grpc.health.v1.Health`: the serving status of the server ("") and of each service, set by
/// the daemon (SERVING once the platform is scanned, NOT_SERVING on shutdown).
public final class HealthService: Grpc_Health_V1_Health.SimpleServiceProtocol, Sendable {
  public typealias Status = Grpc_Health_V1_HealthCheckResponse.ServingStatus

  private struct State {
    var statuses: [String: Status] = [:]
    var watchers: [UInt64: (service: String, continuation: AsyncStream<Status>.Continuation)] = [:]
    var nextWatcher: UInt64 = 0
  }

  private let state = Mutex(State())

  /// Services start NOT_SERVING until the daemon says otherwise.
  public init(services: [String]) {
    state.withLock { state in
      for service in services + [""] { state.statuses[service] = .notServing }
    }
  }

  /// Sets one service's status and tells its watchers.
  public func set(_ service: String, _ status: Status) {
    let watchers = state.withLock { state in
      state.statuses[service] = status
      return state.watchers.values.filter { $0.service == service }.map(\.continuation)
    }
    for continuation in watchers { continuation.yield(status) }
  }

  /// Sets every known service's status.
  public func setAll(_ status: Status) {
    let services = state.withLock { Array($0.statuses.keys) }
    for service in services { set(service, status) }
  }

  public func status(of service: String) -> Status? { state.withLock { $0.statuses[service] } }

  public func check(
    request: Grpc_Health_V1_HealthCheckRequest, context: ServerContext
  ) async throws -> Grpc_Health_V1_HealthCheckResponse {
    guard let status = status(of: request.service) else {
      // Quoted and cut: the name is the caller's text, echoed into a header.
      throw RPCError(code: .notFound, message: "unknown service \(quoted(request.service))")
    }
    return .with { $0.status = status }
  }

  public func watch(
    request: Grpc_Health_V1_HealthCheckRequest,
    response: RPCWriter<Grpc_Health_V1_HealthCheckResponse>,
    context: ServerContext
  ) async throws {
    let (stream, continuation) = AsyncStream.makeStream(of: Status.self, bufferingPolicy: .bufferingNewest(1))
    let id = state.withLock { state in
      let id = state.nextWatcher
      state.nextWatcher += 1
      state.watchers[id] = (request.service, continuation)
      continuation.yield(state.statuses[request.service] ?? .serviceUnknown)
      return id
    }
    defer { state.withLock { _ = $0.watchers.removeValue(forKey: id) } }
    try await withRPCCancellationHandler {
      var last: Status?
      for await status in stream where status != last {
        last = status
        try await response.write(.with { $0.status = status })
      }
    } onCancelRPC: {
      continuation.finish()
    }
  }

  /// Ends every watch (on shutdown, after NOT_SERVING was sent).
  public func finishWatches() {
    let watchers = state.withLock { state in
      defer { state.watchers = [:] }
      return state.watchers.values.map(\.continuation)
    }
    for continuation in watchers { continuation.finish() }
  }
}
