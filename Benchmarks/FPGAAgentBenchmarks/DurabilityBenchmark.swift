import FPGACore
import FPGASimulator
import FPGAStore
import Foundation

/// The cost of durability and of the reconfiguration machinery, each against a baseline
/// measured in the same run: allocate+release pairs on the engine with an in-memory store
/// vs SQLite; start-up with 1,000 stored allocations vs an empty store; a reconfiguration vs
/// the bare platform writes it makes.
enum DurabilityBenchmark {
  static func directory() throws -> String {
    let path = NSTemporaryDirectory() + "fpga-bench-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
  }

  static func run(rounds: Int) async throws {
    print("")
    print("durability (engine calls, no RPC; median of \(rounds) rounds of 2,000 allocate+release pairs)")
    var perPair: [String: [Double]] = [:]
    for _ in 0..<rounds {
      for (name, makeStore) in [
        ("memory", { () throws -> any StateStore in MemoryStateStore() }),
        (
          "sqlite process", { () throws -> any StateStore in try SQLiteStateStore(path: try directory() + "/s.sqlite") }
        ),
        (
          "sqlite power",
          {
            () throws -> any StateStore in try SQLiteStateStore(path: try directory() + "/s.sqlite", durability: .power)
          }
        ),
      ] {
        let engine = NodeEngine(
          nodeID: "b", platform: SimulatedPlatform(node: SimulatedNode(config: .full(cards: 1))), clock: WallClockNow(),
          store: try makeStore())
        try await engine.rescan()
        let pairs = name == "sqlite power" ? 200 : 2000
        let clock = ContinuousClock()
        let began = clock.now
        for index in 0..<pairs {
          let made = try await engine.allocate(
            AllocateRequest(meta: RequestMeta(idempotencyKey: "k-\(index)"), owner: "bench"))
          _ = try await engine.release(ReleaseRequest(allocationID: made.allocation.id))
        }
        perPair[name, default: []].append(seconds(clock.now - began) / Double(pairs) * 1e6)
      }
    }
    func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }
    let memory = median(perPair["memory"]!)
    for name in ["memory", "sqlite process", "sqlite power"] {
      let value = median(perPair[name]!)
      print(
        "  \(name.padding(toLength: 16, withPad: " ", startingAt: 0)) \(format(value, 1)) us per pair (\(format(value / memory))x memory)"
      )
    }

    print("")
    print("restart to serving (open store, restore, scan, reconcile; median of \(rounds * 3))")
    let full = try directory()
    do {
      let engine = NodeEngine(
        nodeID: "b", platform: SimulatedPlatform(node: SimulatedNode(config: .full(cards: 4))), clock: WallClockNow(),
        store: try SQLiteStateStore(path: full + "/state.sqlite"))
      try await engine.rescan()
      for index in 0..<1000 {
        _ = try await engine.allocate(
          AllocateRequest(meta: RequestMeta(idempotencyKey: "key-\(index)"), owner: "bench-\(index)"))
      }
    }
    var empty: [Double] = []
    var stored: [Double] = []
    for _ in 0..<(rounds * 3) {
      empty.append(try await startUp(directory: try directory(), expect: 0))
      stored.append(try await startUp(directory: full, expect: 1000))
    }
    print("  empty store            \(format(median(empty), 1)) ms")
    print("  1,000 allocations      \(format(median(stored), 1)) ms (+1,000 idempotency keys; target < 500 ms)")

    print("")
    print("reconfiguration overhead (PF of 64 VFs, 64 -> 0 -> 64 as 2 operations, 4 VFs attached, detach-reattach)")
    var agent: [Double] = []
    var bare: [Double] = []
    for _ in 0..<rounds {
      agent.append(try await reconfigure())
      bare.append(try await bareWrites())
    }
    let overhead = median(agent) - median(bare)
    print("  bare platform writes   \(format(median(bare), 2)) ms")
    print("  agent operations       \(format(median(agent), 2)) ms (journaled steps, SQLite, simulated VMs)")
    print("  overhead               \(format(overhead / 128 * 1000, 1)) us per VF removed or created")
  }

  /// What `AgentRuntime.run` does before it serves, timed.
  static func startUp(directory: String, expect: Int) async throws -> Double {
    let clock = ContinuousClock()
    let began = clock.now
    let engine = NodeEngine(
      nodeID: "b", platform: SimulatedPlatform(node: SimulatedNode(config: .full(cards: 4))), clock: WallClockNow(),
      store: try SQLiteStateStore(path: directory + "/state.sqlite"))
    let persisted = try await engine.restore()
    try await engine.rescan()
    _ = await engine.recover(from: persisted)
    _ = await engine.reconcile()
    let elapsed = seconds(clock.now - began) * 1000
    let count = try await engine.snapshot().allocations.count
    precondition(count == expect)
    return elapsed
  }

  static let pf = PCIAddress("0000:10:00.0")!

  static func reconfigure() async throws -> Double {
    let node = SimulatedNode(config: .full(cards: 1))
    let hypervisor = SimulatedHypervisor(node: node, vms: [.init(name: "vm-1", rootPorts: 8)])
    let engine = NodeEngine(
      nodeID: "b", platform: SimulatedPlatform(node: node), clock: WallClockNow(), hypervisor: hypervisor,
      store: try SQLiteStateStore(path: try directory() + "/state.sqlite"))
    try await engine.rescan()
    for _ in 0..<4 {
      let made = try await engine.allocate(AllocateRequest(owner: "b", constraints: .init(pf: pf)))
      _ = try await engine.attach(AttachRequest(allocationID: made.allocation.id, vm: "vm-1"))
    }
    let clock = ContinuousClock()
    let began = clock.now
    for count in [0, 64] {
      let operation = try await engine.reconfigure(ReconfigureRequest(pf: pf, count: count, strategy: .detachReattach))
      await engine.waitForOperation(operation.id)
      let state = try await engine.operation(operation.id).state
      precondition(state == .succeeded)
    }
    return seconds(clock.now - began) * 1000
  }

  /// The same kernel writes without the agent: the simulated hardware's own cost.
  static func bareWrites() async throws -> Double {
    let node = SimulatedNode(config: .full(cards: 1))
    let platform = SimulatedPlatform(node: node)
    let clock = ContinuousClock()
    let began = clock.now
    try await platform.setVFCount(pf: pf, to: 0) { _ in }
    _ = node.scan()
    try await platform.setVFCount(pf: pf, to: 64) { _ in }
    _ = node.scan()
    for vf in node.scan().pfs[0].vfs.prefix(4) { _ = try await platform.prepareForPassthrough(vf: vf.address) }
    return seconds(clock.now - began) * 1000
  }
}
