/// Draining: a PF or card stops taking allocations; optionally its unattached allocations end.
extension NodeEngine {
  /// What a drain acts on.
  public enum DrainTarget: Hashable, Sendable {
    case pf(PCIAddress)
    case card(String)

    /// Parses a PF's BDF or a card id.
    public static func parse(_ text: String, field: String) throws(AgentError) -> DrainTarget {
      if text.hasPrefix("card-"), let id = try Validate.cardID(text, field: field) { return .card(id) }
      if let address = PCIAddress(text) { return .pf(address) }
      throw AgentError(
        .invalidArgument,
        "\(field) \(quoted(text)) is neither a PF address (DDDD:BB:DD.F) nor a card id (card-DDDD:BB)")
    }

    var name: String {
      switch self {
      case .pf(let address): "PF \(address)"
      case .card(let id): "card \(id)"
      }
    }

    public var text: String {
      switch self {
      case .pf(let address): address.description
      case .card(let id): id
      }
    }
  }

  public func drain(_ target: DrainTarget, releaseUnattached: Bool, meta: RequestMeta) async throws(AgentError)
    -> OperationRecord
  {
    try await fence(meta)
    let fingerprint = "\(target.text)\u{0}\(releaseUnattached)"
    if let key = meta.idempotencyKey,
      case .operation(let id)? = try ledger.lookup(scope: "DrainDevice", key: key, fingerprint: fingerprint),
      let record = operations[id]
    {
      return record
    }
    let pfs = try pfs(of: target)
    let now = clock.now()
    var steps: [OperationRecord.Step] = []
    var writes: [StoreChange] = [.setDrain(target.text, true)]
    steps.append(.init(description: "stop new allocations on \(target.name)", state: .succeeded, startedAt: now, finishedAt: now))
    var impacts: [OperationRecord.Impact] = []
    var released: [String] = []
    let held = state.allocations.values.filter { pfs.contains($0.pf) }.sorted { $0.id < $1.id }
    for allocation in held {
      if releaseUnattached && !allocation.attached && !inFlight.contains(allocation.id) {
        released.append(allocation.id)
        writes.append(.deleteAllocation(allocation.id))
        steps.append(.init(description: "release unattached allocation \(allocation.id) (VF \(allocation.vf))", state: .succeeded, startedAt: now, finishedAt: now))
        impacts.append(.init(allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "lost", guestSees: "nothing"))
      } else {
        impacts.append(.init(allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "kept", guestSees: "nothing"))
      }
    }
    let record = OperationRecord(
      id: Self.makeID(prefix: "op-"), kind: "drain", target: target.text, state: .succeeded,
      steps: steps, impacts: impacts, createdAt: now, finishedAt: clock.now())
    writes.append(.putOperation(StoredOperation(record: record, journal: nil)))
    let idempotency = meta.idempotencyKey.map {
      IdempotencyRecord(scope: "DrainDevice", key: $0, fingerprint: fingerprint, outcome: .operation(record.id))
    }
    if let idempotency { writes.append(.putIdempotency(idempotency)) }
    let claimed = try claim(idempotency)
    for id in released { inFlight.insert(id) }
    defer {
      for id in released { inFlight.remove(id) }
      releaseKey(claimed)
    }
    try await store.commit(writes)
    var changes: [InventoryChange] = []
    switch target {
    case .pf(let address): changes += state.setDraining(pf: address, true)
    case .card(let id): changes += state.setDraining(card: id, true)
    }
    for id in released {
      if let (_, removed) = state.remove(allocation: id) { changes += removed }
    }
    publish(changes)
    remember(record)
    if let idempotency { ledger.record(idempotency) }
    return record
  }

  /// Accepts allocations again; returns the revision.
  public func undrain(_ target: DrainTarget, meta: RequestMeta) async throws(AgentError) -> UInt64 {
    try await fence(meta)
    _ = try pfs(of: target)
    try await store.commit([.setDrain(target.text, false)])
    pendingDrains.remove(target.text)
    switch target {
    case .pf(let address): return publish(state.setDraining(pf: address, false))
    case .card(let id): return publish(state.setDraining(card: id, false))
    }
  }

  private func pfs(of target: DrainTarget) throws(AgentError) -> Set<PCIAddress> {
    switch target {
    case .pf(let address):
      guard state.pf(address) != nil else {
        throw AgentError(.notFound, "PF \(address) is not managed by this node; `fpgactl inventory` lists the PFs")
      }
      return [address]
    case .card(let id):
      guard state.card(id) != nil else {
        throw AgentError(.notFound, "card \(quoted(id)) is not on this node; `fpgactl inventory` lists the cards")
      }
      return Set(state.pfAddresses.filter { Card.id(for: $0) == id })
    }
  }
}
