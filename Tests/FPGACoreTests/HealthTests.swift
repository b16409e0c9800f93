import Testing

@testable import FPGACore

@Suite struct HealthTrackerTests {
  let vf = PCIAddress("0000:3b:00.4")!
  let t0 = WallTime(seconds: 1_800_000_000)

  func at(_ seconds: Int64) -> WallTime { WallTime(seconds: t0.seconds + seconds) }

  @Test func countersAreJudgedFromTheFirstScanAndByRate() {
    var tracker = HealthTracker(policy: HealthPolicy(correctableErrorsPerMinute: 60))
    // Uncorrectable errors logged before the agent first saw the device are not new errors: the
    // device is degraded with their figure (aer-history), not unhealthy, until an operator
    // accepts them.
    let first = tracker.assess(
      vf, readings: HealthReadings(correctableErrors: 500, nonfatalErrors: 0, fatalErrors: 3), now: t0)
    #expect(first.state == .degraded && first.reasons.map(\.kind) == ["aer-history"])
    #expect(
      first.reasons[0].detail.hasPrefix("3 uncorrectable fatal errors (AER) logged before the agent first saw it"))
    let cleared = tracker.clear(vf, note: "known")
    #expect(cleared)
    #expect(
      tracker.assess(vf, readings: HealthReadings(correctableErrors: 500, nonfatalErrors: 0, fatalErrors: 3), now: t0)
        .state == .healthy)
    // 30 more correctable in 60 s: 30/min, under the threshold.
    #expect(
      tracker.assess(
        vf, readings: HealthReadings(correctableErrors: 530, nonfatalErrors: 0, fatalErrors: 3), now: at(60)
      ).state == .healthy)
    // 200 in 60 s: degraded, with the figure.
    let degraded = tracker.assess(
      vf, readings: HealthReadings(correctableErrors: 730, nonfatalErrors: 0, fatalErrors: 3), now: at(120))
    #expect(degraded.state == .degraded && degraded.since == at(120))
    #expect(degraded.reasons.first?.detail.contains("200 correctable errors in 60 s") == true)
    // Quiet again: healthy.
    #expect(
      tracker.assess(
        vf, readings: HealthReadings(correctableErrors: 730, nonfatalErrors: 0, fatalErrors: 3), now: at(180)
      ).state == .healthy)
    // One new fatal error: unhealthy, and it stays so (since the first time it was seen).
    let fatal = tracker.assess(
      vf, readings: HealthReadings(correctableErrors: 730, nonfatalErrors: 0, fatalErrors: 4), now: at(240))
    #expect(fatal.state == .unhealthy && !fatal.isUsable)
    #expect(
      fatal.reasons.map(\.kind) == ["aer-fatal"] && fatal.reasons[0].detail.hasPrefix("1 uncorrectable fatal error"))
    let later = tracker.assess(
      vf, readings: HealthReadings(correctableErrors: 730, nonfatalErrors: 0, fatalErrors: 4), now: at(300))
    #expect(later.state == .unhealthy && later.since == at(240) && later.reasons[0].since == at(240))
  }

  @Test func aDegradedLinkAnUnboundDriverAndAllOnes() {
    var tracker = HealthTracker()
    let link = tracker.assess(
      vf,
      readings: HealthReadings(
        linkSpeed: "8.0 GT/s PCIe", maxLinkSpeed: "8.0 GT/s PCIe", linkWidth: 4, maxLinkWidth: 16),
      now: t0)
    #expect(link.state == .degraded && link.summary == "link-width: link trained at x4 of x16")
    // The kernel's "unknown" maximum width (255, a capabilities register reading 0) is not a
    // degraded link.
    let unknown = tracker.assess(
      PCIAddress("0000:3b:00.7")!, readings: HealthReadings(linkWidth: 1, maxLinkWidth: 255), now: t0)
    #expect(unknown.state == .healthy)
    let slow = tracker.assess(
      vf,
      readings: HealthReadings(
        linkSpeed: "2.5 GT/s PCIe", maxLinkSpeed: "8.0 GT/s PCIe", linkWidth: 16, maxLinkWidth: 16),
      now: t0)
    #expect(slow.reasons.map(\.kind) == ["link-speed"])
    // A PF bound to qdma-pf when first seen, unbound since.
    let pf = PCIAddress("0000:3b:00.0")!
    _ = tracker.assess(pf, readings: HealthReadings(driver: "qdma-pf"), now: t0)
    let unbound = tracker.assess(pf, readings: HealthReadings(driver: nil), now: at(1))
    #expect(unbound.state == .degraded && unbound.summary.contains("bound to no driver, was qdma-pf"))
    // A VF the agent bound to vfio-pci, now bound to something else.
    let stolen = tracker.assess(vf, readings: HealthReadings(expectedDriver: "vfio-pci", driver: "qdma-vf"), now: at(2))
    #expect(stolen.summary == "driver: bound to qdma-vf, expected vfio-pci")
    let unheld = tracker.assess(
      PCIAddress("0000:3b:00.6")!,
      readings: HealthReadings(expectedDriver: "vfio-pci", driver: "vfio-pci", unheldBy: "vm-1"), now: at(2))
    #expect(
      unheld.state == .degraded
        && unheld.summary == "vfio-holder: recorded as attached to vm-1, but no process holds its VFIO group open")
    let dead = tracker.assess(
      vf, readings: HealthReadings(configAllOnes: true, expectedDriver: "vfio-pci", driver: "vfio-pci"), now: at(3))
    #expect(dead.state == .unhealthy && dead.reasons.map(\.kind) == ["config-unreadable"])
  }

  @Test func noReadingsMeansNothingWrongButNoIOMMUGroupIsUnusable() {
    var tracker = HealthTracker()
    #expect(tracker.assess(vf, readings: nil, now: t0) == DeviceHealth(state: .healthy, reasons: [], since: t0))
    #expect(tracker.assess(vf, readings: nil, noIOMMUGroup: true, now: t0).state == .unhealthy)
    #expect(WallTime(seconds: 1_800_000_000).description == "2027-01-15T08:00:00Z")
  }
}

/// Health through the production platform on the simulated kernel.
@Suite struct RecreatedVFHealthTests {
  /// A VF count change re-creates a PF's VFs at the same addresses, without a driver (autoprobe
  /// off): they are new functions, not VFs whose vfio-pci binding was lost.
  @Test func vfsRecreatedByAReconfigurationAreHealthy() async throws {
    let (engine, _) = try await makeEngine()
    let pf = address("0000:3b:00.0")
    let before = try await engine.snapshot().cards.flatMap(\.pfs).first { $0.function.address == pf }!
    #expect(before.vfs.count == 16 && before.vfs.allSatisfy { $0.function.driver == "vfio-pci" })
    let operation = try await engine.reconfigure(ReconfigureRequest(pf: pf, count: 8, strategy: .detachReattach))
    await engine.waitForOperation(operation.id)
    try await engine.rescan()
    let after = try await engine.snapshot().cards.flatMap(\.pfs).first { $0.function.address == pf }!
    #expect(after.vfs.count == 8)
    #expect(
      after.vfs.allSatisfy { $0.function.health.state == .healthy }, "\(after.vfs.map(\.function.health.summary))")
    #expect(await engine.status().health == .serving)
  }
}
