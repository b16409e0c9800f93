import FPGACore
import Foundation

/// Runs a blocking system call on a thread of its own, never on one that serves requests, and
/// gives up waiting after a watchdog delay. A write of `sriov_numvfs` that blocks in the kernel
/// cannot be interrupted (not even by a signal): the thread goes on waiting, the caller is told,
/// and `isBusy` stays true until the call returns.
public final class BlockingWorker: Sendable {
  public enum Outcome<Value: Sendable>: Sendable {
    case finished(Value)
    /// Still blocked when the watchdog fired; `completion` resolves when it returns.
    case stillBlocked(completion: Task<Value, Never>)
  }

  private let running = PthreadLocked<Set<String>>([])

  public init() {}

  /// Keys of calls still in flight (e.g. a PF whose write is blocked).
  public func isBusy(_ key: String) -> Bool { running.withLock { $0.contains(key) } }

  /// Every key with a call in flight.
  public var busyKeys: Set<String> { running.withLock { $0 } }

  public func run<Value: Sendable>(
    key: String, watchdog: Duration, _ body: @escaping @Sendable () -> Value
  ) async -> Outcome<Value> {
    running.withLock { _ = $0.insert(key) }
    let completion = Task<Value, Never> {
      let value = await withCheckedContinuation { continuation in
        let thread = Thread {
          continuation.resume(returning: body())
        }
        thread.name = "fpga-agent blocking \(key)"
        thread.start()
      }
      self.running.withLock { _ = $0.remove(key) }
      return value
    }
    // Whichever comes first, the call's return or the watchdog, answers; the other is ignored.
    // (A task group would wait for the blocked call before returning.)
    let answered = PthreadLocked(false)
    let first: Value? = await withCheckedContinuation { continuation in
      let answer: @Sendable (Value?) -> Void = { value in
        if !answered.withLock({ answered in
          defer { answered = true }; return answered
        }) {
          continuation.resume(returning: value)
        }
      }
      let watchdogTask = Task {
        // Cancelled: the call answered first. (A cancelled sleep must not answer "still
        // blocked": it would race the call's own answer.)
        guard (try? await Task.sleep(for: watchdog)) != nil else { return }
        answer(nil)
      }
      Task {
        let value = await completion.value
        answer(value)
        watchdogTask.cancel()
      }
    }
    if let first { return .finished(first) }
    return .stillBlocked(completion: completion)
  }
}
