import FPGACore
import FPGASimulator
import Synchronization

/// A point in a fake where calls can be parked: a test sets a rule, waits until a matching call
/// is parked there, sends other requests meanwhile, then opens the gate. No sleeping: every
/// wait is on an event.
final class Gate<Call: Sendable>: Sendable {
  private struct State {
    var rule: (@Sendable (Call) -> Bool)?
    var remaining = 0
    var parked: [CheckedContinuation<Void, Never>] = []
    var parkedTotal = 0
    var arrivals: [CheckedContinuation<Void, Never>] = []
  }

  private let state = Mutex(State())

  /// The next `times` calls that match `rule` park until `open()`.
  func park(times: Int = 1, when rule: @escaping @Sendable (Call) -> Bool) {
    state.withLock {
      $0.rule = rule
      $0.remaining = times
    }
  }

  /// Called by the fake at the gated point.
  func pass(_ call: Call) async {
    let parks = state.withLock { state -> Bool in
      guard state.remaining > 0, let rule = state.rule, rule(call) else { return false }
      state.remaining -= 1
      return true
    }
    guard parks else { return }
    await withCheckedContinuation { continuation in
      let arrivals = state.withLock { state in
        state.parked.append(continuation)
        state.parkedTotal += 1
        defer { state.arrivals = [] }
        return state.arrivals
      }
      for arrival in arrivals { arrival.resume() }
    }
  }

  /// Returns once `count` calls in all have parked here.
  func parked(_ count: Int = 1) async {
    while state.withLock({ $0.parkedTotal < count }) {
      await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
        let reached = state.withLock { state -> Bool in
          if state.parkedTotal >= count { return true }
          state.arrivals.append(continuation)
          return false
        }
        if reached { continuation.resume() }
      }
    }
  }

  /// Lets every parked call go on; no more calls park.
  func open() {
    let parked = state.withLock { state in
      state.rule = nil
      state.remaining = 0
      defer { state.parked = [] }
      return state.parked
    }
    for continuation in parked { continuation.resume() }
  }
}

/// A memory store whose commits can be parked.
final class GatedStore: StateStore {
  let inner: MemoryStateStore
  let gate = Gate<[StoreChange]>()

  init(_ inner: MemoryStateStore = MemoryStateStore()) { self.inner = inner }

  func load() throws(AgentError) -> PersistedState { try inner.load() }

  func commit(_ changes: [StoreChange]) async throws(AgentError) {
    await gate.pass(changes)
    try await inner.commit(changes)
  }

  var persisted: PersistedState { inner.persisted }
}

/// The simulated platform with its calls parkable by name (`discover`, `vfHolders`,
/// `setVFCount`, `prepareForPassthrough`).
final class GatedPlatform: NodePlatform {
  let inner: SimulatedPlatform
  let gate = Gate<String>()

  init(_ inner: SimulatedPlatform) { self.inner = inner }

  func discover() async throws(AgentError) -> DiscoveredNode {
    await gate.pass("discover")
    return try await inner.discover()
  }

  func capabilities() async -> PlatformCapabilities { await inner.capabilities() }

  func prepareForPassthrough(vf: PCIAddress) async throws(AgentError) -> String {
    await gate.pass("prepareForPassthrough")
    return try await inner.prepareForPassthrough(vf: vf)
  }

  func setVFCount(
    pf: PCIAddress, to count: Int, whileBlocked: @escaping @Sendable (String) async -> Void
  ) async throws(AgentError) {
    await gate.pass("setVFCount")
    try await inner.setVFCount(pf: pf, to: count, whileBlocked: whileBlocked)
  }

  func vfHolders(pf: PCIAddress) async -> [PCIAddress: String] {
    await gate.pass("vfHolders")
    return await inner.vfHolders(pf: pf)
  }
}

/// The simulated hypervisor with its calls parkable by name (`attach`, `detach`, `pause`,
/// `resume`).
final class GatedHypervisor: Hypervisor {
  let inner: SimulatedHypervisor
  let gate = Gate<String>()

  init(_ inner: SimulatedHypervisor) { self.inner = inner }

  var passesThroughVFIO: Bool { inner.passesThroughVFIO }
  func machines() async -> [VirtualMachineInfo] { await inner.machines() }

  func attach(vf: PCIAddress, to vm: String, deviceID: String) async throws(AgentError) -> String {
    await gate.pass("attach")
    return try await inner.attach(vf: vf, to: vm, deviceID: deviceID)
  }

  func detach(deviceID: String, from vm: String, timeout: Duration) async throws(AgentError) {
    await gate.pass("detach")
    try await inner.detach(deviceID: deviceID, from: vm, timeout: timeout)
  }

  func pluggedDevices() async -> [PluggedDevice] { await inner.pluggedDevices() }

  func pause(deviceID: String, in vm: String) async throws(AgentError) {
    await gate.pass("pause")
    try await inner.pause(deviceID: deviceID, in: vm)
  }

  func resume(deviceID: String, in vm: String) async throws(AgentError) {
    await gate.pass("resume")
    try await inner.resume(deviceID: deviceID, in: vm)
  }
}

/// An accelerator control whose loads can be parked (a context switch in progress).
struct GatedAccelerator: AcceleratorControl {
  let kind = "simulated"
  let gate: Gate<String>

  func save(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration { .microseconds(10) }

  func load(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration {
    await gate.pass("load " + context)
    return .microseconds(10)
  }

  func run(context: String, for duration: Duration) async -> Duration {
    try? await Task.sleep(for: .seconds(3600))
    return .zero
  }
}

/// An engine on the simulated node with VMs, every seam gated.
struct GatedNode {
  let engine: NodeEngine
  let node: SimulatedNode
  let store: GatedStore
  let platform: GatedPlatform
  let hypervisor: GatedHypervisor
  let acceleratorGate = Gate<String>()

  static let accelerators = ["card-0000:3b/acc0", "card-0000:3b/acc1"]

  init(store: GatedStore = GatedStore()) async throws {
    node = SimulatedNode()
    self.store = store
    platform = GatedPlatform(SimulatedPlatform(node: node))
    hypervisor = GatedHypervisor(SimulatedHypervisor(node: node))
    let gate = acceleratorGate
    let runners = Self.accelerators.map {
      AcceleratorRunner(
        spec: AcceleratorSpec(id: $0, cardID: "card-0000:3b", nominalSwitchCost: .microseconds(20)),
        control: GatedAccelerator(gate: gate))
    }
    engine = NodeEngine(
      nodeID: "n", platform: platform, clock: StillClock(), hypervisor: hypervisor, store: store,
      accelerators: runners)
    _ = try await engine.restore()
    try await engine.rescan()
    // The loops run as the agent's accelerator service runs them; they end with `close()`.
    Task { [engine] in await engine.runAccelerators() }
  }
}
