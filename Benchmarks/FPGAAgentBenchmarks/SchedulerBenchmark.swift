import FPGACore
import Foundation

/// Time-sharing of one accelerator in virtual time: fairness (Jain's index of service per
/// weight), utilization against the ideal given the switch cost, and the wall-clock cost of a
/// scheduling decision against a plain round-robin pick over the same guests (the baseline).
enum SchedulerBenchmark {
  static func run() throws {
    print("")
    print("time sharing, one accelerator, all guests backlogged, 10 ms slices, 60 s of virtual time")
    print("guests  weights   switch  fairness  utilization  ideal    vs ideal  decision    round-robin  ratio")
    let slice = Duration.milliseconds(10)
    for count in [2, 4, 8] {
      for weighted in [false, true] {
        for costShare in [0.01, 0.05, 0.20] {
          let guests = (0..<count).map { "g\($0)" }
          let pattern: [UInt32] = [1, 2, 4]
          let weights =
            weighted ? Dictionary(uniqueKeysWithValues: guests.enumerated().map { ($1, pattern[$0 % 3]) }) : [:]
          let cost = Duration.microseconds(Int64(10_000 * costShare))
          let scheduler = TimeSharingScheduler(
            policy: .init(slice: slice, weights: weights, overcommitLimit: count), switchCost: cost)
          var simulation = try SharingSimulation(scheduler: scheduler, loads: guests.map { .init(guest: $0) })
          let clock = ContinuousClock()
          let began = clock.now
          let result = simulation.run(until: .seconds(60))
          let perDecision = seconds(clock.now - began) / Double(result.decisions) * 1e9
          let normalized = guests.map { seconds(result.served[$0]!) / Double(weights[$0] ?? 1) }
          let ideal = 1.0 / (1.0 + costShare)
          let baseline = roundRobinCost(guests: count, decisions: result.decisions)
          print(
            "\(count)".padding(toLength: 8, withPad: " ", startingAt: 0)
              + (weighted ? "1:2:4" : "equal").padding(toLength: 10, withPad: " ", startingAt: 0)
              + "\(Int(costShare * 100))%".padding(toLength: 8, withPad: " ", startingAt: 0)
              + format(jainFairness(normalized), 6).padding(toLength: 10, withPad: " ", startingAt: 0)
              + format(result.utilization * 100, 2).padding(toLength: 13, withPad: " ", startingAt: 0)
              + format(ideal * 100, 2).padding(toLength: 9, withPad: " ", startingAt: 0)
              + "\(format(result.utilization / ideal * 100, 1))%".padding(toLength: 10, withPad: " ", startingAt: 0)
              + "\(format(perDecision, 0)) ns".padding(toLength: 12, withPad: " ", startingAt: 0)
              + "\(format(baseline, 0)) ns".padding(toLength: 13, withPad: " ", startingAt: 0)
              + "\(format(perDecision / baseline, 1))x")
        }
      }
    }
  }

  /// The same bookkeeping shape with the simplest policy: the next guest in a ring.
  static func roundRobinCost(guests: Int, decisions: Int) -> Double {
    var served = [Double](repeating: 0, count: guests)
    var pending = [Double](repeating: 1e9, count: guests)
    var index = 0
    let clock = ContinuousClock()
    let began = clock.now
    for _ in 0..<decisions {
      index = (index + 1) % guests
      if pending[index] > 0 {
        served[index] += 0.01
        pending[index] -= 0.01
      }
    }
    let elapsed = seconds(clock.now - began) / Double(decisions) * 1e9
    precondition(served.reduce(0, +) > 0)
    return max(elapsed, 0.1)
  }
}
