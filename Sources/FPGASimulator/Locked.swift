#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// A value behind a pthread mutex, with `Mutex.withLock`'s shape. The simulated kernel's state is
/// taken both by tasks and by the Linux platform's blocking worker threads (a write of 0 waiting
/// for a VM to let go): ThreadSanitizer follows a pthread mutex, but not the kernel's hand-over
/// on `Synchronization.Mutex`'s contended path (a priority-inheritance futex on Linux, outside
/// instrumented code), which it reports as a data race between two locked accesses.
final class Locked<Value>: @unchecked Sendable {
  private let mutex: UnsafeMutablePointer<pthread_mutex_t>
  private var value: Value

  init(_ value: Value) {
    mutex = .allocate(capacity: 1)
    mutex.initialize(to: pthread_mutex_t())
    pthread_mutex_init(mutex, nil)
    self.value = value
  }

  deinit {
    pthread_mutex_destroy(mutex)
    mutex.deallocate()
  }

  func withLock<Result, Failure: Error>(_ body: (inout Value) throws(Failure) -> Result) throws(Failure) -> Result {
    pthread_mutex_lock(mutex)
    defer { pthread_mutex_unlock(mutex) }
    return try body(&value)
  }
}
