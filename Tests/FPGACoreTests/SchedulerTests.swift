import FPGACore
import FPGASimulator
import Testing

/// The time-sharing scheduler in virtual time: no clocks, no sleeps, exact figures.
@Suite struct SchedulerTests {
  func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
  }

  func simulate(
    guests: [String], weights: [String: UInt32] = [:], slice: Duration = .milliseconds(10),
    switchCost: Duration = .zero, loads: [SharingSimulation.Load]? = nil, until end: Duration = .seconds(10)
  ) throws -> SharingSimulation.Result {
    let scheduler = TimeSharingScheduler(
      policy: .init(slice: slice, weights: weights, overcommitLimit: 16), switchCost: switchCost)
    var simulation = try SharingSimulation(scheduler: scheduler, loads: loads ?? guests.map { .init(guest: $0) })
    return simulation.run(until: end)
  }

  @Test func equalWeightsShareEvenly() throws {
    let result = try simulate(guests: ["a", "b", "c", "d"])
    let shares = ["a", "b", "c", "d"].map { seconds(result.served[$0]!) }
    #expect(jainFairness(shares) > 0.9999)
    for share in shares { #expect(abs(share - 2.5) <= 0.010 + 1e-9) }  // within one slice
  }

  @Test func unequalWeightsShareInProportion() throws {
    let result = try simulate(
      guests: ["a", "b", "c"], weights: ["a": 1, "b": 2, "c": 4], switchCost: .microseconds(500))
    let a = seconds(result.served["a"]!)
    let b = seconds(result.served["b"]!)
    let c = seconds(result.served["c"]!)
    #expect(abs(b / a - 2) < 0.02 && abs(c / a - 4) < 0.02)
    #expect(jainFairness([a / 1, b / 2, c / 4]) > 0.999)
  }

  @Test func theSwitchCostIsPaidOncePerSwitchAndCounted() throws {
    let shared = try simulate(guests: ["a", "b"], switchCost: .milliseconds(1))
    // Two backlogged guests alternate: every slice needs a switch.
    #expect(abs(shared.utilization - 10.0 / 11.0) < 0.001)
    #expect(shared.switchTime == .milliseconds(1) * shared.switches)
    let alone = try simulate(guests: ["a"], switchCost: .milliseconds(1))
    #expect(alone.switches == 1)  // loaded once, then it keeps the accelerator
    #expect(alone.utilization > 0.999)
  }

  @Test func idleGuestsAreSkippedAndEarnNoCreditWhileIdle() throws {
    let loads: [SharingSimulation.Load] = [
      .init(guest: "a"), .init(guest: "b"), .init(guest: "late", start: .seconds(5)),
    ]
    let early = try simulate(guests: [], loads: loads, until: .seconds(5))
    #expect(early.served["late"] == .zero)
    #expect(abs(seconds(early.served["a"]!) - 2.5) <= 0.011)
    let whole = try simulate(guests: [], loads: loads, until: .seconds(8))
    // After its return the late guest gets a third, not a catch-up burst.
    let late = seconds(whole.served["late"]!)
    #expect(abs(late - 1.0) <= 0.011, "\(late)")
  }

  @Test func pendingWorkSurvivesSwitches() {
    var scheduler = TimeSharingScheduler(policy: .init(slice: .milliseconds(10)), switchCost: .milliseconds(1))
    try? scheduler.add(guest: "a")
    try? scheduler.add(guest: "b")
    scheduler.submit(guest: "a", work: .milliseconds(25), at: .zero)
    scheduler.submit(guest: "b", work: .seconds(1), at: .zero)
    var now = Duration.zero
    var order: [String] = []
    while scheduler.pending["a"]! > .zero {
      guard case .run(let guest, let duration, let cost) = scheduler.decide(at: now) else { break }
      now += cost + duration
      scheduler.ran(guest: guest, ran: duration, switchCost: cost, at: now)
      order.append("\(guest):\(duration.components.attoseconds / 1_000_000_000_000_000)")
    }
    #expect(order == ["a:10", "b:10", "a:10", "b:10", "a:5"])
    #expect(scheduler.served["a"] == .milliseconds(25))
  }

  @Test func aGuestRemappedToAnotherAcceleratorTakesItsWorkAlong() throws {
    var first = TimeSharingScheduler(policy: .init(slice: .milliseconds(10)), switchCost: .zero)
    var second = TimeSharingScheduler(policy: .init(slice: .milliseconds(10)), switchCost: .zero)
    try first.add(guest: "g")
    first.submit(guest: "g", work: .milliseconds(30), at: .zero)
    guard case .run(_, let duration, _) = first.decide(at: .zero) else { Issue.record("expected a run"); return }
    first.ran(guest: "g", ran: duration, switchCost: .zero, at: duration)
    let carried = first.remove(guest: "g")
    #expect(carried == .milliseconds(20))
    try second.add(guest: "g")
    second.submit(guest: "g", work: carried, at: duration)
    #expect(second.pending["g"] == .milliseconds(20))
    #expect(first.guestIDs.isEmpty)
  }

  @Test func policyLimitsAreEnforced() throws {
    var scheduler = TimeSharingScheduler(policy: .init(overcommitLimit: 2), switchCost: .zero)
    try scheduler.add(guest: "a")
    try scheduler.add(guest: "b")
    #expect(throws: AgentError.self) { try scheduler.add(guest: "c") }
    do {
      try scheduler.setPolicy(.init(overcommitLimit: 1))
      Issue.record("expected RESOURCE_EXHAUSTED")
    } catch {
      #expect(error.code == .resourceExhausted)
    }
    #expect(scheduler.policy.overcommitLimit == 2)
    #expect(throws: AgentError.self) { try scheduler.setPolicy(.init(slice: .zero)) }
    try scheduler.setPolicy(.init(slice: .milliseconds(5), weights: ["b": 3], overcommitLimit: 3))
    try scheduler.add(guest: "c")
    #expect(scheduler.overcommitRatio == 1)
  }

  @Test func anExplicitSwitchRunsThatGuestNext() throws {
    var scheduler = TimeSharingScheduler(policy: .init(slice: .milliseconds(10)), switchCost: .milliseconds(2))
    for guest in ["a", "b", "c"] {
      try scheduler.add(guest: guest)
      scheduler.submit(guest: guest, work: .seconds(1), at: .zero)
    }
    try scheduler.requestSwitch(to: "c")
    #expect(scheduler.decide(at: .zero) == .run(guest: "c", duration: .milliseconds(10), switchCost: .milliseconds(2)))
    #expect(throws: AgentError.self) { try scheduler.requestSwitch(to: "nobody") }
  }
}

/// The engine's side: figures reach the inventory's watch stream, contexts survive a restart,
/// and a move carries the pending work.
@Suite struct ContextEngineTests {
  struct InstantAccelerator: AcceleratorControl {
    let kind = "simulated"
    func save(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration { .microseconds(10) }
    func load(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration { .microseconds(10) }
    func run(context: String, for duration: Duration) async -> Duration {
      try? await Task.sleep(for: .seconds(3600))
      return .zero
    }
  }

  func engine(store: MemoryStateStore) -> NodeEngine {
    let runners = ["card-0000:3b/acc0", "card-0000:3b/acc1"].map {
      AcceleratorRunner(
        spec: AcceleratorSpec(id: $0, cardID: "card-0000:3b", nominalSwitchCost: .microseconds(20)),
        control: InstantAccelerator())
    }
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: SimulatedNode()), clock: StillClock(), store: store,
      accelerators: runners)
    // The loops run as the agent's accelerator service runs them; they end with `close()`.
    Task { await engine.runAccelerators() }
    return engine
  }

  @Test func contextsReachTheWatchStreamSurviveRestartsAndMoveWithTheirWork() async throws {
    let store = MemoryStateStore()
    let first = engine(store: store)
    _ = try await first.restore()
    let watch = await first.watch(from: 0)
    var events = watch.events.makeAsyncIterator()
    _ = await events.next()  // the snapshot
    let (record, _) = try await first.registerContext(
      .init(acceleratorID: "card-0000:3b/acc0", guest: "vm-1", function: "fft", savedStateBytes: 64, weight: 3))
    var sawAccelerator = false
    while !sawAccelerator, case .delta(_, let changes)? = await events.next() {
      sawAccelerator = changes.contains {
        if case .acceleratorUpdated(let view) = $0 { view.guests.map(\.guest) == ["vm-1"] } else { false }
      }
    }
    #expect(sawAccelerator)
    _ = try await first.setSharingPolicy(
      acceleratorID: "card-0000:3b/acc0", policy: .init(slice: .milliseconds(4), overcommitLimit: 2), meta: .init())
    await first.close()

    let second = engine(store: store)
    _ = try await second.restore()
    let restored = await second.listContexts()
    #expect(restored.map(\.0) == [record])
    let accelerator = try await second.snapshot().accelerators.first { $0.id == "card-0000:3b/acc0" }
    #expect(accelerator?.policy.slice == .milliseconds(4) && accelerator?.policy.overcommitLimit == 2)
    #expect(accelerator?.guests.map(\.weight) == [3])

    await second.submitWork(guest: "vm-1", acceleratorID: "card-0000:3b/acc0", work: .seconds(5))
    let (moved, carried) = try await second.moveContext(record.id, to: "card-0000:3b/acc1", meta: .init())
    #expect(moved.acceleratorID == "card-0000:3b/acc1")
    #expect(carried > .seconds(4))  // the run in flight may have been charged a little
    let views = try await second.snapshot().accelerators
    #expect(views.first { $0.id == "card-0000:3b/acc0" }?.guests.isEmpty == true)
    #expect(views.first { $0.id == "card-0000:3b/acc1" }?.guests.map(\.guest) == ["vm-1"])
    #expect(store.persisted.contexts.map(\.acceleratorID) == ["card-0000:3b/acc1"])
    await second.close()
  }
}
