import FPGACore
import FPGASimulator
import Testing

@Suite struct InventoryWatchTests {
  @Test func aWatchStartsWithASnapshotThenDeltas() async throws {
    let (engine, _) = try await makeEngine()
    let subscription = await engine.watch(from: 0)
    var events = subscription.events.makeAsyncIterator()
    guard case .snapshot(let snapshot, let resync)? = await events.next() else {
      Issue.record("expected a snapshot first")
      return
    }
    #expect(!resync)
    #expect(snapshot.cards.count == 2 && snapshot.revision == 1)
    let allocation = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    guard case .delta(let revision, let changes)? = await events.next() else {
      Issue.record("expected a delta")
      return
    }
    #expect(revision == 2)
    #expect(changes.first == .allocationUpdated(allocation))
    #expect(changes.contains { if case .vfUpdated(let view) = $0 { view.state == .allocated } else { false } })
    subscription.cancel()
  }

  @Test func resumingFromAKnownRevisionReplaysOnlyTheMissedDeltas() async throws {
    let (engine, _) = try await makeEngine()
    let a = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    _ = try await engine.release(ReleaseRequest(allocationID: a.id))
    // The client saw revision 2 (the allocation); it missed 3 (the release).
    let subscription = await engine.watch(from: 2)
    var events = subscription.events.makeAsyncIterator()
    let event = await events.next()
    #expect(event?.revision == 3)
    if case .delta(_, let changes)? = event {
      #expect(changes.first == .allocationRemoved(a.id))
    } else {
      Issue.record("expected a delta, got \(String(describing: event))")
    }
    subscription.cancel()
  }

  @Test func resumingFromATooOldRevisionSendsAResyncSnapshot() async throws {
    let (engine, _) = try await makeEngine(changeLogCapacity: 2)
    for _ in 0..<4 { _ = try await engine.allocate(AllocateRequest(owner: "o")) }
    for from in [UInt64(1), 99] {  // forgotten, and never existed
      let subscription = await engine.watch(from: from)
      var events = subscription.events.makeAsyncIterator()
      guard case .snapshot(let snapshot, let resync)? = await events.next() else {
        Issue.record("expected a snapshot")
        return
      }
      #expect(resync)
      #expect(snapshot.revision == 5 && snapshot.allocations.count == 4)
      subscription.cancel()
    }
  }

  @Test func revisionsIncreaseByOneWithEveryChange() async throws {
    let (engine, _) = try await makeEngine()
    let subscription = await engine.watch(from: await engine.revision)
    var ids: [String] = []
    for _ in 0..<5 { ids.append(try await engine.allocate(AllocateRequest(owner: "o")).allocation.id) }
    for id in ids { _ = try await engine.release(ReleaseRequest(allocationID: id)) }
    var revisions: [UInt64] = []
    for await event in subscription.events {
      revisions.append(event.revision)
      if revisions.count == 10 { break }
    }
    #expect(revisions == Array(2...11))
    subscription.cancel()
  }

  @Test func aWatcherThatFallsBehindIsCutOffAndCanResume() async throws {
    let (engine, _) = try await makeEngine(watchBufferLimit: 3)
    let subscription = await engine.watch(from: 1)
    for _ in 0..<6 { _ = try await engine.allocate(AllocateRequest(owner: "o")) }
    var received: [UInt64] = []
    for await event in subscription.events { received.append(event.revision) }
    #expect(subscription.wasLagged)
    #expect(received == [2, 3, 4])
    let resumed = await engine.watch(from: received.last!)
    var iterator = resumed.events.makeAsyncIterator()
    #expect(await iterator.next()?.revision == 5)
    resumed.cancel()
  }

  @Test func closeEndsEveryWatch() async throws {
    let (engine, _) = try await makeEngine()
    let subscription = await engine.watch(from: 0)
    await engine.close()
    var count = 0
    for await _ in subscription.events { count += 1 }
    #expect(count == 1, "the snapshot, then the end")
    #expect(!subscription.wasLagged)
  }

  @Test func rescanTurnsPlatformChangesIntoDeltasAndEndsAllocationsOfVanishedVFs() async throws {
    let (engine, node) = try await makeEngine()
    let pf = address("0000:3b:00.3")
    let allocation = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf))).allocation
    let subscription = await engine.watch(from: await engine.revision)
    try await node.writeNumVFs(pf: pf, "0")
    try await engine.rescan()
    var iterator = subscription.events.makeAsyncIterator()
    guard case .delta(_, let changes)? = await iterator.next() else {
      Issue.record("expected a delta")
      return
    }
    #expect(changes.contains(.allocationRemoved(allocation.id)))
    #expect(changes.filter { if case .vfRemoved = $0 { true } else { false } }.count == 4)
    #expect(try await engine.snapshot().allocations.isEmpty)
    subscription.cancel()
  }
}

@Suite struct DrainTests {
  @Test func aDrainedPFTakesNoAllocationsUntilUndrained() async throws {
    let (engine, _) = try await makeEngine()
    let pf = address("0000:3b:00.1")
    let held = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf))).allocation
    let record = try await engine.drain(.pf(pf), releaseUnattached: false, meta: .init())
    #expect(record.state == .succeeded && record.kind == "drain")
    #expect(record.impacts.map(\.outcome) == ["kept"])
    await #expect(throws: AgentError.self) {
      try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf)))
    }
    #expect(try await engine.operation(record.id) == record)
    _ = try await engine.undrain(.pf(pf), meta: .init())
    _ = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: pf)))
    #expect(try await engine.snapshot().allocations.contains { $0.id == held.id })
  }

  @Test func drainingACardCanReleaseUnattachedAllocations() async throws {
    let (engine, _) = try await makeEngine()
    let held = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(cardID: "card-0000:d8")))
      .allocation
    let record = try await engine.drain(.card("card-0000:d8"), releaseUnattached: true, meta: .init())
    #expect(record.impacts.map(\.allocationID) == [held.id])
    #expect(record.impacts.map(\.outcome) == ["lost"])
    #expect(try await engine.snapshot().allocations.isEmpty)
    let elsewhere = try await engine.allocate(AllocateRequest(owner: "o"))
    #expect(elsewhere.allocation.cardID == "card-0000:3b")
  }
}
