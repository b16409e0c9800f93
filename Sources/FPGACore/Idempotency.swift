/// Remembers the results of requests that carried an idempotency key, so a retry returns the
/// first result. Only successes are kept: a retry of a failed request tries again. Bounded:
/// the oldest keys are forgotten first.
public struct IdempotencyLedger<Result: Sendable>: Sendable {
  struct Entry: Sendable {
    var fingerprint: String
    var result: Result
  }

  private var entries: [String: Entry] = [:]
  private var order: [String] = []
  private var head = 0
  public let capacity: Int

  public init(capacity: Int = 65_536) { self.capacity = max(1, capacity) }

  /// The stored result for `key` in `scope`, nil when unknown; throws INVALID_ARGUMENT when the
  /// key was used for a different request.
  public func lookup(scope: String, key: String, fingerprint: String) throws(AgentError) -> Result? {
    guard let entry = entries[scope + "\u{0}" + key] else { return nil }
    guard entry.fingerprint == fingerprint else {
      throw AgentError(
        .invalidArgument,
        "idempotency key \(quoted(key)) was already used for a different \(scope) request: use a new key for a new request"
      )
    }
    return entry.result
  }

  public mutating func record(scope: String, key: String, fingerprint: String, result: Result) {
    let full = scope + "\u{0}" + key
    if entries.updateValue(Entry(fingerprint: fingerprint, result: result), forKey: full) != nil {
      return
    }
    if order.count < capacity {
      order.append(full)
    } else {
      entries[order[head]] = nil
      order[head] = full
      head = (head + 1) % capacity
    }
  }

  public var count: Int { entries.count }
}

extension IdempotencyLedger where Result == IdempotentOutcome {
  mutating func record(_ record: IdempotencyRecord) {
    self.record(scope: record.scope, key: record.key, fingerprint: record.fingerprint, result: record.outcome)
  }
}
