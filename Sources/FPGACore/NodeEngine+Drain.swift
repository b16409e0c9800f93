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

  /// Stops new allocations on `target` at once (in the request's first turn, so no allocation
  /// can be acknowledged there after the drain is accepted), optionally ends its unattached
  /// allocations. Allocations another request holds right then (being made, attached,
  /// detached or released) are kept and listed as kept.
  public func drain(_ target: DrainTarget, releaseUnattached: Bool, meta: RequestMeta) async throws(AgentError)
    -> OperationRecord
  {
    try await mutate(
      "DrainDevice", meta, fingerprint: "\(target.text)\u{0}\(releaseUnattached)",
      replay: { outcome throws(AgentError) in
        guard case .operation(let id) = outcome else { return nil }
        if let record = operations.log[id] { return record }
        throw AgentError(
          .failedPrecondition,
          "idempotency key \(quoted(meta.idempotencyKey ?? "")) already drained \(target.name) as operation \(id), whose record is no longer kept; it is not run again"
        )
      },
      plan: { () throws(AgentError) -> Plan<(OperationRecord, [Allocation]), OperationRecord> in
        let pfs = try pfs(of: target)
        let now = clock.now()
        var steps: [OperationRecord.Step] = [
          .init(
            description: "stop new allocations on \(target.name)", state: .succeeded, startedAt: now, finishedAt: now)
        ]
        var impacts: [OperationRecord.Impact] = []
        var released: [Allocation] = []
        for allocation in state.allocations.values.filter({ pfs.contains($0.pf) }).sorted(by: { $0.id < $1.id }) {
          if releaseUnattached && !allocation.attached && !gate.reservations.isHeld(.allocation(allocation.id)) {
            released.append(allocation)
            steps.append(
              .init(
                description: "release unattached allocation \(allocation.id) (VF \(allocation.vf))", state: .succeeded,
                startedAt: now, finishedAt: now))
            impacts.append(
              .init(
                allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "lost", guestSees: "nothing"
              ))
          } else {
            impacts.append(
              .init(
                allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "kept", guestSees: "nothing"
              ))
          }
        }
        let record = OperationRecord(
          id: Self.makeID(prefix: "op-"), kind: "drain", target: target.text, state: .succeeded,
          steps: steps, impacts: impacts, createdAt: now, finishedAt: clock.now())
        return .proceed(
          (record, released), reserving: pfs.sorted().map { .drainFlag($0) } + released.map { .allocation($0.id) },
          as: "drain of \(target.name)")
      },
      effects: { planned, _ in
        let (record, released) = planned
        // The flag is up in memory in the turn the drain is accepted (no allocation chooses
        // these PFs from here), but published only once durable; a failed write takes it down
        // unseen.
        let wasDraining = isDraining(target)
        let raised = setDraining(target, true)
        return Effects(
          writes: [.setDrain(target.text, true)] + released.map { .deleteAllocation($0.id) }
            + [.putOperation(StoredOperation(record: record, journal: nil))],
          outcome: .operation(record.id),
          undo: { if !wasDraining { _ = self.setDraining(target, false) } },
          apply: {
            var changes = raised
            for allocation in released {
              if let (_, removed) = self.state.remove(allocation: allocation.id) { changes += removed }
            }
            self.publish(changes)
            self.remember(record)
            return (record, nil)
          })
      })
  }

  /// Lets allocations onto `target` again.
  public func undrain(_ target: DrainTarget, meta: RequestMeta) async throws(AgentError) -> UInt64 {
    try await mutate(
      "UndrainDevice", meta, fingerprint: target.text,
      replay: { outcome in
        guard case .revision(let revision) = outcome else { return nil }
        return revision
      },
      plan: { () throws(AgentError) -> Plan<Void, UInt64> in
        .proceed((), reserving: try pfs(of: target).sorted().map { .drainFlag($0) }, as: "undrain of \(target.name)")
      },
      effects: { _, _ in
        Effects(
          writes: [.setDrain(target.text, false)], outcome: .revision(state.revision + 1),
          apply: {
            self.pendingDrains.remove(target.text)
            let revision = self.publish(self.setDraining(target, false))
            return (revision, .revision(revision))
          })
      })
  }

  private func isDraining(_ target: DrainTarget) -> Bool {
    switch target {
    case .pf(let address): state.isPFDraining(address)
    case .card(let id): state.card(id)?.draining == true
    }
  }

  private func setDraining(_ target: DrainTarget, _ on: Bool) -> [InventoryChange] {
    switch target {
    case .pf(let address): state.setDraining(pf: address, on)
    case .card(let id): state.setDraining(card: id, on)
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
