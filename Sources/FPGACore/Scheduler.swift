/// Time-sharing of one accelerator among guests: weighted fair (stride scheduling) in slices,
/// the context-switch cost accounted, idle guests skipped, a guest's pending work kept across
/// switches. Pure logic: the caller tells it the time and what happened; it decides who runs.
///
/// Stride scheduling: every guest has a *pass*, the service it has had divided by its weight.
/// The runnable guest with the smallest pass runs next. A guest that was idle comes back at
/// the current global pass (it cannot hoard credit while it had nothing to do). Over any
/// interval in which a set of guests stays backlogged, each one's service is proportional to
/// its weight, within one slice.
public struct TimeSharingScheduler: Sendable {
  public struct Policy: Hashable, Sendable, Codable {
    /// Length of one slice.
    public var slice: Duration
    /// Weight per guest; absent guests weigh 1.
    public var weights: [String: UInt32]
    /// Most guests that may share the accelerator (1: no overcommitment).
    public var overcommitLimit: Int

    public init(slice: Duration = .milliseconds(10), weights: [String: UInt32] = [:], overcommitLimit: Int = 4) {
      self.slice = slice
      self.weights = weights
      self.overcommitLimit = overcommitLimit
    }

    public func weight(of guest: String) -> UInt32 { max(1, weights[guest] ?? 1) }
  }

  /// What to do next.
  public enum Decision: Hashable, Sendable {
    /// Run `guest` for `duration` (a slice, or less when its work ends sooner), after a switch
    /// costing `switchCost` when another context is loaded.
    case run(guest: String, duration: Duration, switchCost: Duration)
    /// Nothing to run.
    case idle
  }

  struct Guest: Sendable {
    var weight: UInt32
    var pass: Double = 0
    /// Work submitted and not yet done.
    var pending: Duration = .zero
    /// When its oldest waiting work became runnable (for wait times).
    var waitingSince: Duration?
    var served: Duration = .zero
  }

  public private(set) var policy: Policy
  /// The cost of saving one context and loading another.
  public let switchCost: Duration
  private var guests: [String: Guest] = [:]
  /// The context loaded on the accelerator.
  public private(set) var loaded: String?
  /// A switch asked for at the next slice boundary (or now).
  private var requested: String?
  /// The global pass: the smallest pass among backlogged guests when last decided.
  private var globalPass: Double = 0
  public private(set) var statistics = Statistics()

  public init(policy: Policy, switchCost: Duration) {
    self.policy = policy
    self.switchCost = switchCost
  }

  // MARK: Guests

  public var guestIDs: [String] { guests.keys.sorted() }

  /// Binds a guest to this accelerator; RESOURCE_EXHAUSTED above the overcommit limit.
  public mutating func add(guest: String) throws(AgentError) {
    guard guests[guest] == nil else { return }
    guard guests.count < policy.overcommitLimit else {
      throw AgentError(
        .resourceExhausted,
        "the accelerator already serves \(guests.count) guests, its overcommit limit; raise the limit "
          + "with SetSharingPolicy or place guest \(guest) on another accelerator")
    }
    guests[guest] = Guest(weight: policy.weight(of: guest), pass: globalPass)
  }

  /// Unbinds a guest; returns its pending work (to carry to another accelerator).
  @discardableResult
  public mutating func remove(guest: String) -> Duration {
    guard let removed = guests.removeValue(forKey: guest) else { return .zero }
    if loaded == guest { loaded = nil }
    if requested == guest { requested = nil }
    return removed.pending
  }

  /// Replaces the policy; RESOURCE_EXHAUSTED when more guests are bound than the new limit.
  public mutating func setPolicy(_ new: Policy) throws(AgentError) {
    guard new.slice > .zero else { throw AgentError(.invalidArgument, "time_slice must be positive") }
    guard new.overcommitLimit >= 1 else { throw AgentError(.invalidArgument, "overcommit_limit must be at least 1") }
    guard guests.count <= new.overcommitLimit else {
      throw AgentError(
        .resourceExhausted,
        "\(guests.count) guests share this accelerator, more than the overcommit limit \(new.overcommitLimit); "
          + "move guests away first")
    }
    policy = new
    for id in guests.keys { guests[id]!.weight = new.weight(of: id) }
  }

  // MARK: Work

  /// `guest` submits `work` at `now`; work accumulates (it is never lost across switches).
  public mutating func submit(guest: String, work: Duration, at now: Duration) {
    guard var entry = guests[guest], work > .zero else { return }
    if entry.pending == .zero {
      // Back from idle: no credit for the time it had nothing to do.
      entry.pass = max(entry.pass, globalPass)
      entry.waitingSince = now
    }
    entry.pending += work
    guests[guest] = entry
  }

  /// Asks for `guest`'s context to be loaded next (at the next slice boundary; a caller that
  /// preempts calls `decide` right away).
  public mutating func requestSwitch(to guest: String) throws(AgentError) {
    guard guests[guest] != nil else {
      throw AgentError(.notFound, "guest \(guest) is not bound to this accelerator")
    }
    requested = guest
  }

  /// Who runs next, at a slice boundary `now`.
  public mutating func decide(at now: Duration) -> Decision {
    let backlogged = guests.filter { $0.value.pending > .zero }
    guard !backlogged.isEmpty else { return .idle }
    let chosen: String
    if let requested, backlogged[requested] != nil {
      chosen = requested
      self.requested = nil
    } else {
      chosen = backlogged.min { ($0.value.pass, $0.key) < ($1.value.pass, $1.key) }!.key
    }
    globalPass = backlogged.values.map(\.pass).min() ?? globalPass
    let entry = guests[chosen]!
    let cost = loaded == chosen ? Duration.zero : switchCost
    if let since = entry.waitingSince { statistics.recordWait(now - since) }
    return .run(guest: chosen, duration: min(policy.slice, entry.pending), switchCost: cost)
  }

  /// The decided run happened: `guest` was loaded (after `switchCost`) and worked `ran`,
  /// ending at `now`.
  public mutating func ran(guest: String, ran: Duration, switchCost: Duration, at now: Duration) {
    guard var entry = guests[guest] else { return }
    if switchCost > .zero || loaded != guest {
      statistics.switches += 1
      statistics.switchTime += switchCost
    }
    loaded = guest
    entry.served += ran
    entry.pending = max(.zero, entry.pending - ran)
    entry.pass += Self.seconds(ran) / Double(entry.weight)
    entry.waitingSince = entry.pending > .zero ? now : nil
    guests[guest] = entry
    statistics.busy += ran
  }

  /// Service each guest has had.
  public var served: [String: Duration] { guests.mapValues(\.served) }
  /// Work each guest still has.
  public var pending: [String: Duration] { guests.mapValues(\.pending) }
  /// Guests bound per allowed guest.
  public var overcommitRatio: Double { Double(guests.count) / Double(max(1, policy.overcommitLimit)) }

  static func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
  }

  /// What the accelerator did.
  public struct Statistics: Hashable, Sendable {
    public var busy: Duration = .zero
    public var switches = 0
    public var switchTime: Duration = .zero
    /// Waits from runnable to running, in microseconds, the last 4,096.
    public private(set) var waits: [Int64] = []

    /// Waits recorded since the start, and the last one.
    public private(set) var waitCount = 0
    public private(set) var lastWait: Duration = .zero

    mutating func recordWait(_ wait: Duration) {
      waitCount += 1
      lastWait = wait
      let micros = wait.components.seconds * 1_000_000 + wait.components.attoseconds / 1_000_000_000_000
      if waits.count >= 4096 { waits.removeFirst(waits.count - 4095) }
      waits.append(micros)
    }

    /// The `p` quantile of the recorded waits.
    public func wait(percentile p: Double) -> Duration {
      guard !waits.isEmpty else { return .zero }
      let sorted = waits.sorted()
      let index = min(sorted.count - 1, max(0, Int((Double(sorted.count) * p).rounded(.up)) - 1))
      return .microseconds(sorted[index])
    }
  }
}

/// Jain's fairness index of `values` (1 = perfectly even, 1/n = one takes all).
public func jainFairness(_ values: [Double]) -> Double {
  guard !values.isEmpty else { return 1 }
  let sum = values.reduce(0, +)
  let squares = values.reduce(0) { $0 + $1 * $1 }
  guard squares > 0 else { return 1 }
  return sum * sum / (Double(values.count) * squares)
}

/// Drives a scheduler in virtual time: guests submit jobs (or stay backlogged), the
/// accelerator runs what the scheduler decides and pays the switch cost. For tests, the
/// benchmark, and the simulated accelerator's workload.
public struct SharingSimulation: Sendable {
  /// One guest's demand.
  public struct Load: Hashable, Sendable {
    public var guest: String
    /// A job of `jobSize` every `interval`; nil: always backlogged.
    public var interval: Duration?
    public var jobSize: Duration
    /// Submissions start at this time.
    public var start: Duration

    public init(guest: String, interval: Duration? = nil, jobSize: Duration = .seconds(1), start: Duration = .zero) {
      self.guest = guest
      self.interval = interval
      self.jobSize = jobSize
      self.start = start
    }
  }

  public struct Result: Sendable {
    public var served: [String: Duration]
    public var busy: Duration
    public var switches: Int
    public var switchTime: Duration
    public var elapsed: Duration
    public var decisions: Int
    public var statistics: TimeSharingScheduler.Statistics

    /// Useful work over elapsed time.
    public var utilization: Double { TimeSharingScheduler.seconds(busy) / TimeSharingScheduler.seconds(elapsed) }
  }

  public var scheduler: TimeSharingScheduler
  public var loads: [Load]

  public init(scheduler: TimeSharingScheduler, loads: [Load]) throws(AgentError) {
    self.scheduler = scheduler
    self.loads = loads
    for load in loads { try self.scheduler.add(guest: load.guest) }
  }

  /// Runs until `end`.
  public mutating func run(until end: Duration) -> Result {
    var now = Duration.zero
    var nextArrival = loads.map { $0.start }
    var decisions = 0
    while now < end {
      for (index, load) in loads.enumerated() {
        if let interval = load.interval {
          while nextArrival[index] <= now {
            scheduler.submit(guest: load.guest, work: load.jobSize, at: nextArrival[index])
            nextArrival[index] += interval
          }
        } else if nextArrival[index] <= now, (scheduler.pending[load.guest] ?? .zero) < scheduler.policy.slice * 2 {
          scheduler.submit(guest: load.guest, work: scheduler.policy.slice * 1000, at: now)
        }
      }
      decisions += 1
      switch scheduler.decide(at: now) {
      case .idle:
        let upcoming = zip(loads, nextArrival).filter { $0.0.interval != nil || $0.1 > now }.map(\.1).filter {
          $0 > now
        }
        now = min(end, upcoming.min() ?? end)
      case .run(let guest, let duration, let cost):
        let run = min(duration, max(.zero, end - now - cost))
        now += cost + run
        scheduler.ran(guest: guest, ran: run, switchCost: cost, at: now)
      }
    }
    return Result(
      served: scheduler.served, busy: scheduler.statistics.busy, switches: scheduler.statistics.switches,
      switchTime: scheduler.statistics.switchTime, elapsed: now, decisions: decisions, statistics: scheduler.statistics)
  }
}
