/// Accelerator contexts and time sharing: guests register contexts on accelerators, the runners
/// share each accelerator among its guests, and the figures reach the inventory.
extension NodeEngine {
  public struct RegisterContextRequest: Hashable, Sendable {
    public var meta: RequestMeta
    public var acceleratorID: String
    public var guest: String
    public var function: String
    public var parameters: [String: String]
    public var savedStateBytes: UInt64
    public var weight: UInt32

    public init(
      meta: RequestMeta = .init(), acceleratorID: String, guest: String, function: String,
      parameters: [String: String] = [:], savedStateBytes: UInt64 = 0, weight: UInt32 = 0
    ) {
      self.meta = meta
      self.acceleratorID = acceleratorID
      self.guest = guest
      self.function = function
      self.parameters = parameters
      self.savedStateBytes = savedStateBytes
      self.weight = weight
    }

    var fingerprint: String {
      ([acceleratorID, guest, function, String(savedStateBytes), String(weight)]
        + parameters.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }).joined(separator: "\u{0}")
    }
  }

  /// Registers a guest's context on an accelerator, binding the guest to it. One context per
  /// guest and accelerator: registering the same again returns it; a different one is refused;
  /// while another registration for the guest there is under way, ABORTED.
  public func registerContext(_ request: RegisterContextRequest) async throws(AgentError) -> (
    ContextRecord, replayed: Bool
  ) {
    try await mutate(
      "RegisterContext", request.meta, fingerprint: request.fingerprint,
      replay: { outcome in
        guard case .context(let record) = outcome else { return nil }
        return (record, true)
      },
      plan: { () throws(AgentError) -> Plan<(AcceleratorRunner, ContextRecord), (ContextRecord, replayed: Bool)> in
        let runner = try accelerator(request.acceleratorID)
        guard let guest = try Validate.vmName(request.guest, field: "guest") else {
          throw AgentError(.invalidArgument, "guest is required: the VM name or allocation id the context belongs to")
        }
        try Validate.functionName(request.function)
        try Validate.parameters(request.parameters)
        guard request.weight <= 1000 else {
          throw AgentError(.invalidArgument, "weight \(request.weight) is out of range: 1-1000 (0 means 1)")
        }
        guard request.savedStateBytes <= ContextLimits.savedStateBytes else {
          throw AgentError(
            .invalidArgument,
            "saved_state_bytes \(request.savedStateBytes) is beyond the limit of \(ContextLimits.savedStateBytes) bytes (\(ContextLimits.savedStateBytes >> 20) MiB) a context switch may move"
          )
        }
        if let existing = contexts.values.first(where: {
          $0.acceleratorID == request.acceleratorID && $0.guest == guest
        }),
          !gate.reservations.isHeld(.guestSlot(accelerator: request.acceleratorID, guest: guest))
        {
          let same =
            existing.function == request.function && existing.parameters == request.parameters
            && existing.savedStateBytes == request.savedStateBytes && existing.weight == max(1, request.weight)
          guard same else {
            throw AgentError(
              .failedPrecondition,
              "guest \(guest) already has context \(existing.id) on \(request.acceleratorID); delete it first (`fpgactl context delete \(existing.id)`)"
            )
          }
          return .answer((existing, true))
        }
        let record = ContextRecord(
          id: Self.makeID(prefix: "ctx-"), acceleratorID: request.acceleratorID, guest: guest,
          function: request.function, parameters: request.parameters, savedStateBytes: request.savedStateBytes,
          weight: max(1, request.weight))
        return .proceed(
          (runner, record),
          reserving: [.guestSlot(accelerator: record.acceleratorID, guest: guest), .context(record.id)],
          as: "registration of \(guest)'s context")
      },
      effects: { planned, _ throws(AgentError) in
        let (runner, record) = planned
        try await runner.bind(
          guest: record.guest, context: record.id, stateBytes: record.savedStateBytes, weight: record.weight)
        return Effects(
          writes: [.putContext(record)], outcome: .context(record),
          undo: { await runner.unbind(guest: record.guest) },
          apply: {
            self.contexts[record.id] = record
            await self.refreshAccelerators(only: record.acceleratorID)
            return ((record, false), nil)
          })
      })
  }

  /// Contexts, ordered by id; `active` when loaded on its accelerator now.
  public func listContexts(acceleratorID: String? = nil, guest: String? = nil) -> [(ContextRecord, active: Bool)] {
    contexts.values
      .filter { (acceleratorID == nil || $0.acceleratorID == acceleratorID) && (guest == nil || $0.guest == guest) }
      .sorted { $0.id < $1.id }
      .map { ($0, state.accelerators[$0.acceleratorID]?.loadedGuest == $0.guest) }
  }

  /// Deletes a context; its guest leaves the accelerator (its pending work is dropped).
  public func deleteContext(_ id: String, meta: RequestMeta) async throws(AgentError) {
    try await mutate(
      "DeleteContext", meta, fingerprint: id,
      replay: { outcome in outcome == .deleted ? () : nil },
      plan: { () throws(AgentError) -> Plan<ContextRecord, Void> in
        let record = try existingContext(id)
        return .proceed(
          record, reserving: [.context(id), .guestSlot(accelerator: record.acceleratorID, guest: record.guest)],
          as: "deletion of \(id)")
      },
      effects: { record, _ in
        Effects(
          writes: [.deleteContext(id)], outcome: .deleted,
          apply: {
            self.contexts[id] = nil
            await self.runners[record.acceleratorID]?.unbind(guest: record.guest)
            await self.refreshAccelerators(only: record.acceleratorID)
            return ((), nil)
          })
      })
  }

  /// Loads a context now (preempting) or at the next slice boundary. Returns the switch time
  /// when it happened now (zero when the context was loaded already).
  public func switchContext(_ id: String, now: Bool, meta: RequestMeta) async throws(AgentError) -> Duration? {
    try await mutate(
      "SwitchContext", meta, fingerprint: "\(id)\u{0}\(now)",
      replay: { outcome in
        guard case .switched(let nanoseconds) = outcome else { return nil }
        return .some(nanoseconds.map { .nanoseconds($0) })
      },
      plan: { () throws(AgentError) -> Plan<(ContextRecord, AcceleratorRunner), Duration?> in
        let record = try existingContext(id)
        let runner = try accelerator(record.acceleratorID)
        // The context itself is not reserved: a switch may wait a while, and a deletion
        // meanwhile ends the wait (the runner resumes it with zero).
        return .proceed((record, runner), reserving: [], as: "switch to \(id)")
      },
      effects: { planned, _ throws(AgentError) in
        let (record, runner) = planned
        let time = try await runner.switchTo(guest: record.guest, now: now)
        // The epoch (when raised) and the key are recorded once the switch was made.
        return Effects(
          writes: [], outcome: .switched(time.map(Self.nanoseconds)),
          apply: {
            await self.refreshAccelerators(only: record.acceleratorID)
            return (time, nil)
          })
      })
  }

  /// Replaces an accelerator's time slice, weights and overcommit limit.
  public func setSharingPolicy(
    acceleratorID: String, policy: TimeSharingScheduler.Policy, meta: RequestMeta
  ) async throws(AgentError) -> TimeSharingScheduler.Policy {
    try await mutate(
      "SetSharingPolicy", meta, fingerprint: Self.fingerprint(acceleratorID, policy),
      replay: { outcome in
        guard case .policy(let applied) = outcome else { return nil }
        return applied
      },
      plan: { () throws(AgentError) -> Plan<AcceleratorRunner, TimeSharingScheduler.Policy> in
        let runner = try accelerator(acceleratorID)
        guard policy.slice >= .microseconds(100), policy.slice <= .seconds(10) else {
          throw AgentError(.invalidArgument, "time_slice must be between 100 µs and 10 s")
        }
        guard (1...64).contains(policy.overcommitLimit) else {
          throw AgentError(.invalidArgument, "overcommit_limit must be 1-64 guests")
        }
        for (guest, weight) in policy.weights {
          _ = try Validate.vmName(guest, field: "weights key")
          guard (1...1000).contains(weight) else {
            throw AgentError(.invalidArgument, "weight of \(guest) must be 1-1000")
          }
        }
        return .proceed(runner, reserving: [.policy(acceleratorID)], as: "policy change of \(acceleratorID)")
      },
      effects: { runner, _ throws(AgentError) in
        let previous = await runner.policy
        try await runner.setPolicy(policy)
        let applied = await runner.policy
        return Effects(
          writes: [.putPolicy(acceleratorID, applied)], outcome: .policy(applied),
          undo: { try? await runner.restorePolicy(previous) },
          apply: {
            await self.refreshAccelerators(only: acceleratorID)
            return (applied, nil)
          })
      })
  }

  /// Moves a context to another accelerator at run time; the guest's pending work goes along.
  /// Refused (nothing moved) when the target is at its overcommit limit or the guest already
  /// has a context there.
  public func moveContext(_ id: String, to acceleratorID: String, meta: RequestMeta) async throws(AgentError)
    -> (ContextRecord, carried: Duration)
  {
    try await mutate(
      "MoveContext", meta, fingerprint: "\(id)\u{0}\(acceleratorID)",
      replay: { outcome in
        guard case .moved(let record, let carried) = outcome else { return nil }
        return (record, .nanoseconds(carried))
      },
      plan: { () throws(AgentError) -> Plan<(ContextRecord, AcceleratorRunner), (ContextRecord, carried: Duration)> in
        let record = try existingContext(id)
        let target = try accelerator(acceleratorID)
        guard record.acceleratorID != acceleratorID else { return .answer((record, .zero)) }
        if contexts.values.contains(where: { $0.acceleratorID == acceleratorID && $0.guest == record.guest }) {
          throw AgentError(
            .failedPrecondition,
            "guest \(record.guest) already has a context on \(acceleratorID); delete one of the two first")
        }
        return .proceed(
          (record, target),
          reserving: [
            .context(id), .guestSlot(accelerator: record.acceleratorID, guest: record.guest),
            .guestSlot(accelerator: acceleratorID, guest: record.guest),
          ], as: "move of \(id)")
      },
      effects: { planned, _ throws(AgentError) in
        let (before, target) = planned
        let from = before.acceleratorID
        try await target.bind(
          guest: before.guest, context: before.id, stateBytes: before.savedStateBytes, weight: before.weight)
        var record = before
        record.acceleratorID = acceleratorID
        let moved = record
        // The work carried along is known once the source lets the guest go, after the write:
        // the key is recorded then (a retry with it finds the context on its target).
        return Effects(
          writes: [.putContext(moved)], outcome: nil,
          undo: { await target.unbind(guest: moved.guest) },
          apply: {
            let carried = await self.runners[from]?.unbind(guest: moved.guest) ?? .zero
            if carried > .zero { await target.submit(guest: moved.guest, work: carried) }
            self.contexts[id] = moved
            await self.refreshAccelerators(only: from)
            await self.refreshAccelerators(only: acceleratorID)
            return ((moved, carried), .moved(moved, carriedNanoseconds: Self.nanoseconds(carried)))
          })
      })
  }

  private func existingContext(_ id: String) throws(AgentError) -> ContextRecord {
    guard let record = contexts[id] else {
      throw AgentError(.notFound, "context \(id) does not exist; `fpgactl contexts` lists them")
    }
    return record
  }

  /// Saturating: a fingerprint or a record never traps, whatever duration it is given.
  static func nanoseconds(_ duration: Duration) -> Int64 { duration.saturatingNanoseconds }

  static func fingerprint(_ acceleratorID: String, _ policy: TimeSharingScheduler.Policy) -> String {
    ([acceleratorID, String(nanoseconds(policy.slice)), String(policy.overcommitLimit)]
      + policy.weights.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }).joined(separator: "\u{0}")
  }

  /// Work for a guest on an accelerator (the workload generator; a VF driver's doorbell on
  /// real hardware).
  public func submitWork(guest: String, acceleratorID: String, work: Duration) async {
    await runners[acceleratorID]?.submit(guest: guest, work: work)
  }

  /// Publishes each accelerator's figures (those that changed) and starts a new window.
  public func refreshAccelerators(only: String? = nil) async {
    var views: [AcceleratorView] = []
    for id in runners.keys.sorted() {
      guard let runner = runners[id] else { continue }
      if let only, id != only, let kept = state.accelerators[id] {
        views.append(kept)
      } else {
        var view = await runner.view(rollWindow: only == nil)
        // The window alone moving is no change: an idle accelerator publishes nothing.
        if let kept = state.accelerators[id] {
          var same = view
          same.metrics.window = kept.metrics.window
          if same == kept { view = kept }
        }
        views.append(view)
      }
    }
    publish(state.apply(accelerators: views))
  }

  /// Runs every accelerator's scheduling loop until the calling task is cancelled or the
  /// engine closes: the agent's accelerator service calls it, so the loops are owned by the
  /// service group (a test runs it in a task of its own).
  public func runAccelerators() async {
    let runners = Array(self.runners.values)
    await withDiscardingTaskGroup { group in
      for runner in runners { group.addTask { await runner.run() } }
    }
  }

  /// At start: contexts and policies from the store, guests bound again (their loops run in
  /// `runAccelerators`).
  func restoreAccelerators(_ persisted: PersistedState) async {
    for (id, policy) in persisted.policies {
      if let runner = runners[id] { try? await runner.setPolicy(policy) }
    }
    for record in persisted.contexts.sorted(by: { $0.id < $1.id }) {
      guard let runner = runners[record.acceleratorID] else {
        noteDiscrepancy(
          "context \(record.id) of \(record.guest) is on accelerator \(record.acceleratorID), which this node no longer has: kept, inactive"
        )
        contexts[record.id] = record
        continue
      }
      do {
        try await runner.bind(
          guest: record.guest, context: record.id, stateBytes: record.savedStateBytes, weight: record.weight)
      } catch {
        noteDiscrepancy("context \(record.id) could not be bound again: \(error.message)")
      }
      contexts[record.id] = record
    }
    await refreshAccelerators()
  }

  /// NOT_FOUND (with the node's accelerators) unless `id` names one of this node's.
  public func requireAccelerator(_ id: String) throws(AgentError) {
    _ = try accelerator(id)
  }

  private func accelerator(_ id: String) throws(AgentError) -> AcceleratorRunner {
    guard let runner = runners[id] else {
      let known = runners.keys.sorted().joined(separator: ", ")
      throw AgentError(
        .notFound, "accelerator \(quoted(id)) is not on this node; it has: \(known.isEmpty ? "none" : known)")
    }
    return runner
  }
}

extension Validate {
  /// A function name: 1-64 of `[A-Za-z0-9._-]`.
  static func functionName(_ text: String) throws(AgentError) {
    guard (try? vmName(text, field: "function")) != nil, !text.isEmpty else {
      throw AgentError(.invalidArgument, "function \(quoted(text)) must be 1-64 of A-Z a-z 0-9 . _ -")
    }
  }

  /// Context parameters: at most 64, keys like function names, values ≤ 1,024 printable ASCII.
  static func parameters(_ parameters: [String: String]) throws(AgentError) {
    guard parameters.count <= 64 else { throw AgentError(.invalidArgument, "at most 64 parameters") }
    for (key, value) in parameters {
      guard (try? vmName(key, field: "parameter")) != nil, !key.isEmpty else {
        throw AgentError(.invalidArgument, "parameter name \(quoted(key)) must be 1-64 of A-Z a-z 0-9 . _ -")
      }
      guard value.utf8.count <= 1024, value.utf8.allSatisfy({ $0 >= 0x20 && $0 < 0x7f }) else {
        throw AgentError(
          .invalidArgument, "parameter \(key): the value must be at most 1,024 printable ASCII characters")
      }
    }
  }
}
