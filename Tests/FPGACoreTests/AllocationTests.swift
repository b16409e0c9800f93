import FPGACore
import FPGASimulator
import Testing

@Suite struct AllocationTests {
  @Test func allocatesTheFirstFreeVFAndBumpsTheRevision() async throws {
    let (engine, _) = try await makeEngine()
    let before = await engine.revision
    let result = try await engine.allocate(AllocateRequest(owner: "tenant-a"))
    #expect(result.allocation.vf == address("0000:3b:00.4"))
    #expect(result.allocation.pf == address("0000:3b:00.0"))
    #expect(result.vf.state == .allocated)
    #expect(result.revision == before + 1)
    let second = try await engine.allocate(AllocateRequest(owner: "tenant-a"))
    #expect(second.allocation.vf == address("0000:3b:00.5"))
    #expect(second.revision == before + 2)
  }

  @Test func honoursCardPFAndNUMAConstraints() async throws {
    let (engine, _) = try await makeEngine()
    let numa = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(numaNode: 1)))
    #expect(numa.allocation.pf.bus == 0xd8)
    let pf = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: address("0000:3b:00.1"))))
    #expect(pf.allocation.pf == address("0000:3b:00.1"))
    let card = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(cardID: "card-0000:d8")))
    #expect(card.allocation.cardID == "card-0000:d8")
  }

  @Test func prefersVFsAlreadyBoundToVFIO() async throws {
    var config = SimulatorConfig.default
    config.cards = [SimulatorConfig.Card(bus: 0x3b, numaNode: 0, enabledVFs: [4, 0, 0, 0], bindToVFIO: false)]
    let (engine, node) = try await makeEngine(config)
    let third = address("0000:3b:00.6")
    try node.unbind(vf: third)
    try node.writeDriverOverride(vf: third, "vfio-pci")
    try node.probe(vf: third)
    try await engine.rescan()
    let result = try await engine.allocate(AllocateRequest(owner: "o"))
    #expect(result.allocation.vf == third)
  }

  @Test func exhaustionIsResourceExhaustedWithAHint() async throws {
    let (engine, _) = try await makeEngine()
    for _ in 0..<4 {
      _ = try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: address("0000:3b:00.3"))))
    }
    await #expect(
      throws: AgentError(
        .resourceExhausted,
        "all 4 enabled VFs matching PF 0000:3b:00.3 are allocated or unhealthy: release one, enable more VFs with `fpgactl reconfigure PF N`, or relax the constraints"
      )
    ) {
      try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: address("0000:3b:00.3"))))
    }
    await #expect(throws: AgentError.self) {
      try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(numaNode: 7)))
    }
  }

  @Test func unknownAndContradictoryConstraints() async throws {
    let (engine, _) = try await makeEngine()
    let revision = await engine.revision
    await #expect(
      throws: AgentError(.notFound, "PF 0000:99:00.0 is not managed by this node; `fpgactl inventory` lists the PFs")
    ) {
      try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(pf: address("0000:99:00.0"))))
    }
    await #expect(
      throws: AgentError(.notFound, "card \"card-0000:99\" is not on this node; `fpgactl inventory` lists the cards")
    ) {
      try await engine.allocate(AllocateRequest(owner: "o", constraints: .init(cardID: "card-0000:99")))
    }
    do {
      _ = try await engine.allocate(
        AllocateRequest(owner: "o", constraints: .init(cardID: "card-0000:d8", pf: address("0000:3b:00.0"))))
      Issue.record("expected an error")
    } catch { #expect(error.code == .invalidArgument) }
    #expect(await engine.revision == revision, "a refused request changes nothing")
  }

  @Test func releaseFreesTheVFAndUnknownIDsAreNotFound() async throws {
    let (engine, _) = try await makeEngine()
    let allocation = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    let released = try await engine.release(ReleaseRequest(allocationID: allocation.id))
    #expect(released.allocation == allocation)
    #expect(try await engine.snapshot().allocations.isEmpty)
    await #expect(throws: AgentError.self) { try await engine.release(ReleaseRequest(allocationID: allocation.id)) }
    let again = try await engine.allocate(AllocateRequest(owner: "o"))
    #expect(again.allocation.vf == allocation.vf, "the released VF is free again")
  }

  @Test func noVFIsEverAllocatedTwice() async throws {
    let (engine, _) = try await makeEngine()
    var seen = Set<PCIAddress>()
    while let result = try? await engine.allocate(AllocateRequest(owner: "o")) {
      #expect(seen.insert(result.allocation.vf).inserted)
    }
    #expect(seen.count == 52)
    #expect(await engine.status().counts.vfsFree == 0)
  }
}

@Suite struct IdempotencyAndFencingTests {
  @Test func aRetryWithTheSameKeyReturnsTheSameAllocation() async throws {
    let (engine, _) = try await makeEngine()
    let request = AllocateRequest(meta: RequestMeta(idempotencyKey: "k-1"), owner: "o")
    let first = try await engine.allocate(request)
    let retry = try await engine.allocate(request)
    #expect(!first.replayed && retry.replayed)
    #expect(retry.allocation == first.allocation)
    #expect(try await engine.snapshot().allocations.count == 1)
  }

  @Test func theSameKeyForADifferentRequestIsRefused() async throws {
    let (engine, _) = try await makeEngine()
    _ = try await engine.allocate(AllocateRequest(meta: RequestMeta(idempotencyKey: "k-1"), owner: "o"))
    await #expect(
      throws: AgentError(
        .invalidArgument,
        "idempotency key \"k-1\" was already used for a different AllocateVF request: use a new key for a new request")
    ) {
      try await engine.allocate(AllocateRequest(meta: RequestMeta(idempotencyKey: "k-1"), owner: "other"))
    }
  }

  @Test func releaseReplaysToo() async throws {
    let (engine, _) = try await makeEngine()
    let allocation = try await engine.allocate(AllocateRequest(owner: "o")).allocation
    let request = ReleaseRequest(meta: RequestMeta(idempotencyKey: "r-1"), allocationID: allocation.id)
    let first = try await engine.release(request)
    let retry = try await engine.release(request)
    #expect(retry.replayed && retry.allocation == first.allocation && retry.revision == first.revision)
  }

  @Test func staleEpochsAreRefused() async throws {
    let (engine, _) = try await makeEngine()
    _ = try await engine.allocate(AllocateRequest(meta: RequestMeta(orchestratorEpoch: 5), owner: "o"))
    await #expect(throws: AgentError.self) {
      try await engine.allocate(AllocateRequest(meta: RequestMeta(orchestratorEpoch: 4), owner: "o"))
    }
    _ = try await engine.allocate(AllocateRequest(meta: RequestMeta(orchestratorEpoch: 5), owner: "o"))
    _ = try await engine.allocate(AllocateRequest(owner: "local"))  // epoch 0: local, not fenced
    #expect(await engine.highestEpoch == 5)
  }

  @Test func theLedgerForgetsTheOldestKeysFirst() throws {
    var ledger = IdempotencyLedger<Int>(capacity: 2)
    ledger.record(scope: "s", key: "a", fingerprint: "f", result: 1)
    ledger.record(scope: "s", key: "b", fingerprint: "f", result: 2)
    ledger.record(scope: "s", key: "c", fingerprint: "f", result: 3)
    #expect(try ledger.lookup(scope: "s", key: "a", fingerprint: "f") == nil)
    #expect(try ledger.lookup(scope: "s", key: "c", fingerprint: "f") == 3)
    #expect(ledger.count == 2)
  }
}

@Suite struct NodeStatusTests {
  @Test func aPFWithoutADriverIsAProblemAndTheNodeDegraded() async throws {
    let (engine, node) = try await makeEngine()
    #expect(await engine.status().health == .serving)
    node.setPFDriver(address("0000:3b:00.2"), nil)
    try await engine.rescan()
    let status = await engine.status()
    // The Linux platform's health reading (over the simulated kernel) sees the driver go too.
    #expect(
      status.capabilities.problems == [
        "PF 0000:3b:00.2 is degraded since 2027-01-15T08:00:00Z: driver: bound to no driver, was qdma-pf when the agent found it",
        "PF 0000:3b:00.2 has no driver bound: its VF count cannot change (bind its PF driver, qdma-pf on QDMA cards)",
      ])
    #expect(status.health == .degraded)
  }
}
