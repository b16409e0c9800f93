public import FPGACore

/// An accelerator slot of a simulated card: saving or loading a context takes a fixed time plus
/// its state size over the card's bandwidth (like a DMA of the state to host memory); running
/// takes the time asked, or less when preempted.
public struct SimulatedAccelerator: AcceleratorControl {
  public let kind = "simulated"
  /// Fixed part of a save or a load (the user logic's own handshake).
  public var fixed: Duration
  /// Bytes per second moved while saving or loading state.
  public var bandwidth: UInt64

  public init(fixed: Duration = .microseconds(200), bandwidth: UInt64 = 4 << 30) {
    self.fixed = fixed
    self.bandwidth = max(1, bandwidth)
  }

  /// What one save or load of `stateBytes` costs.
  public func transferTime(_ stateBytes: UInt64) -> Duration {
    fixed + .nanoseconds(Int64(Double(stateBytes) / Double(bandwidth) * 1e9))
  }

  public func save(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration {
    await wait(transferTime(stateBytes))
  }

  public func load(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration {
    await wait(transferTime(stateBytes))
  }

  public func run(context: String, for duration: Duration) async -> Duration {
    await wait(duration)
  }

  private func wait(_ duration: Duration) async -> Duration {
    let clock = ContinuousClock()
    let began = clock.now
    try? await Task.sleep(for: duration)
    return min(duration, clock.now - began)
  }
}
