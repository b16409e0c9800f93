/// Accelerators (slots of a card's user logic) shared by guests in time slices: the control
/// seam, the runner that drives the scheduler in real time, and what the inventory shows.

/// Loads, saves and runs contexts on one accelerator: simulated, or registers in a PCI BAR.
public protocol AcceleratorControl: Sendable {
  /// "simulated" or "bar".
  var kind: String { get }
  /// Saves the loaded context `context` (its state, `stateBytes` long); returns the time taken.
  func save(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration
  /// Loads `context`; returns the time taken.
  func load(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration
  /// Lets the loaded context work for up to `duration`; returns the time it worked (less when
  /// the task is cancelled: a preemption).
  func run(context: String, for duration: Duration) async -> Duration
}

/// An accelerator as configured.
public struct AcceleratorSpec: Hashable, Sendable {
  /// `card-DDDD:BB/accN`.
  public var id: String
  public var cardID: String
  /// The switch cost the scheduler plans with until one is measured.
  public var nominalSwitchCost: Duration
  public var policy: TimeSharingScheduler.Policy

  public init(id: String, cardID: String, nominalSwitchCost: Duration, policy: TimeSharingScheduler.Policy = .init()) {
    self.id = id
    self.cardID = cardID
    self.nominalSwitchCost = nominalSwitchCost
    self.policy = policy
  }
}

/// Bounds on what one context may ask of an accelerator.
public enum ContextLimits {
  /// The most state one context may save and load at a switch (256 MiB): beyond it, one switch
  /// would hold the accelerator for seconds.
  public static let savedStateBytes: UInt64 = 256 << 20
}

/// A guest's registered context.
public struct ContextRecord: Hashable, Sendable, Codable {
  public var id: String
  public var acceleratorID: String
  public var guest: String
  public var function: String
  public var parameters: [String: String]
  public var savedStateBytes: UInt64
  public var weight: UInt32

  public init(
    id: String, acceleratorID: String, guest: String, function: String, parameters: [String: String] = [:],
    savedStateBytes: UInt64 = 0, weight: UInt32 = 1
  ) {
    self.id = id
    self.acceleratorID = acceleratorID
    self.guest = guest
    self.function = function
    self.parameters = parameters
    self.savedStateBytes = savedStateBytes
    self.weight = weight
  }
}

/// An accelerator as the inventory shows it.
public struct AcceleratorView: Hashable, Sendable {
  public struct GuestShare: Hashable, Sendable {
    public var guest: String
    public var weight: UInt32
    public var share: Double
    public var pending: Duration
  }

  public struct Metrics: Hashable, Sendable {
    public var utilization: Double = 0
    public var switchesPerSecond: Double = 0
    public var meanSwitchTime: Duration = .zero
    public var waitP50: Duration = .zero
    public var waitP99: Duration = .zero
    public var overcommitRatio: Double = 0
    public var switchOverhead: Double = 0
    public var window: Duration = .zero
  }

  public var id: String
  public var cardID: String
  public var control: String
  public var policy: TimeSharingScheduler.Policy
  public var guests: [GuestShare]
  public var metrics: Metrics
  public var loadedGuest: String?
  public var lastSwitchTime: Duration
}

/// Drives one accelerator: asks the scheduler who runs, switches contexts through the control
/// (measuring each switch), lets the context work, and keeps the figures.
public actor AcceleratorRunner {
  public nonisolated let spec: AcceleratorSpec
  private let control: any AcceleratorControl
  private var scheduler: TimeSharingScheduler
  private let clock = ContinuousClock()
  private let origin: ContinuousClock.Instant
  /// Guest → its context (id and state size).
  private var contexts: [String: (id: String, stateBytes: UInt64)] = [:]
  /// Wakes the idle loop (new work, a switch asked for, `stop()`); keeps one wake-up when the
  /// loop is busy, and ends the wait when the loop's task is cancelled.
  private let wakes = AsyncStream<Void>.makeStream(bufferingPolicy: .bufferingNewest(1))
  private var current: Task<Duration, Never>?
  /// The guest whose slice is running.
  private var runningGuest: String?
  /// Callers waiting for a guest's context to be loaded, each resumed exactly once: by the
  /// load, by the guest's unbinding, by their own cancellation or by `stop()`.
  private var switchWaiters: [String: [(id: UInt64, continuation: CheckedContinuation<Duration, Never>)]] = [:]
  private var nextWaiter: UInt64 = 0
  /// The loop runs (in the task that called `run()`).
  private var running = false
  /// `stop()` was called: the loop ends and switches are answered at once.
  private var stopped = false
  private var lastSwitch: Duration = .zero
  /// Told of every context switch (its cost) and every wait of a guest's work (for metrics).
  private var observer: (@Sendable (AcceleratorEvent) -> Void)?

  public func observe(_ observer: @escaping @Sendable (AcceleratorEvent) -> Void) { self.observer = observer }
  /// Cumulative figures at the start of the current window.
  private var windowStart:
    (at: Duration, busy: Duration, switches: Int, switchTime: Duration, served: [String: Duration])
  private var published = AcceleratorView.Metrics()
  private var publishedShares: [String: Double] = [:]

  public init(spec: AcceleratorSpec, control: any AcceleratorControl) {
    self.spec = spec
    self.control = control
    self.scheduler = TimeSharingScheduler(policy: spec.policy, switchCost: spec.nominalSwitchCost)
    origin = clock.now
    windowStart = (.zero, .zero, 0, .zero, [:])
  }

  private var now: Duration { clock.now - origin }

  // MARK: Guests and policy

  public func bind(guest: String, context: String, stateBytes: UInt64, weight: UInt32) throws(AgentError) {
    var policy = scheduler.policy
    policy.weights[guest] = weight
    if scheduler.guestIDs.contains(guest) {
      try scheduler.setPolicy(policy)
    } else {
      try scheduler.add(guest: guest)
      try? scheduler.setPolicy(policy)
    }
    contexts[guest] = (context, stateBytes)
  }

  /// Unbinds a guest; returns its pending work.
  @discardableResult
  public func unbind(guest: String) -> Duration {
    contexts[guest] = nil
    for waiter in switchWaiters.removeValue(forKey: guest) ?? [] { waiter.continuation.resume(returning: .zero) }
    if runningGuest == guest { current?.cancel() }  // its slice ends now
    return scheduler.remove(guest: guest)
  }

  public func setPolicy(_ policy: TimeSharingScheduler.Policy) throws(AgentError) {
    var merged = policy
    for (guest, weight) in scheduler.policy.weights where merged.weights[guest] == nil {
      merged.weights[guest] = weight
    }
    try scheduler.setPolicy(merged)
  }

  /// Puts back exactly `policy` (an undo): weights it does not name are dropped.
  public func restorePolicy(_ policy: TimeSharingScheduler.Policy) throws(AgentError) {
    try scheduler.setPolicy(policy)
  }

  public var policy: TimeSharingScheduler.Policy { scheduler.policy }

  /// Work for `guest` (a job); wakes the runner when it idles.
  public func submit(guest: String, work: Duration) {
    scheduler.submit(guest: guest, work: work, at: now)
    wakeUp()
  }

  /// Loads `guest`'s context: at once (preempting the running one) or at the next slice
  /// boundary. With `now`, waits for the switch and returns its time.
  public func switchTo(guest: String, now preempt: Bool) async throws(AgentError) -> Duration? {
    if preempt, scheduler.loaded == guest, contexts[guest] != nil {
      return .zero  // loaded already: no switch to wait for
    }
    try scheduler.requestSwitch(to: guest)
    if scheduler.pending[guest] == .zero {
      // Nothing to do yet: the switch is made with a token of work so the context is loaded.
      scheduler.submit(guest: guest, work: .microseconds(1), at: now)
    }
    guard preempt else {
      wakeUp()
      return nil
    }
    let id = nextWaiter
    nextWaiter += 1
    return await withTaskCancellationHandler {
      await withCheckedContinuation { continuation in
        if Task.isCancelled || stopped {
          continuation.resume(returning: .zero)
        } else {
          // The waiter is in place before the runner is woken: the switch cannot happen (and
          // resume the waiters) before this caller is among them.
          switchWaiters[guest, default: []].append((id, continuation))
          current?.cancel()
          wakeUp()
        }
      }
    } onCancel: {
      // A hop onto the actor for a cancelled caller (the handler cannot await): it resumes
      // that caller and ends.
      Task { await self.abandon(guest: guest, waiter: id) }
    }
  }

  /// A caller that stopped waiting for a switch (its RPC was cancelled).
  private func abandon(guest: String, waiter id: UInt64) {
    guard let index = switchWaiters[guest]?.firstIndex(where: { $0.id == id }) else { return }
    switchWaiters[guest]?.remove(at: index).continuation.resume(returning: .zero)
  }

  // MARK: Running

  /// Schedules the accelerator's guests until the calling task is cancelled or `stop()`: the
  /// caller owns the loop (the agent's accelerator service, a test's task). A second call while
  /// one runs returns at once.
  public func run() async {
    guard !running, !stopped else { return }
    running = true
    defer {
      running = false
      current?.cancel()
    }
    await runLoop()
  }

  /// Ends the loop for good (shutdown): the slice running is cancelled, every caller waiting for
  /// a switch is answered.
  public func stop() {
    stopped = true
    current?.cancel()
    wakeUp()
    for waiters in switchWaiters.values {
      for waiter in waiters { waiter.continuation.resume(returning: .zero) }
    }
    switchWaiters = [:]
  }

  private func wakeUp() { wakes.continuation.yield() }

  /// Waits for a wake-up (or the task's cancellation).
  private func idle() async {
    var iterator = wakes.stream.makeAsyncIterator()
    _ = await iterator.next()
  }

  private func runLoop() async {
    while !Task.isCancelled && !stopped {
      let waits = scheduler.statistics.waitCount
      let decision = scheduler.decide(at: now)
      if scheduler.statistics.waitCount > waits { observer?(.waited(spec.id, scheduler.statistics.lastWait)) }
      switch decision {
      case .idle:
        await idle()
      case .run(let guest, let duration, let plannedCost):
        guard let context = contexts[guest] else {
          scheduler.remove(guest: guest)
          continue
        }
        var cost = Duration.zero
        if plannedCost > .zero || scheduler.loaded != guest {
          do {
            if let loaded = scheduler.loaded, let previous = contexts[loaded] {
              cost += try await control.save(context: previous.id, stateBytes: previous.stateBytes)
            }
            cost += try await control.load(context: context.id, stateBytes: context.stateBytes)
          } catch {
            // A control failure: the guest's work waits; try again after a slice.
            try? await Task.sleep(for: scheduler.policy.slice)
            continue
          }
          lastSwitch = cost
          observer?(.switched(spec.id, cost))
        }
        // Resumed whether a switch happened or the context was loaded already: a waiter is
        // never left behind.
        for waiter in switchWaiters.removeValue(forKey: guest) ?? [] { waiter.continuation.resume(returning: cost) }
        let control = self.control
        let work = Task { await control.run(context: context.id, for: duration) }
        current = work
        runningGuest = guest
        let ran = await work.value
        current = nil
        runningGuest = nil
        scheduler.ran(guest: guest, ran: ran, switchCost: cost, at: now)
      }
    }
  }

  // MARK: Figures

  /// The accelerator now, with figures over the window since the last call that rolled it.
  public func view(rollWindow: Bool) -> AcceleratorView {
    let at = now
    let stats = scheduler.statistics
    let served = scheduler.served
    let window = at - windowStart.at
    let seconds = max(TimeSharingScheduler.seconds(window), 1e-9)
    var metrics = AcceleratorView.Metrics()
    let busy = stats.busy - windowStart.busy
    let switches = stats.switches - windowStart.switches
    let switchTime = stats.switchTime - windowStart.switchTime
    metrics.utilization = min(1, TimeSharingScheduler.seconds(busy) / seconds)
    metrics.switchesPerSecond = Double(switches) / seconds
    metrics.meanSwitchTime = switches > 0 ? switchTime / switches : lastSwitch
    metrics.switchOverhead = min(1, TimeSharingScheduler.seconds(switchTime) / seconds)
    metrics.waitP50 = stats.wait(percentile: 0.5)
    metrics.waitP99 = stats.wait(percentile: 0.99)
    metrics.overcommitRatio = scheduler.overcommitRatio
    metrics.window = window
    let busySeconds = TimeSharingScheduler.seconds(busy)
    let guests = scheduler.guestIDs.map { guest in
      let delta = (served[guest] ?? .zero) - (windowStart.served[guest] ?? .zero)
      return AcceleratorView.GuestShare(
        guest: guest, weight: scheduler.policy.weight(of: guest),
        share: busySeconds > 0 ? TimeSharingScheduler.seconds(delta) / busySeconds : 0,
        pending: scheduler.pending[guest] ?? .zero)
    }
    if rollWindow { windowStart = (at, stats.busy, stats.switches, stats.switchTime, served) }
    return AcceleratorView(
      id: spec.id, cardID: spec.cardID, control: control.kind, policy: scheduler.policy, guests: guests,
      metrics: metrics, loadedGuest: scheduler.loaded, lastSwitchTime: lastSwitch)
  }
}

/// What an accelerator reports as it goes.
public enum AcceleratorEvent: Sendable {
  /// A context switch (save and load) took this long.
  case switched(String, Duration)
  /// A guest's work waited this long for the accelerator.
  case waited(String, Duration)
}
