import Glibc

/// A value behind a pthread mutex. ThreadSanitizer follows a pthread mutex, but not the
/// contended hand-over of `Synchronization.Mutex` (a futex), for which it reports races that
/// are not there; state shared by tasks on several threads that the TSan run covers (the memory
/// store, the blocking worker) is kept behind this lock instead.
public final class PthreadLocked<Value>: @unchecked Sendable {
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private var value: Value

  public init(_ value: Value) {
    self.value = value
    mutex = .allocate(capacity: 1)
    mutex.initialize(to: pthread_mutex_t())
    pthread_mutex_init(mutex, nil)
  }

  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }

  public func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body(&value)
  }
}
