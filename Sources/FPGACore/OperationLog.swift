/// The operations clients can read and watch: every unfinished one, the last `history` finished
/// ones, and, apart, the last `planHistory` dry-run plans, so that plans never push a real
/// operation out (an idempotency key's replay finds its operation as long as it is kept).
struct OperationLog {
  let history: Int
  let planHistory: Int
  private var records: [String: OperationRecord] = [:]
  /// Finished real operations, oldest first.
  private var finished: [String] = []
  /// Dry-run plans, oldest first.
  private var plans: [String] = []
  private var watchers: [String: [UInt64: AsyncStream<OperationRecord>.Continuation]] = [:]
  /// Watchers of every operation's changes (the dashboard).
  private var feeds: [UInt64: AsyncStream<OperationRecord>.Continuation] = [:]
  private var nextWatcher: UInt64 = 0
  /// Operations that ended since the start, by kind and result (`succeeded`, `failed`).
  private(set) var ended: [OperationTally: Int] = [:]

  init(history: Int, planHistory: Int) {
    self.history = history
    self.planHistory = planHistory
  }

  subscript(id: String) -> OperationRecord? { records[id] }

  var count: Int { records.count }

  /// Stores a new or changed operation and tells its watchers.
  mutating func remember(_ record: OperationRecord) {
    let previous = records.updateValue(record, forKey: record.id)
    if record.state == .planned {
      if previous == nil {
        plans.append(record.id)
        while plans.count > planHistory { records[plans.removeFirst()] = nil }
      }
    } else if record.state.isTerminal, previous?.state.isTerminal != true {
      ended[OperationTally(kind: record.kind, result: record.state.rawValue), default: 0] += 1
      finished.append(record.id)
      while finished.count > history { records[finished.removeFirst()] = nil }
    }
    for continuation in (watchers[record.id] ?? [:]).values {
      continuation.yield(record)
      if record.state.isTerminal { continuation.finish() }
    }
    if record.state.isTerminal { watchers[record.id] = nil }
    for continuation in feeds.values { continuation.yield(record) }
  }

  /// The last `limit` operations (plans included), newest first.
  func recent(_ limit: Int) -> [OperationRecord] {
    records.values.sorted { ($0.createdAt, $0.id) > ($1.createdAt, $1.id) }.prefix(limit).map { $0 }
  }

  /// Every change to any operation from now on, until `close()`.
  mutating func feed(ended: @escaping @Sendable (UInt64) -> Void) -> AsyncStream<OperationRecord> {
    let (stream, continuation) = AsyncStream.makeStream(
      of: OperationRecord.self, bufferingPolicy: .bufferingNewest(256))
    let watcher = nextWatcher
    nextWatcher += 1
    feeds[watcher] = continuation
    continuation.onTermination = { _ in ended(watcher) }
    return stream
  }

  mutating func dropFeed(_ watcher: UInt64) { feeds[watcher] = nil }

  /// The operation now, then after every change, ending once it has finished.
  /// `ended` runs when the consumer goes away (then `dropWatcher` forgets it).
  mutating func watch(
    _ record: OperationRecord, ended: @escaping @Sendable (UInt64) -> Void
  ) -> AsyncStream<OperationRecord> {
    let (stream, continuation) = AsyncStream.makeStream(of: OperationRecord.self, bufferingPolicy: .bufferingNewest(64))
    continuation.yield(record)
    guard !record.state.isTerminal else {
      continuation.finish()
      return stream
    }
    let watcher = nextWatcher
    nextWatcher += 1
    watchers[record.id, default: [:]][watcher] = continuation
    continuation.onTermination = { _ in ended(watcher) }
    return stream
  }

  mutating func dropWatcher(_ id: String, _ watcher: UInt64) { watchers[id]?[watcher] = nil }

  /// Ends every watch.
  mutating func close() {
    for byID in watchers.values {
      for continuation in byID.values { continuation.finish() }
    }
    watchers = [:]
    for continuation in feeds.values { continuation.finish() }
    feeds = [:]
  }
}

/// A count key of ended operations.
public struct OperationTally: Hashable, Sendable {
  public var kind: String
  public var result: String
}
