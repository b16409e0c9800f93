/// Changing a PF's VF count while VMs hold its VFs: a journaled state machine
/// (`ReconfigureMachine`). Every step is recorded before it runs and after it ends, so a restart
/// rolls an unfinished change back (before any VF count write began) or forward (after), and
/// nothing is lost on the way. The PF and every allocation on it are reserved by the operation
/// from the moment the request is accepted until the operation ends.
extension NodeEngine {
  public func reconfigure(_ request: ReconfigureRequest) async throws(AgentError) -> OperationRecord {
    try await mutate(
      "Reconfigure", request.meta,
      fingerprint: "\(request.pf)\u{0}\(request.count)\u{0}\(request.strategy.rawValue)\u{0}\(request.dryRun)",
      replay: { outcome throws(AgentError) in
        guard case .operation(let id) = outcome else { return nil }
        if let record = operations.log[id] { return record }
        guard request.dryRun else {
          throw AgentError(
            .failedPrecondition,
            "idempotency key \(quoted(request.meta.idempotencyKey ?? "")) already started operation \(id), whose record is no longer kept (the last \(operations.log.history) finished operations are); it is not run again: use a new key for a new reconfiguration"
          )
        }
        // A plan no longer kept is made again: a dry run changes nothing.
        var again = request
        again.meta = RequestMeta(orchestratorEpoch: request.meta.orchestratorEpoch)
        return try await reconfigure(again)
      },
      plan: { () throws(AgentError) -> Plan<(PhysicalFunction, ReconfigurePlanner.Plan, String), OperationRecord> in
        guard let pf = state.pf(request.pf) else {
          throw AgentError(
            .notFound, "PF \(request.pf) is not managed by this node; `fpgactl inventory` lists the PFs")
        }
        if let running = operations.reconfiguring[pf.address] {
          throw AgentError(
            .aborted,
            "PF \(pf.address) is already being reconfigured by \(running); watch it with `fpgactl operation \(running) --watch`"
          )
        }
        if let (vf, id) = gate.allocating.first(where: { state.vf($0.key)?.pfAddress == pf.address }) {
          throw AgentError(
            .aborted, "allocation \(id) of VF \(vf) on PF \(pf.address) is being recorded; retry in a moment")
        }
        guard (0...pf.totalVFs).contains(request.count) else {
          throw AgentError(
            .invalidArgument,
            "vf_count \(request.count) is out of range for PF \(pf.address): it supports 0 to \(pf.totalVFs) VFs")
        }
        guard pf.driver != nil || pf.numVFs == request.count else {
          throw AgentError(
            .failedPrecondition,
            "PF \(pf.address) has no driver bound: its VF count cannot change (bind its PF driver, qdma-pf on QDMA cards)"
          )
        }
        let allocations = state.allocations.values.filter { $0.pf == pf.address }
        let plan = try ReconfigurePlanner(
          pf: pf, vfs: state.vfs(of: pf.address), allocations: allocations, vms: state.vms, count: request.count,
          strategy: request.strategy
        ).plan()
        let id = Self.makeID(prefix: "op-")
        // Reserved in this turn: from here no request can allocate on the PF, attach, detach or
        // release its allocations, or start a second change of it.
        return .proceed(
          (pf, plan, id),
          reserving: request.dryRun ? [] : [.pf(pf.address)] + allocations.map { .allocation($0.id) },
          as: request.dryRun ? "dry run \(id)" : "reconfiguration \(id)")
      },
      effects: { planned, claim in
        let (pf, plan, id) = planned
        if !request.dryRun { operations.reconfiguring[pf.address] = id }
        let record = await plannedRecord(id, of: pf, plan, request)
        guard !request.dryRun else {
          return Effects(
            writes: [], outcome: .operation(id),
            apply: {
              self.remember(record)
              return (record, nil)
            })
        }
        let machine = ReconfigureMachine(
          record: record,
          journal: ReconfigureJournal(
            pf: pf.address, from: pf.numVFs, to: request.count, strategy: request.strategy, actions: plan.actions))
        return Effects(
          writes: [.putOperation(machine.stored)], outcome: .operation(id),
          undo: { self.operations.reconfiguring[pf.address] = nil },
          apply: {
            // The request's reservation becomes the operation's, held until it ends.
            let holder = self.gate.reservations.holder("reconfiguration \(id)")
            self.gate.reservations.transfer(from: claim.holder, to: holder)
            self.begin(machine, holder: holder, faultsApply: true, fence: true)
            return (record, nil)
          })
      })
  }

  /// The operation's record as planned: its steps (the plan step done), what each allocation
  /// goes through, and, on the write of 0, the holders the plan does not release.
  private func plannedRecord(
    _ id: String, of pf: PhysicalFunction, _ plan: ReconfigurePlanner.Plan, _ request: ReconfigureRequest
  ) async -> OperationRecord {
    // VFs held open by something the plan does not release (a VM the agent does not manage, a
    // cold-plugged device): the kernel will block the write of 0 until they let go.
    let released = Set(plan.actions.filter { $0.kind == .pause || $0.kind == .detach }.compactMap(\.vf))
    let blockers =
      request.count == pf.numVFs ? [:] : await platform.vfHolders(pf: pf.address).filter { !released.contains($0.key) }
    var warning = ""
    if !blockers.isEmpty {
      warning =
        "; the kernel will block it until "
        + blockers.sorted { $0.key < $1.key }.map { "VF \($0.key) is released by \($0.value)" }.joined(
          separator: " and ")
        + ", which no allocation of this agent attaches"
    }
    let now = clock.now()
    var record = OperationRecord(
      id: id, kind: "reconfigure", target: pf.address.description,
      state: request.dryRun ? .planned : .running,
      steps: plan.actions.map {
        .init(description: $0.description(pf: pf.address) + ($0.kind == .writeZero ? warning : ""), state: .pending)
      },
      impacts: plan.impacts, createdAt: now)
    record.startedBy = request.startedBy
    record.steps[0].state = .succeeded
    record.steps[0].startedAt = now
    record.steps[0].finishedAt = now
    if request.dryRun {
      for index in record.steps.indices.dropFirst() { record.steps[index].state = .planned }
      record.finishedAt = now
    }
    return record
  }

  /// Runs the operation's steps in a task of its own; `holder` holds the PF and its allocations.
  func begin(_ machine: ReconfigureMachine, holder: Reservations.Holder, faultsApply: Bool, fence: Bool = false) {
    let pf = machine.journal.pf
    operations.reconfiguring[pf] = machine.id
    operations.reconfigurations[machine.id] = RunningReconfiguration(machine: machine, holder: holder)
    remember(machine.record)
    operations.tasks[machine.id] = Task { await self.run(machine.id, faultsApply: faultsApply, fence: fence) }
  }

  /// Waits until operation `id` has ended (tests, shutdown).
  public func waitForOperation(_ id: String) async {
    await operations.tasks[id]?.value
  }

  // MARK: Recovery

  /// At start-up, after `restore()` and the first scan: finishes every operation a crash left
  /// unfinished (see `ReconfigureMachine.init(recovering:)`). Returns the ids of the operations
  /// taken up (they run on; `waitForOperation` awaits one).
  @discardableResult
  public func recover(from persisted: PersistedState) async -> [String] {
    var taken: [String] = []
    for stored in persisted.operations {
      guard let machine = ReconfigureMachine(recovering: stored) else { continue }
      let pf = machine.journal.pf
      let holder = gate.reservations.holder("reconfiguration \(machine.id)")
      let resources =
        [.pf(pf)] + state.allocations.values.filter { $0.pf == pf }.map { Reservations.Resource.allocation($0.id) }
      do {
        try gate.reservations.take(resources, for: holder)
      } catch {
        if operations.reconfiguring[pf] == machine.id { operations.reconfiguring[pf] = nil }
        noteDiscrepancy(
          "operation \(machine.id) could not reserve PF \(pf): \(error.message); it resumes at the next start")
        continue
      }
      noteDiscrepancy(
        "operation \(machine.id) (\(machine.record.kind) of \(machine.record.target)) was unfinished at start-up: "
          + (machine.journal.rollingBack ? "rolling back" : "rolling forward"))
      do {
        try await store.commit([.putOperation(machine.stored)])
      } catch {
        noteDiscrepancy("operation \(machine.id) could not be recorded: \(error.message)")
      }
      begin(machine, holder: holder, faultsApply: false)
      taken.append(machine.id)
    }
    return taken
  }

  // MARK: Running

  private func run(_ id: String, faultsApply: Bool, fence: Bool = false) async {
    if fence, let reconfigurationFence, let pf = operations.reconfigurations[id]?.machine.journal.pf {
      await reconfigurationFence(pf)
    }
    while var machine = operations.reconfigurations[id]?.machine {
      guard case .run(let index, let action) = machine.start(at: clock.now()) else { break }
      if stopping { return halt(id, "stopped for the shutdown") }
      let journal = machine.journal
      let fault = faultsApply ? faults.flatMap { $0.matches(action, at: index, in: journal.actions) ? $0 : nil } : nil
      if let fault, fault.effect == .crashBefore {
        fault.crash("injected crash before step \(index + 1) (\(action.kind.rawValue))")
      }
      guard await save(machine) else { return }
      if stopping { return halt(id, "stopped for the shutdown") }
      do throws(AgentError) {
        if let fault, fault.effect == .fail {
          throw AgentError(.internal, "injected failure at step \(index + 1) (\(action.kind.rawValue))")
        }
        let edits = try await perform(action, journal: journal, operation: id)
        machine = operations.reconfigurations[id]?.machine ?? machine  // notes made while the step ran
        machine.succeeded(at: clock.now())
        guard await save(machine, edits: edits) else { return }
        apply(edits)
      } catch {
        // Interrupted by a shutdown: not a failure. The step stays running in the journal.
        if stopping { return halt(id, "stopped for the shutdown") }
        machine = operations.reconfigurations[id]?.machine ?? machine
        machine.failed(error.message, at: clock.now())
        guard await save(machine) else { return }
      }
      if let fault, fault.effect == .crashAfter {
        fault.crash("injected crash after step \(index + 1) (\(action.kind.rawValue))")
      }
    }
    end(id)
  }

  /// Records the operation (and `edits` to allocations) in one transaction; on failure the
  /// operation stops where it is, its journal intact for the next start.
  private func save(_ machine: ReconfigureMachine, edits: [AllocationEdit] = []) async -> Bool {
    var writes = edits.map(\.storeChange)
    writes.append(.putOperation(machine.stored))
    do {
      try await store.commit(writes)
    } catch {
      var stopped = machine
      stopped.stopped(error.message)
      remember(stopped.record)
      halt(machine.id, "the state store failed")
      return false
    }
    operations.reconfigurations[machine.id]?.machine = machine
    remember(machine.record)
    return true
  }

  /// The operation stopped before its end (shutdown, store failure): the PF may be half
  /// changed, so it and its allocations stay reserved until the next start resumes the journal.
  private func halt(_ id: String, _ reason: String) {
    noteDiscrepancy("operation \(id) \(reason); it resumes from its journal at the next start")
    operations.tasks[id] = nil
  }

  /// The operation has ended: its PF and allocations are free again.
  private func end(_ id: String) {
    operations.tasks[id] = nil
    guard let running = operations.reconfigurations.removeValue(forKey: id) else { return }
    if operations.reconfiguring[running.machine.journal.pf] == id {
      operations.reconfiguring[running.machine.journal.pf] = nil
    }
    gate.reservations.release(running.holder)
  }

  /// Applies edits (already recorded) to memory, as one revision.
  func apply(_ edits: [AllocationEdit]) {
    var changes: [InventoryChange] = []
    for edit in edits {
      switch edit {
      case .update(let allocation):
        changes += state.allocations[allocation.id] == nil ? state.insert(allocation) : state.update(allocation)
      case .remove(let allocation):
        if let (_, removed) = state.remove(allocation: allocation.id) { changes += removed }
      }
    }
    publish(changes)
  }

  /// Carries out one step; returns the allocation records it changes (written with the step).
  private func perform(
    _ action: ReconfigureAction, journal: ReconfigureJournal, operation id: String
  ) async throws(AgentError) -> [AllocationEdit] {
    switch action.kind {
    case .plan, .commit:
      return []
    case .pause, .resume:
      let (hypervisor, allocation) = try vmAction(action)
      let vm = action.vm ?? allocation.vm ?? ""
      if action.kind == .pause {
        try await hypervisor.pause(deviceID: allocation.deviceID ?? allocation.id, in: vm)
        return []
      }
      try await hypervisor.resume(deviceID: allocation.deviceID ?? allocation.id, in: vm)
      var resumed = allocation
      resumed.lastRelayout = Relayout(how: .paused, operationID: id, at: clock.now())
      return [.update(resumed)]
    case .detach:
      let (hypervisor, allocation) = try vmAction(action)
      try await hypervisor.detach(
        deviceID: allocation.deviceID ?? allocation.id, from: action.vm ?? allocation.vm ?? "", timeout: detachTimeout)
      var detached = allocation
      detached.attached = false
      detached.detaching = false
      detached.deviceID = nil
      detached.rootPort = nil
      publish(state.apply(vms: await hypervisor.machines()))
      return [.update(detached)]
    case .reattach:
      let (hypervisor, allocation) = try vmAction(action)
      let vm = action.vm ?? allocation.vm ?? ""
      let port: String
      if let present = await hypervisor.pluggedDevices().first(where: { $0.vm == vm && $0.deviceID == allocation.id }) {
        port = present.rootPort ?? "?"  // plugged before a crash: nothing to do
      } else {
        port = try await hypervisor.attach(vf: allocation.vf, to: vm, deviceID: allocation.id)
      }
      var attached = allocation
      attached.attached = true
      attached.vm = vm
      attached.deviceID = allocation.id
      attached.rootPort = port
      attached.detaching = false
      attached.lastRelayout = Relayout(
        how: action.fallback == nil ? .replugged : .replugFallback, operationID: id, at: clock.now(),
        detail: action.fallback)
      publish(state.apply(vms: await hypervisor.machines()))
      return [.update(attached)]
    case .writeZero, .writeCount:
      let count = action.kind == .writeZero ? 0 : (action.count ?? journal.to)
      try await platform.setVFCount(pf: journal.pf, to: count) { [weak self] blocked in
        await self?.noteBlocked(id, blocked)
      }
      return []
    case .release:
      guard let allocationID = action.allocationID, let allocation = state.allocations[allocationID] else { return [] }
      return [.remove(allocation)]
    case .verify:
      let expected = action.count ?? journal.to
      let node = try await platform.discover()
      guard let found = node.pfs.first(where: { $0.function.address == journal.pf }) else {
        throw AgentError(.internal, "PF \(journal.pf) vanished from the platform during the reconfiguration")
      }
      guard found.function.numVFs == expected else {
        throw AgentError(.internal, "PF \(journal.pf) shows \(found.function.numVFs) VFs, not the \(expected) written")
      }
      // The PF's new layout replaces the recorded one; kept allocations follow their VF's
      // new IOMMU group. Allocations on VFs that are gone were released by earlier steps.
      var edits: [AllocationEdit] = []
      let byAddress = Dictionary(found.vfs.map { ($0.address, $0) }, uniquingKeysWith: { a, _ in a })
      for allocation in state.allocations.values.sorted(by: { $0.id < $1.id }) where allocation.pf == journal.pf {
        guard let vf = byAddress[allocation.vf] else {
          edits.append(.remove(allocation))
          continue
        }
        if vf.iommuGroup != allocation.iommuGroup || vf.numaNode != allocation.numaNode {
          var moved = allocation
          moved.iommuGroup = vf.iommuGroup
          moved.numaNode = vf.numaNode
          edits.append(.update(moved))
        }
      }
      // Records first (removals reach the store before the scan ends them in memory).
      try await store.commit(edits.map(\.storeChange))
      apply(edits)
      await publishScan(changes(applying: node, verified: journal.pf))
      restoreFailed.remove(journal.pf)
      await saveLearned(verified: journal.pf)
      return []
    case .bind:
      guard let vf = action.vf else { return [] }
      _ = try await prepareForPassthrough(vf: vf)
      return []
    case .setQmax:
      try await platform.setQueueCount(pf: journal.pf, to: action.count ?? 0)
      return []
    }
  }

  private func vmAction(_ action: ReconfigureAction) throws(AgentError) -> (any Hypervisor, Allocation) {
    guard let hypervisor else { throw AgentError(.failedPrecondition, "no VMs are configured on this agent") }
    guard let id = action.allocationID, let allocation = state.allocations[id] else {
      throw AgentError(.notFound, "allocation \(action.allocationID ?? "?") no longer exists")
    }
    return (hypervisor, allocation)
  }

  /// A VF count write the kernel holds: shown on the running step, logged as a discrepancy.
  private func noteBlocked(_ id: String, _ text: String) {
    guard var machine = operations.reconfigurations[id]?.machine else { return }
    machine.waiting(text)
    operations.reconfigurations[id]?.machine = machine
    remember(machine.record)
  }
}

/// A reconfiguration under way and the holder of its PF and allocations.
struct RunningReconfiguration: Sendable {
  var machine: ReconfigureMachine
  let holder: Reservations.Holder
}

/// An allocation record changed by a step or by reconciliation.
enum AllocationEdit: Sendable {
  case update(Allocation)
  case remove(Allocation)

  var storeChange: StoreChange {
    switch self {
    case .update(let allocation): .putAllocation(allocation)
    case .remove(let allocation): .deleteAllocation(allocation.id)
    }
  }
}

/// The engine's operations: those under way (by PF and by id, with their tasks), and the
/// record of every operation for GetOperation and WatchOperation.
struct Operations: Sendable {
  /// PFs under reconfiguration, with the operation's id.
  var reconfiguring: [PCIAddress: String] = [:]
  /// Reconfigurations under way, by operation id.
  var reconfigurations: [String: RunningReconfiguration] = [:]
  /// Their tasks, awaited by `close()`.
  var tasks: [String: Task<Void, Never>] = [:]
  /// The last 1,024 finished operations, 256 plans apart, and the ones under way.
  var log = OperationLog(history: 1024, planHistory: 256)
  /// The steps of restores under way, to count what they did.
  var restoreActions: [String: [ReconfigureAction]] = [:]
}
