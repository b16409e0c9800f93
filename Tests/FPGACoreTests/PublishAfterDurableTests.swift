import FPGACore
import FPGASimulator
import Testing

/// Nothing reaches a watcher (the node API's WatchInventory, and through it the orchestrator
/// link, the DRA slice publisher and the dashboard's events) before the store has it: a
/// mutation whose commit fails publishes nothing, and one whose commit is parked is not seen yet.
@Suite struct PublishAfterDurableTests {
  let pf = PCIAddress("0000:3b:00.0")!

  /// Every change a watcher received, up to and including the first event whose changes
  /// `last` matches (a successful mutation made after the failed ones, as a marker).
  func changes(
    _ subscription: InventorySubscription, until last: (InventoryChange) -> Bool
  ) async -> [InventoryChange] {
    var seen: [InventoryChange] = []
    for await event in subscription.events {
      guard case .delta(_, let changes) = event else { continue }
      seen += changes
      if changes.contains(where: last) { break }
    }
    subscription.cancel()
    return seen
  }

  @Test func aFailedCommitPublishesNothing() async throws {
    let n = try await GatedNode()
    let kept = try await n.engine.allocate(AllocateRequest(owner: "kept", vm: "vm-1", constraints: .init(pf: pf)))
    let start = await n.engine.status().revision
    let subscription = await n.engine.watch(from: start)

    n.store.inner.failNext(1)
    await #expect(throws: AgentError.self) {
      _ = try await n.engine.allocate(AllocateRequest(owner: "lost", constraints: .init(pf: pf)))
    }
    n.store.inner.failNext(1)
    await #expect(throws: AgentError.self) {
      _ = try await n.engine.drain(.pf(pf), releaseUnattached: true, meta: .init())
    }
    n.store.inner.failNext(1)
    await #expect(throws: AgentError.self) {
      _ = try await n.engine.release(ReleaseRequest(allocationID: kept.allocation.id))
    }
    n.store.inner.failNext(1)
    await #expect(throws: AgentError.self) {
      _ = try await n.engine.undrain(.pf(pf), meta: .init())  // not draining: its write fails all the same
    }
    #expect(await n.engine.status().revision == start)
    let snapshot = try await n.engine.snapshot()
    #expect(snapshot.allocations.map(\.owner) == ["kept"])
    #expect(snapshot.cards.flatMap(\.pfs).allSatisfy { !$0.draining })

    // A mutation that succeeds is the first thing the watcher sees.
    let marker = try await n.engine.allocate(AllocateRequest(owner: "marker", constraints: .init(pf: pf)))
    let seen = await changes(subscription) {
      if case .allocationUpdated(let allocation) = $0 { allocation.id == marker.allocation.id } else { false }
    }
    for change in seen {
      switch change {
      case .allocationUpdated(let allocation): #expect(allocation.owner == "marker")
      case .allocationRemoved(let id): Issue.record("published the removal of \(id), never durable")
      case .pfUpdated(_, let draining): #expect(!draining, "published a drain flag that was never durable")
      default: continue
      }
    }
    #expect(marker.revision == start + 1)
  }

  /// While an allocation's commit is parked: no watcher and no snapshot sees it, its VF is not
  /// chosen by another request, and its PF cannot be reconfigured from under it.
  @Test func anAllocationInFlightIsInvisibleButItsVFIsTaken() async throws {
    let n = try await GatedNode()
    let start = await n.engine.status().revision
    let subscription = await n.engine.watch(from: start)
    n.store.gate.park { $0.contains { if case .putAllocation = $0 { true } else { false } } }
    let first = Task { try await n.engine.allocate(AllocateRequest(owner: "first", constraints: .init(pf: pf))) }
    await n.store.gate.parked()
    #expect(try await n.engine.snapshot().allocations.isEmpty)
    #expect(await n.engine.status().revision == start)
    await #expect {
      _ = try await n.engine.reconfigure(ReconfigureRequest(pf: pf, count: 2))
    } throws: { error in
      let error = error as! AgentError
      return error.code == .aborted && error.message.contains("is being recorded")
    }
    n.store.gate.open()
    let result = try await first.value
    let second = try await n.engine.allocate(AllocateRequest(owner: "second", constraints: .init(pf: pf)))
    #expect(second.allocation.vf != result.allocation.vf)
    await #expect {
      _ = try await n.engine.allocate(AllocateRequest(owner: "third", constraints: .init(vf: result.allocation.vf)))
    } throws: { error in
      (error as! AgentError).message.contains("is already allocated (\(result.allocation.id))")
    }
    let seen = await changes(subscription) {
      if case .allocationUpdated(let allocation) = $0 { allocation.id == second.allocation.id } else { false }
    }
    let published = seen.compactMap { change -> String? in
      if case .allocationUpdated(let allocation) = change { allocation.owner } else { nil }
    }
    #expect(published == ["first", "second"])
    #expect(result.revision == start + 1)
  }

  /// The same VF asked for exactly while another request is allocating it.
  @Test func anExactVFBeingAllocatedIsRefusedNamingTheAllocation() async throws {
    let n = try await GatedNode()
    let vf = try #require(n.node.scan().pfs.first { $0.function.address == pf }?.vfs.first?.address)
    n.store.gate.park { $0.contains { if case .putAllocation = $0 { true } else { false } } }
    let first = Task { try await n.engine.allocate(AllocateRequest(owner: "first", constraints: .init(vf: vf))) }
    await n.store.gate.parked()
    await #expect {
      _ = try await n.engine.allocate(AllocateRequest(owner: "second", constraints: .init(vf: vf)))
    } throws: { error in
      let error = error as! AgentError
      return error.code == .failedPrecondition && error.message.contains("VF \(vf) is already allocated (alloc-")
    }
    n.store.gate.open()
    #expect(try await first.value.allocation.vf == vf)
  }
}
