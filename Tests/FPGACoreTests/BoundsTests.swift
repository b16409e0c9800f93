import FPGACore
import FPGASimulator
import Testing

/// The ranges of client input (`Bounds`), their checks, and the saturating arithmetic behind them.
@Suite struct BoundsTests {
  @Test func saturatingNanosecondsIsExactInRangeAndSaturatesOutside() {
    #expect(Duration.zero.saturatingNanoseconds == 0)
    #expect(Duration.milliseconds(10).saturatingNanoseconds == 10_000_000)
    #expect((Duration.seconds(-3) + .nanoseconds(5)).saturatingNanoseconds == -2_999_999_995)
    #expect(Duration.nanoseconds(Int64.max).saturatingNanoseconds == .max)
    #expect(Duration.nanoseconds(Int64.min).saturatingNanoseconds == .min)
    // 2^62 s is 4.6e27 ns: far past Int64, which the old multiplication trapped on.
    #expect(Duration.seconds(Int64(1) << 62).saturatingNanoseconds == .max)
    #expect(Duration.seconds(-(Int64(1) << 62)).saturatingNanoseconds == .min)
    #expect((Duration.seconds(Int64.max) + .nanoseconds(999_999_999)).saturatingNanoseconds == .max)
    #expect(Duration.seconds(Int64.min).saturatingNanoseconds == .min)
    // The largest whole second that fits, then its fraction pushing it over.
    let last = Int64.max / 1_000_000_000
    #expect(Duration.seconds(last).saturatingNanoseconds == last * 1_000_000_000)
    #expect((Duration.seconds(last) + .nanoseconds(999_999_999)).saturatingNanoseconds == .max)
  }

  @Test func durationsAreCheckedPartByPartThenAgainstTheirRange() throws {
    func slice(_ seconds: Int64, _ nanos: Int32) throws(AgentError) -> Duration {
      try Validate.duration(
        seconds: seconds, nanos: nanos, field: "policy.time_slice", in: Bounds.timeSlice,
        rangeText: Bounds.timeSliceText)
    }
    #expect(try slice(0, 100_000) == .microseconds(100))
    #expect(try slice(10, 0) == .seconds(10))
    for (seconds, nanos) in [
      (Int64(1) << 62, Int32(0)), (.max, 999_999_999), (.min, 0), (10, 1), (0, 99_999), (0, 0), (-1, 0),
    ] {
      let error = #expect(throws: AgentError.self) { try slice(seconds, nanos) }
      #expect(error?.code == .invalidArgument)
      #expect(error?.message.contains("policy.time_slice") == true && error?.message.contains("100 µs to 10 s") == true)
    }
    // Parts a Duration message may not have: nanos past a second, or of the other sign.
    for (seconds, nanos) in [(Int64(0), Int32(1_000_000_000)), (0, .min), (1, -1), (-1, 1), (0, .max)] {
      let error = #expect(throws: AgentError.self) { try slice(seconds, nanos) }
      #expect(error?.message.contains("not a valid duration") == true)
    }
  }

  @Test func numbersNameTheirFieldAndRange() throws {
    #expect(try Validate.number(UInt32(64), field: "policy.overcommit_limit", in: Bounds.overcommitLimit) == 64)
    let error = #expect(throws: AgentError.self) {
      try Validate.number(UInt32.max, field: "policy.overcommit_limit", in: Bounds.overcommitLimit, note: "guests")
    }
    #expect(error?.message == "policy.overcommit_limit 4294967295 is out of range: 1-64 (guests)")
  }

  /// Defence in depth: the engine, given a slice no door let through, refuses it without
  /// trapping and without changing anything (no epoch raised, no revision, no key recorded).
  @Test func theEngineRefusesAnOverflowingSliceWithoutTrapping() async throws {
    let runner = AcceleratorRunner(
      spec: AcceleratorSpec(id: "card-0000:3b/acc0", cardID: "card-0000:3b", nominalSwitchCost: .microseconds(20)),
      control: SimulatedAccelerator())
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: SimulatedNode()), clock: StillClock(), accelerators: [runner])
    let revision = await engine.revision
    let meta = RequestMeta(idempotencyKey: "huge", orchestratorEpoch: 7)
    for slice in [Duration.seconds(Int64(1) << 62), .seconds(Int64.max), .seconds(Int64.min)] {
      let error = await #expect(throws: AgentError.self) {
        _ = try await engine.setSharingPolicy(
          acceleratorID: "card-0000:3b/acc0", policy: .init(slice: slice), meta: meta)
      }
      #expect(error?.code == .invalidArgument)
    }
    #expect(await engine.highestEpoch == 0)
    #expect(await engine.revision == revision)
    // The key was not recorded: the same key with a valid policy is a first request.
    let applied = try await engine.setSharingPolicy(
      acceleratorID: "card-0000:3b/acc0", policy: .init(slice: .milliseconds(5)), meta: meta)
    #expect(applied.slice == .milliseconds(5))
    #expect(await engine.highestEpoch == 7)
    await engine.close()
  }
}
