import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
@testable import FPGAAgentRuntime
import Synchronization
import Testing

/// The reconfiguration fence's bound: a publication parked behind a stuck API call must not hold
/// the reconfiguration past its limit.
@Suite struct DRAFenceTests {
  @Test(.timeLimit(.minutes(1))) func aParkedPublicationIsGivenUpAtTheLimit() async {
    // Parked the way a sync waits for its turn behind one stuck on the API server: on a
    // continuation that cancellation does not end.
    let parked = Mutex<CheckedContinuation<Void, Never>?>(nil)
    let published = await DRAService.within(.milliseconds(50)) {
      await withCheckedContinuation { continuation in parked.withLock { $0 = continuation } }
      return true
    }
    #expect(published == false)
    while parked.withLock({ $0 == nil }) { await Task.yield() }
    parked.withLock { $0?.resume() }
  }

  @Test func aPublicationWithinTheLimitCounts() async {
    #expect(await DRAService.within(.seconds(600)) { true })
    #expect(await DRAService.within(.seconds(600)) { false } == false)
  }
}
