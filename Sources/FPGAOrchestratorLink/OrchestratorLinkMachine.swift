package import FPGACore

/// The orchestrator link's connection as a value: events go in (dialing, welcomed, an
/// acknowledgement, the stream ended, stopped), the status clients see and what to do next come
/// out. It performs nothing itself, like `ReconfigureMachine`: `OrchestratorLink` dials, waits
/// and reports.
package struct OrchestratorLinkMachine: Hashable, Sendable {
  /// What `GetNodeStatus` shows of the link.
  package private(set) var status = OrchestratorLinkStatus()
  /// Streams that ended without a welcome since the last one that was welcomed.
  package private(set) var failures = 0
  /// The stream under way was welcomed.
  private var welcomedNow = false

  /// After a stream ended: wait this long, then dial again.
  package enum Next: Hashable, Sendable {
    case redial(after: Duration)
  }

  package init(address: String) {
    status.address = address
  }

  /// A new stream is being opened.
  package mutating func dialing(at now: WallTime) {
    status.state = .connecting
    status.since = now
    welcomedNow = false
  }

  /// The orchestrator welcomed this stream; it already has the inventory up to `resumeFrom`.
  package mutating func welcomed(resumeFrom: UInt64, at now: WallTime) {
    guard !welcomedNow else { return }
    welcomedNow = true
    failures = 0
    status.state = .connected
    status.since = now
    status.connections += 1
    status.acknowledgedRevision = max(status.acknowledgedRevision, resumeFrom)
    status.error = nil
  }

  /// The orchestrator has the inventory up to `revision`.
  package mutating func acknowledged(_ revision: UInt64) {
    status.acknowledgedRevision = max(status.acknowledgedRevision, revision)
  }

  /// The stream ended (`reason`); `jitter` in 0.75...1.25 spreads a fleet's reconnections.
  package mutating func ended(_ reason: String, at now: WallTime, jitter: Double) -> Next {
    if !welcomedNow { failures += 1 }
    welcomedNow = false
    status.state = .disconnected
    status.error = reason
    status.since = now
    return .redial(after: Self.backoff(attempt: max(1, failures), jitter: jitter))
  }

  /// The link stopped (shutdown).
  package mutating func stopped(at now: WallTime) {
    status.state = .off
    status.since = now
    welcomedNow = false
  }

  /// 0.2 s doubling to 10 s, times `jitter` (clamped to ±25%).
  package static func backoff(attempt: Int, jitter: Double) -> Duration {
    let base = min(10.0, 0.2 * Double(1 << min(max(attempt, 1) - 1, 10)))
    return .milliseconds(Int64(base * min(1.25, max(0.75, jitter)) * 1000))
  }
}
