import FPGACore
import FPGASimulator
import FPGAStore
import Foundation
import GRDB
import Synchronization
import Testing

final class StillClock: WallClock {
  func now() -> WallTime { WallTime(seconds: 1_800_000_000) }
}

func temporaryDirectory() throws -> String {
  let path = NSTemporaryDirectory() + "fpga-store-\(UUID().uuidString)"
  try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
  return path
}

func allocation(_ id: String, vf: String, attached: Bool = false) -> Allocation {
  Allocation(
    id: id, vf: PCIAddress(vf)!, pf: PCIAddress("0000:3b:00.0")!, owner: "team-a", vm: attached ? "vm-1" : nil,
    idempotencyKey: nil, createdAt: WallTime(seconds: 1_800_000_000, nanoseconds: 5), numaNode: 0, iommuGroup: 7,
    attached: attached, deviceID: attached ? id : nil, rootPort: attached ? "rp1" : nil,
    lastRelayout: attached
      ? Relayout(
        how: .replugFallback, operationID: "op-9", at: WallTime(seconds: 1_800_000_100, nanoseconds: 7),
        detail: "resume refused") : nil)
}

@Suite struct StoreTests {
  @Test func everythingCommittedIsThereAfterReopening() async throws {
    let directory = try temporaryDirectory()
    let path = directory + "/state.sqlite"
    let record = OperationRecord(
      id: "op-1", kind: "reconfigure", target: "0000:3b:00.0", state: .running,
      steps: [.init(description: "plan", state: .succeeded)], createdAt: WallTime(seconds: 1))
    let journal = ReconfigureJournal(
      pf: PCIAddress("0000:3b:00.0")!, from: 4, to: 2, strategy: .detachReattach,
      actions: [.init(kind: .plan), .init(kind: .writeZero)])
    do {
      let store = try SQLiteStateStore(path: path)
      try await store.commit([
        .putAllocation(allocation("alloc-1", vf: "0000:3b:00.4")),
        .putAllocation(allocation("alloc-2", vf: "0000:3b:00.5", attached: true)),
        .setEpoch(7), .setDrain("card-0000:d8", true),
        .putOperation(StoredOperation(record: record, journal: journal)),
      ])
      try await store.commit([.deleteAllocation("alloc-1"), .setEpoch(3), .setDrain("0000:3b:00.1", true)])
      try await store.commit([.putRecord("dra-claim", "uid-1", "{\"a\":1}"), .putRecord("dra-claim", "uid-2", "{}")])
      try await store.commit([.deleteRecord("dra-claim", "uid-2"), .putRecord("dra-tombstone", "uid-2", "1")])
    }
    let reopened = try SQLiteStateStore(path: path)
    let state = try reopened.load()
    #expect(state.allocations == [allocation("alloc-2", vf: "0000:3b:00.5", attached: true)])
    #expect(state.epoch == 7)  // the epoch only rises
    #expect(state.drains == ["card-0000:d8", "0000:3b:00.1"])
    #expect(state.operations == [StoredOperation(record: record, journal: journal)])
    #expect(state.records == ["dra-claim": ["uid-1": "{\"a\":1}"], "dra-tombstone": ["uid-2": "1"]])
    #expect(try reopened.appliedMigrations() == ["v1", "v2", "v3", "v4", "v5", "v6"])
  }

  @Test func aStoreOfTheFirstSchemaIsMigratedWithItsRecords() async throws {
    let directory = try temporaryDirectory()
    let path = directory + "/state.sqlite"
    let kept = allocation("alloc-old", vf: "0000:3b:00.4")
    do {
      let queue = try DatabaseQueue(path: path)
      try SQLiteStateStore.migrator(upTo: "v1").migrate(queue)
      let outcome = String(decoding: try JSONEncoder().encode(IdempotentOutcome.operation("op-9")), as: UTF8.self)
      try await queue.write { db in
        try db.execute(
          sql: """
            INSERT INTO allocations (id, vf, pf, owner, vm, idempotency_key, created_s, created_ns, numa_node, iommu_group,
              attached, device_id, root_port, detaching) VALUES (?, ?, ?, ?, NULL, NULL, ?, ?, ?, ?, 0, NULL, NULL, 0)
            """,
          arguments: [
            kept.id, kept.vf.description, kept.pf.description, kept.owner, kept.createdAt.seconds,
            kept.createdAt.nanoseconds, kept.numaNode, kept.iommuGroup,
          ])
        try db.execute(
          sql: "INSERT INTO idempotency (scope, key, fingerprint, outcome) VALUES ('DrainDevice', 'k1', '\"f\"', ?)",
          arguments: [outcome])
        try db.execute(sql: "INSERT INTO settings (name, value) VALUES ('epoch', '12')")
      }
      #expect(try await queue.read { db in try db.tableExists("operations") } == false)
    }
    let store = try SQLiteStateStore(path: path)
    #expect(try store.appliedMigrations() == ["v1", "v2", "v3", "v4", "v5", "v6"])
    let state = try store.load()
    #expect(state.allocations == [kept])
    #expect(
      state.idempotency == [
        IdempotencyRecord(scope: "DrainDevice", key: "k1", fingerprint: "f", outcome: .operation("op-9"))
      ])
    #expect(state.epoch == 12)
    try await store.commit([.setDrain("0000:3b:00.0", true)])  // the new tables work
    #expect(try store.load().drains == ["0000:3b:00.0"])
  }

  @Test func aCorruptFileStopsTheAgentAndIsLeftAlone() throws {
    let directory = try temporaryDirectory()
    let path = directory + "/state.sqlite"
    let garbage = Data(repeating: 0x5a, count: 8192)
    try garbage.write(to: URL(fileURLWithPath: path))
    #expect {
      _ = try SQLiteStateStore(path: path)
    } throws: { error in
      let error = error as! AgentError
      return error.code == .internal && error.message.contains("is corrupt or not an SQLite database")
        && error.message.contains("Move it aside")
    }
    #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == garbage)
  }

  @Test func aStoreFromANewerAgentIsRefused() throws {
    let directory = try temporaryDirectory()
    let path = directory + "/state.sqlite"
    _ = try SQLiteStateStore(path: path)
    let queue = try DatabaseQueue(path: path)
    try queue.write { db in try db.execute(sql: "INSERT INTO grdb_migrations (identifier) VALUES ('v9')") }
    #expect {
      _ = try SQLiteStateStore(path: path)
    } throws: { error in
      (error as! AgentError).message.contains("written by a newer fpga-agent")
    }
  }

  @Test func anUnwritableDirectoryIsNamed() throws {
    #expect {
      _ = try SQLiteStateStore(path: "/proc/fpga-agent-no-such-dir/state.sqlite")
    } throws: { error in
      (error as! AgentError).message.contains("cannot be opened for writing")
    }
  }

  /// A store capped at a few pages meets SQLITE_FULL like a full disk: the failed transaction
  /// leaves nothing behind, and the engine changes nothing either.
  @Test func aFullDiskFailsTheWholeTransactionAndTheRequest() async throws {
    let directory = try temporaryDirectory()
    let path = directory + "/state.sqlite"
    let store = try SQLiteStateStore(path: path, maxPageCount: 40)
    let padding = String(repeating: "x", count: 3000)
    var committed = 0
    var failure: AgentError?
    for index in 0..<200 {
      var record = allocation("alloc-\(index)", vf: "0000:3b:\(String(format: "%02x", index % 32)).\(index / 32)")
      record.owner = padding
      do {
        try await store.commit([.putAllocation(record), .setDrain("d\(index)", true)])
        committed += 1
      } catch {
        failure = error
        break
      }
    }
    #expect(failure?.code == .resourceExhausted)
    #expect(failure?.message.contains("disk (or the store) is full: nothing changed") == true)
    let state = try store.load()
    #expect(state.allocations.count == committed)
    #expect(state.drains.count == committed)  // the failed transaction's other write is gone too

    let node = SimulatedNode()
    let engine = NodeEngine(nodeID: "n", platform: SimulatedPlatform(node: node), clock: StillClock(), store: store)
    _ = try await engine.restore()
    try await engine.rescan()
    let before = try await engine.snapshot()
    await #expect(throws: AgentError.self) {
      _ = try await engine.allocate(AllocateRequest(owner: padding))
    }
    // The VF was taken in memory and given back (two revisions); what is held is unchanged.
    let after = try await engine.snapshot()
    #expect(after.allocations == before.allocations)
    #expect(after.cards == before.cards)
  }
}

@Suite struct RestartTests {
  @Test func allocationsKeysEpochAndDrainsSurviveARestart() async throws {
    let directory = try temporaryDirectory()
    let path = directory + "/state.sqlite"
    let node = SimulatedNode()
    let first: AllocationResult
    do {
      let engine = NodeEngine(
        nodeID: "n", platform: SimulatedPlatform(node: node), clock: StillClock(),
        store: try SQLiteStateStore(path: path))
      _ = try await engine.restore()
      try await engine.rescan()
      first = try await engine.allocate(
        AllocateRequest(meta: RequestMeta(idempotencyKey: "k-1", orchestratorEpoch: 5), owner: "team-a", vm: "vm-1"))
      let second = try await engine.allocate(AllocateRequest(owner: "team-b"))
      _ = try await engine.release(ReleaseRequest(allocationID: second.allocation.id))
      _ = try await engine.drain(.pf(PCIAddress("0000:d8:00.1")!), releaseUnattached: false, meta: .init())
    }
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: node), clock: StillClock(), store: try SQLiteStateStore(path: path)
    )
    _ = try await engine.restore()
    try await engine.rescan()
    // Revisions of the earlier run are never this run's: resuming from one gets a resync snapshot.
    #expect(await engine.revision > first.revision + 1_000_000)
    let watch = await engine.watch(from: first.revision)
    var iterator = watch.events.makeAsyncIterator()
    if case .snapshot(_, let resync)? = await iterator.next() {
      #expect(resync)
    } else {
      Issue.record("expected a snapshot")
    }
    let snapshot = try await engine.snapshot()
    #expect(snapshot.allocations == [first.allocation])
    let pf = snapshot.cards.flatMap(\.pfs).first { $0.function.address == PCIAddress("0000:d8:00.1")! }
    #expect(pf?.draining == true)
    let replay = try await engine.allocate(
      AllocateRequest(meta: RequestMeta(idempotencyKey: "k-1", orchestratorEpoch: 5), owner: "team-a", vm: "vm-1"))
    #expect(replay.replayed && replay.allocation == first.allocation)
    await #expect {
      _ = try await engine.allocate(AllocateRequest(meta: RequestMeta(orchestratorEpoch: 4), owner: "team-a"))
    } throws: { error in
      (error as! AgentError).code == .failedPrecondition
    }
  }
}

@Suite struct ReconcileTests {
  /// A record the node contradicts (its VF is gone) is ended, in memory and in the store, and
  /// the finding reaches the node's status.
  @Test func aRecordTheNodeContradictsIsFixedAndReported() async throws {
    let store = MemoryStateStore()
    var ghost = allocation("alloc-ghost", vf: "0000:3b:07.7")  // PF 0000:3b:00.0 has 16 VFs: up to 3b:02.3
    ghost.owner = "team-x"
    let kept = allocation("alloc-kept", vf: "0000:3b:00.4")
    try await store.commit([.putAllocation(ghost), .putAllocation(kept)])
    let engine = NodeEngine(
      nodeID: "n", platform: SimulatedPlatform(node: SimulatedNode()), clock: StillClock(), store: store)
    _ = try await engine.restore()
    try await engine.rescan()
    let found = await engine.reconcile()
    #expect(found == ["allocation alloc-ghost (owner team-x) was on VF 0000:3b:07.7, which no longer exists: ended"])
    #expect(await engine.status().findings == found)
    #expect(store.persisted.allocations.map(\.id) == ["alloc-kept"])
    #expect(try await engine.snapshot().allocations.map(\.id) == ["alloc-kept"])
  }

  @Test func theEpochSurvivesAbove2To63AndNeverGoesDown() async throws {
    let path = try temporaryDirectory() + "/state.sqlite"
    do {
      let store = try SQLiteStateStore(path: path)
      try await store.commit([.setEpoch(9)])
      try await store.commit([.setEpoch(UInt64.max)])
      try await store.commit([.setEpoch(1 << 63)])
      try await store.commit([.setEpoch(10)])
    }
    #expect(try SQLiteStateStore(path: path).load().epoch == UInt64.max)
    let other = try temporaryDirectory() + "/state.sqlite"
    do {
      let store = try SQLiteStateStore(path: other)
      try await store.commit([.setEpoch(99)])
      try await store.commit([.setEpoch(100)])
      try await store.commit([.setEpoch(98)])
    }
    #expect(try SQLiteStateStore(path: other).load().epoch == 100)
  }
}
