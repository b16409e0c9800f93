import FPGAAgentAPI
import FPGACore
import FPGASimulator
import FPGAStore
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import Synchronization
import Foundation
import SwiftProtobuf

// fpga-agent-bench: throughput and latency of the node API against an echo baseline served by
// the same server stack, in the same process and the same run. Build with -c release.
//
//   fpga-agent-bench [--seconds S] [--concurrency N] [--rounds R] [--only rpc,durability,scheduler,web,attach]

struct Options {
  var seconds = 3.0
  var concurrency = 16
  var rounds = 3
  var attachCycles = 20
  /// Only these sections (rpc, durability, scheduler, web, attach); empty: all.
  var only: Set<String> = []

  func runs(_ section: String) -> Bool { only.isEmpty || only.contains(section) }

  init(_ arguments: [String]) {
    var iterator = arguments.makeIterator()
    while let argument = iterator.next() {
      switch argument {
      case "--seconds": seconds = iterator.next().flatMap(Double.init) ?? seconds
      case "--concurrency": concurrency = iterator.next().flatMap(Int.init) ?? concurrency
      case "--rounds": rounds = iterator.next().flatMap(Int.init) ?? rounds
      case "--attach-cycles": attachCycles = iterator.next().flatMap(Int.init) ?? attachCycles
      case "--only": only.formUnion((iterator.next() ?? "").split(separator: ",").map(String.init))
      default: print("unknown argument \(argument)")
      }
    }
  }
}

struct EchoService: Fpga_Bench_V1_Echo.SimpleServiceProtocol {
  func get(request: Fpga_Bench_V1_EchoMessage, context: ServerContext) async throws -> Fpga_Bench_V1_EchoMessage {
    request
  }
}

struct WallClockNow: WallClock {
  func now() -> WallTime { WallTime(seconds: 1_800_000_000) }
}

/// Latencies (in nanoseconds) and count of one measured phase.
struct Sample {
  var latencies: [Int64] = []
  var elapsed: Duration = .zero

  var throughput: Double { Double(latencies.count) / seconds(elapsed) }

  func percentile(_ p: Double) -> Double {
    guard !latencies.isEmpty else { return .nan }
    let sorted = latencies.sorted()
    let index = min(sorted.count - 1, Int((Double(sorted.count) * p).rounded(.up)) - 1)
    return Double(sorted[max(0, index)]) / 1e6
  }

  mutating func merge(_ other: Sample) {
    latencies += other.latencies
    elapsed += other.elapsed
  }
}

func seconds(_ duration: Duration) -> Double {
  Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}

func nanoseconds(_ duration: Duration) -> Int64 {
  duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000
}

/// Runs `operation` from `concurrency` tasks for `duration`; each call's latency is recorded.
func measure(concurrency: Int, duration: Duration, _ operation: @escaping @Sendable (Int) async throws -> Void)
  async throws -> Sample
{
  let clock = ContinuousClock()
  let start = clock.now
  let deadline = start + duration
  let latencies = try await withThrowingTaskGroup(of: [Int64].self) { group in
    for worker in 0..<concurrency {
      group.addTask {
        var local: [Int64] = []
        local.reserveCapacity(100_000)
        while clock.now < deadline {
          let began = clock.now
          try await operation(worker)
          local.append(nanoseconds(clock.now - began))
        }
        return local
      }
    }
    var all: [Int64] = []
    for try await part in group { all += part }
    return all
  }
  return Sample(latencies: latencies, elapsed: clock.now - start)
}

func format(_ value: Double, _ digits: Int = 2) -> String {
  let scale = pow10(digits)
  let rounded = (value * scale).rounded() / scale
  var text = "\(rounded)"
  if let dot = text.firstIndex(of: ".") {
    let decimals = text.distance(from: dot, to: text.endIndex) - 1
    if decimals < digits { text += String(repeating: "0", count: digits - decimals) }
  }
  return text
}

func pow10(_ n: Int) -> Double { (0..<n).reduce(1.0) { result, _ in result * 10 } }

func row(_ name: String, _ sample: Sample) -> String {
  name.padding(toLength: 34, withPad: " ", startingAt: 0)
    + "\(Int(sample.throughput))/s".padding(toLength: 12, withPad: " ", startingAt: 0)
    + "p50 \(format(sample.percentile(0.50), 3)) ms".padding(toLength: 18, withPad: " ", startingAt: 0)
    + "p99 \(format(sample.percentile(0.99), 3)) ms"
}

let options = Options(Array(CommandLine.arguments.dropFirst()))
var logger = Logger(label: "bench")
logger.logLevel = .critical

// A node of 4 full cards (4 × 252 VFs), as in the foundation issue's inventory figure.
// Every mutation is durable: the engine writes to SQLite (WAL, synchronous=NORMAL) as the agent does.
let node = SimulatedNode(config: .full(cards: 4))
let store = try SQLiteStateStore(path: try DurabilityBenchmark.directory() + "/state.sqlite")
let engine = NodeEngine(nodeID: "bench", platform: SimulatedPlatform(node: node), clock: WallClockNow(), store: store)
try await engine.rescan()
let service = NodeAgentService(engine: engine, hostname: "bench", agentVersion: "bench", logger: logger)
let server = GRPCServer(
  transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
  services: [service, EchoService()])

if options.runs("rpc") {
  try await withThrowingDiscardingTaskGroup { group in
    group.addTask { try await server.serve() }
    guard let port = try await server.listeningAddress?.ipv4?.port else { fatalError("server did not start") }
    try await withGRPCClient(
      transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext)
    ) { client in
      let echo = Fpga_Bench_V1_Echo.Client(wrapping: client)
      let nodeAgent = Fpga_Agent_V1_NodeAgent.Client(wrapping: client)
      let message = Fpga_Bench_V1_EchoMessage.with { $0.text = "owner=bench-worker constraints=none" }
      let duration = Duration.seconds(options.seconds)
      print(
        "fpga-agent-bench: \(options.concurrency) calls in flight, \(options.rounds) rounds of \(options.seconds) s per phase, one process, loopback TCP"
      )
      print("node: 4 cards x 4 PFs, \(await engine.status().counts.vfsEnabled) VFs enabled")

      // Warm-up.
      _ = try await measure(concurrency: options.concurrency, duration: .milliseconds(500)) { _ in
        _ = try await echo.get(message)
      }

      var echoPairs = Sample()
      var allocPairs = Sample()
      for _ in 0..<options.rounds {
        // Baseline: two echo calls back to back, the same shape as allocate-then-release.
        echoPairs.merge(
          try await measure(concurrency: options.concurrency, duration: duration) { _ in
            _ = try await echo.get(message)
            _ = try await echo.get(message)
          })
        allocPairs.merge(
          try await measure(concurrency: options.concurrency, duration: duration) { worker in
            let allocation = try await nodeAgent.allocateVF(.with { $0.owner = "bench-worker-\(worker)" })
            _ = try await nodeAgent.releaseVF(.with { $0.allocationID = allocation.allocation.id })
          })
      }
      print("")
      print(row("echo pair (2 x Echo.Get)", echoPairs))
      print(row("AllocateVF + ReleaseVF (durable)", allocPairs))
      let groups = store.groupStatistics.withLock { $0 }
      print(
        "group commit: \(groups.commits) commits in \(groups.transactions) transactions "
          + "(\(format(Double(groups.commits) / Double(max(groups.transactions, 1)), 1)) per transaction)")
      print(
        "ratio: throughput \(format(allocPairs.throughput / echoPairs.throughput))x echo (target >= 0.8), "
          + "p99 \(format(allocPairs.percentile(0.99) / echoPairs.percentile(0.99)))x echo (target <= 2)")

      // GetInventory of the full node: one call in flight, against a single echo.
      var echoSingle = Sample()
      var inventoryCached = Sample()
      var inventoryFresh = Sample()
      for _ in 0..<options.rounds {
        echoSingle.merge(try await measure(concurrency: 1, duration: duration) { _ in _ = try await echo.get(message) })
        inventoryCached.merge(
          try await measure(concurrency: 1, duration: duration) { _ in
            _ = try await nodeAgent.getInventory(.init())
          })
      }
      // A change before every call, so every GetInventory converts the whole inventory anew.
      let clock = ContinuousClock()
      let fresh = clock.now
      while clock.now - fresh < duration * options.rounds {
        let allocation = try await nodeAgent.allocateVF(.with { $0.owner = "bench" })
        let began = clock.now
        let inventory = try await nodeAgent.getInventory(.init())
        inventoryFresh.latencies.append(nanoseconds(clock.now - began))
        precondition(inventory.cards.count == 4 && inventory.allocations.count == 1)
        _ = try await nodeAgent.releaseVF(.with { $0.allocationID = allocation.allocation.id })
      }
      inventoryFresh.elapsed = clock.now - fresh
      print("")
      print(row("echo (1 in flight)", echoSingle))
      print(row("GetInventory 1008 VFs, same rev", inventoryCached))
      print(row("GetInventory 1008 VFs, new rev", inventoryFresh))
      print(
        "GetInventory p50: \(format(inventoryCached.percentile(0.5), 3)) ms unchanged, "
          + "\(format(inventoryFresh.percentile(0.5), 3)) ms after a change (target < 2 ms)")
    }
    server.beginGracefulShutdown()
  }

}
if options.runs("durability") { try await DurabilityBenchmark.run(rounds: options.rounds) }
if options.runs("scheduler") { try SchedulerBenchmark.run() }
if options.runs("web") {
  try await WebBenchmark.run(seconds: options.seconds, rounds: options.rounds, logger: logger)
}
if options.runs("attach") {
  try await AttachBenchmark.run(cycles: options.attachCycles, rounds: options.rounds, logger: logger)
}
fflush(nil)
exit(0)
