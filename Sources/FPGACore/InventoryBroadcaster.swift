import Synchronization

/// Fans inventory events out to watchers. Each watcher has a bounded buffer; one that falls
/// behind is ended (its `lagged` flag set) instead of slowing the agent, and resumes from its
/// last revision.
final class InventoryBroadcaster: Sendable {
  private struct Watcher {
    var continuation: AsyncStream<InventoryEvent>.Continuation
    var subscription: InventorySubscription
  }

  private struct State {
    var watchers: [UInt64: Watcher] = [:]
    var nextID: UInt64 = 0
    var closed = false
    /// Watchers cut off for falling behind, since the start.
    var cutOffs: UInt64 = 0
  }

  private let state = Mutex(State())

  /// Registers a watcher; `initial` events are queued before any later publication.
  func subscribe(initial: [InventoryEvent], bufferLimit: Int) -> InventorySubscription {
    let (stream, continuation) = AsyncStream.makeStream(
      of: InventoryEvent.self, bufferingPolicy: .bufferingOldest(max(bufferLimit, initial.count + 1)))
    for event in initial { continuation.yield(event) }
    return state.withLock { state in
      let id = state.nextID
      state.nextID += 1
      let subscription = InventorySubscription(id: id, events: stream, broadcaster: self)
      if state.closed {
        continuation.finish()
      } else {
        state.watchers[id] = Watcher(continuation: continuation, subscription: subscription)
        continuation.onTermination = { [weak self] _ in self?.remove(id) }
      }
      return subscription
    }
  }

  func publish(_ event: InventoryEvent) {
    let lagging: [Watcher] = state.withLock { state in
      var lagging: [Watcher] = []
      for (id, watcher) in state.watchers {
        if case .dropped = watcher.continuation.yield(event) {
          lagging.append(watcher)
          state.watchers[id] = nil
          state.cutOffs += 1
        }
      }
      return lagging
    }
    for watcher in lagging {
      watcher.subscription.markLagged()
      watcher.continuation.finish()
    }
  }

  func remove(_ id: UInt64) {
    let watcher = state.withLock { $0.watchers.removeValue(forKey: id) }
    watcher?.continuation.finish()
  }

  /// Ends every watch; later subscriptions end at once.
  func close() {
    let watchers = state.withLock { state in
      state.closed = true
      defer { state.watchers = [:] }
      return Array(state.watchers.values)
    }
    for watcher in watchers { watcher.continuation.finish() }
  }

  var watcherCount: Int { state.withLock { $0.watchers.count } }

  var cutOffCount: UInt64 { state.withLock { $0.cutOffs } }
}

/// One watcher's events. The stream ends when the watcher is cancelled, when the agent shuts
/// down, or when the watcher fell too far behind (`lagged`: resume from the last revision seen).
public final class InventorySubscription: Sendable {
  public let events: AsyncStream<InventoryEvent>
  private let id: UInt64
  private let broadcaster: InventoryBroadcaster
  private let lagged = Atomic<Bool>(false)

  init(id: UInt64, events: AsyncStream<InventoryEvent>, broadcaster: InventoryBroadcaster) {
    self.id = id
    self.events = events
    self.broadcaster = broadcaster
  }

  /// True when the stream ended because the watcher fell behind.
  public var wasLagged: Bool { lagged.load(ordering: .acquiring) }

  func markLagged() { lagged.store(true, ordering: .releasing) }

  /// Ends the stream.
  public func cancel() { broadcaster.remove(id) }
}
