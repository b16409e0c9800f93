/// The range of every number and duration a client may send, in one place. Each door (the node
/// API, the orchestrator link and the dashboard, which go through it, the DRA driver, the
/// configuration) checks a value against its range before anything else touches it; the table
/// in docs/api.md, "Ranges", lists them. A value outside its range is INVALID_ARGUMENT with a
/// message naming the field and the range, and nothing changes.
public enum Bounds {
  /// `SharingPolicy.time_slice`.
  public static let timeSlice: ClosedRange<Duration> = .microseconds(100) ... .seconds(10)
  public static let timeSliceText = "100 µs to 10 s"
  /// `DetachVFRequest.timeout` (absent: the configured default).
  public static let detachTimeout: ClosedRange<Duration> = .nanoseconds(1) ... .seconds(600)
  public static let detachTimeoutText = "more than 0 and at most 600 s"
  /// A guest's weight (`SharingPolicy.weights`; `Context.weight`, where 0 means 1).
  public static let weight: ClosedRange<UInt32> = 1...1000
  /// `SharingPolicy.overcommit_limit`: guests bound to one accelerator.
  public static let overcommitLimit: ClosedRange<UInt32> = 1...64
  /// Entries of `SharingPolicy.weights`: at most one per guest an accelerator may serve, with room.
  public static let weightEntries = 1024
  /// `Context.saved_state_bytes`: what one context switch may move (256 MiB).
  public static let savedStateBytes: ClosedRange<UInt64> = 0...ContextLimits.savedStateBytes
  /// `AllocationConstraints.numa_node` (when present).
  public static let numaNode: ClosedRange<Int32> = 0...1023
  /// `ReconfigureRequest.vf_count`: no PF has more VFs (PCIe routing ids).
  public static let vfCount: ClosedRange<UInt32> = 0...4096
  /// `GetAuditTrailRequest.limit` (0: 100).
  public static let auditLimit: ClosedRange<UInt32> = 0...10_000
}

extension Validate {
  /// `value` if `range` holds it, else INVALID_ARGUMENT: "FIELD VALUE is out of range: LOW-HIGH".
  public static func number<Value: BinaryInteger>(
    _ value: Value, field: String, in range: ClosedRange<Value>, note: String = ""
  ) throws(AgentError) -> Value {
    guard range.contains(value) else {
      throw AgentError(
        .invalidArgument,
        "\(field) \(value) is out of range: \(range.lowerBound)-\(range.upperBound)\(note.isEmpty ? "" : " (\(note))")")
    }
    return value
  }

  /// A protobuf `Duration` given as its two parts, checked before any arithmetic: `nanos` within
  /// ±999,999,999 and of the sign of `seconds` (the message's own rules), then the whole within
  /// `range`. The `Duration` built from valid parts cannot overflow (it holds ±2^63 s exactly).
  public static func duration(
    seconds: Int64, nanos: Int32, field: String, in range: ClosedRange<Duration>, rangeText: String
  ) throws(AgentError) -> Duration {
    guard (-999_999_999...999_999_999).contains(nanos), seconds == 0 || nanos == 0 || (seconds < 0) == (nanos < 0)
    else {
      throw AgentError(
        .invalidArgument,
        "\(field) {seconds: \(seconds), nanos: \(nanos)} is not a valid duration: nanos must be within ±999999999 and of the sign of seconds"
      )
    }
    let duration = Duration.seconds(seconds) + .nanoseconds(Int64(nanos))
    guard range.contains(duration) else {
      throw AgentError(
        .invalidArgument, "\(field) \(Self.text(seconds: seconds, nanos: nanos)) is out of range: \(rangeText)")
    }
    return duration
  }

  static func text(seconds: Int64, nanos: Int32) -> String {
    nanos == 0 ? "\(seconds) s" : seconds == 0 ? "\(nanos) ns" : "\(seconds) s \(nanos) ns"
  }
}

extension Duration {
  /// Whole nanoseconds, saturating at `Int64.min` / `Int64.max` (±292 years) instead of
  /// trapping: `Duration` holds far more than an `Int64` of nanoseconds does.
  public var saturatingNanoseconds: Int64 {
    let (seconds, attoseconds) = components
    let (scaled, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
    guard !overflow else { return seconds < 0 ? .min : .max }
    let (sum, carried) = scaled.addingReportingOverflow(attoseconds / 1_000_000_000)
    guard !carried else { return attoseconds < 0 ? .min : .max }
    return sum
  }
}
