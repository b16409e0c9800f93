/// Changing a PF's VF count while VMs hold its VFs: a journaled state machine. Every step is
/// recorded before it runs and after it ends, so a restart rolls an unfinished change back
/// (before any VF count write began) or forward (after), and nothing is lost on the way.
extension NodeEngine {
  public func reconfigure(_ request: ReconfigureRequest) async throws(AgentError) -> OperationRecord {
    try await fence(request.meta)
    let fingerprint = "\(request.pf)\u{0}\(request.count)\u{0}\(request.strategy.rawValue)\u{0}\(request.dryRun)"
    if let key = request.meta.idempotencyKey,
      case .operation(let id)? = try ledger.lookup(scope: "Reconfigure", key: key, fingerprint: fingerprint),
      let record = operations[id]
    {
      return record
    }
    guard let pf = state.pf(request.pf) else {
      throw AgentError(.notFound, "PF \(request.pf) is not managed by this node; `fpgactl inventory` lists the PFs")
    }
    if let running = reconfiguring[pf.address] {
      throw AgentError(
        .aborted, "PF \(pf.address) is already being reconfigured by \(running); watch it with `fpgactl operation \(running) --watch`")
    }
    guard (0...pf.totalVFs).contains(request.count) else {
      throw AgentError(
        .invalidArgument, "vf_count \(request.count) is out of range for PF \(pf.address): it supports 0 to \(pf.totalVFs) VFs")
    }
    guard pf.driver != nil || pf.numVFs == request.count else {
      throw AgentError(
        .failedPrecondition,
        "PF \(pf.address) has no driver bound: its VF count cannot change (bind its PF driver, qdma-pf on QDMA cards)")
    }
    let allocations = state.allocations.values.filter { $0.pf == pf.address }
    if let busy = allocations.first(where: { inFlight.contains($0.id) }) {
      throw AgentError(.aborted, "allocation \(busy.id) on PF \(pf.address) is being attached or detached; retry when that ends")
    }
    let plan = try ReconfigurePlanner(
      pf: pf, vfs: state.vfs(of: pf.address), allocations: allocations, vms: state.vms, count: request.count,
      strategy: request.strategy
    ).plan()
    // VFs held open by something the plan does not release (a VM the agent does not manage, a
    // cold-plugged device): the kernel will block the write of 0 until they let go.
    let released = Set(plan.actions.filter { $0.kind == .pause || $0.kind == .detach }.compactMap(\.vf))
    let blockers = request.count == pf.numVFs ? [:] : await platform.vfHolders(pf: pf.address).filter { !released.contains($0.key) }
    var warning = ""
    if !blockers.isEmpty {
      warning = "; the kernel will block it until "
        + blockers.sorted { $0.key < $1.key }.map { "VF \($0.key) is released by \($0.value)" }.joined(separator: " and ")
        + ", which no allocation of this agent attaches"
    }
    let now = clock.now()
    var record = OperationRecord(
      id: Self.makeID(prefix: "op-"), kind: "reconfigure", target: pf.address.description,
      state: request.dryRun ? .planned : .running,
      steps: plan.actions.map {
        .init(description: $0.description(pf: pf.address) + ($0.kind == .writeZero ? warning : ""), state: .pending)
      },
      impacts: plan.impacts, createdAt: now)
    record.steps[0].state = .succeeded
    record.steps[0].startedAt = now
    record.steps[0].finishedAt = now
    if request.dryRun {
      for index in record.steps.indices.dropFirst() { record.steps[index].state = .planned }
      record.finishedAt = now
      remember(record)
      return record
    }
    let journal = ReconfigureJournal(
      pf: pf.address, from: pf.numVFs, to: request.count, strategy: request.strategy, actions: plan.actions)
    var writes: [StoreChange] = [.putOperation(StoredOperation(record: record, journal: journal))]
    let idempotency = request.meta.idempotencyKey.map {
      IdempotencyRecord(scope: "Reconfigure", key: $0, fingerprint: fingerprint, outcome: .operation(record.id))
    }
    if let idempotency { writes.append(.putIdempotency(idempotency)) }
    // The PF is taken before the write, so a concurrent request cannot start a second change.
    let claimed = try claim(idempotency)
    defer { releaseKey(claimed) }
    reconfiguring[pf.address] = record.id
    for allocation in allocations { inFlight.insert(allocation.id) }
    do {
      try await store.commit(writes)
    } catch {
      releasePF(pf.address.description)
      throw error
    }
    if let idempotency { ledger.record(idempotency) }
    begin(record, journal, faultsApply: true)
    return record
  }

  /// Takes the PF and its allocations out of other requests' reach, then runs the steps.
  private func begin(_ record: OperationRecord, _ journal: ReconfigureJournal, faultsApply: Bool) {
    reconfiguring[journal.pf] = record.id
    for allocation in state.allocations.values where allocation.pf == journal.pf {
      inFlight.insert(allocation.id)
    }
    journals[record.id] = journal
    remember(record)
    let task = Task { await self.run(record.id, faultsApply: faultsApply) }
    runningOperations[record.id] = task
  }

  /// Waits until operation `id` has ended (tests, shutdown).
  public func waitForOperation(_ id: String) async {
    await runningOperations[id]?.value
  }

  // MARK: Recovery

  /// At start-up, after `restore()` and the first scan: finishes every operation a crash left
  /// unfinished. Before any VF count write began, the change is rolled back (paused devices
  /// resumed, detached ones re-attached); after, it is rolled forward to the planned layout.
  /// Returns the ids of the operations taken up (they run on; `waitForOperation` awaits one).
  @discardableResult
  public func recover(from persisted: PersistedState) async -> [String] {
    var taken: [String] = []
    for stored in persisted.operations {
      guard var journal = stored.journal, !stored.record.state.isTerminal else { continue }
      var record = stored.record
      if !journal.rollingBack && !journal.countWriteBegan(record) {
        let undo = journal.rollbackBeforeCountWrite(record)
        journal.rollingBack = true
        record.error = "the agent stopped during this operation; it was rolled back at restart"
        append(undo, to: &record, &journal, pf: journal.pf)
      } else if !journal.rollingBack {
        record.error = nil
      }
      for index in record.steps.indices where record.steps[index].state == .running {
        // Unknown whether it finished: it is run again (every step is idempotent).
        record.steps[index].state = .pending
      }
      noteDiscrepancy(
        "operation \(record.id) (\(record.kind) of \(record.target)) was unfinished at start-up: "
          + (journal.rollingBack ? "rolling back" : "rolling forward"))
      do {
        try await store.commit([.putOperation(StoredOperation(record: record, journal: journal))])
      } catch {
        noteDiscrepancy("operation \(record.id) could not be recorded: \(error.message)")
      }
      begin(record, journal, faultsApply: false)
      taken.append(record.id)
    }
    return taken
  }

  // MARK: Running

  private func run(_ id: String, faultsApply: Bool) async {
    while let journal = journals[id], var record = operations[id],
      let index = record.steps.firstIndex(where: { $0.state == .pending })
    {
      let action = journal.actions[index]
      let fault = faultsApply ? faults.flatMap { $0.matches(action, at: index, in: journal.actions) ? $0 : nil } : nil
      if let fault, fault.effect == .crashBefore { fault.crash("injected crash before step \(index + 1) (\(action.kind.rawValue))") }
      record.steps[index].state = .running
      record.steps[index].startedAt = clock.now()
      record.steps[index].error = nil
      guard await save(record, journal) else { return }
      do throws(AgentError) {
        if let fault, fault.effect == .fail {
          throw AgentError(.internal, "injected failure at step \(index + 1) (\(action.kind.rawValue))")
        }
        let edits = try await perform(action, journal: journal, operation: id)
        record = operations[id] ?? record
        record.steps[index].state = .succeeded
        record.steps[index].finishedAt = clock.now()
        record.steps[index].error = nil
        if action.kind == .commit {
          record.state = journal.rollingBack || record.steps.contains { $0.state == .failed } ? .failed : .succeeded
          record.finishedAt = clock.now()
        }
        guard await save(record, action.kind == .commit ? nil : journal, edits: edits) else { return }
        apply(edits)
      } catch {
        record = operations[id] ?? record
        record.steps[index].state = .failed
        record.steps[index].error = error.message
        record.steps[index].finishedAt = clock.now()
        var journal = journal
        if action.tolerant {
          // An undo of a step that may never have happened.
        } else if !journal.rollingBack && !journal.countWriteBegan(record, failedAt: index) {
          journal.rollingBack = true
          record.error = "step \(index + 1) failed: \(error.message); rolled back"
          append(journal.rollbackBeforeCountWrite(record), to: &record, &journal, pf: journal.pf)
        } else if !journal.rollingBack && action.kind.isCountChange {
          journal.rollingBack = true
          record.error = "step \(index + 1) failed: \(error.message); restored \(journal.from) VFs"
          append(journal.rollbackAfterCountWrite(record), to: &record, &journal, pf: journal.pf)
        } else if record.error == nil {
          record.error = "step \(index + 1) failed: \(error.message)"
        }
        guard await save(record, journal) else { return }
      }
      if let fault, fault.effect == .crashAfter { fault.crash("injected crash after step \(index + 1) (\(action.kind.rawValue))") }
    }
    finish(id)
  }

  /// Turns an operation into its rollback: the steps not yet done are skipped, `actions` and a
  /// final commit are appended.
  private func append(
    _ actions: [ReconfigureAction], to record: inout OperationRecord, _ journal: inout ReconfigureJournal, pf: PCIAddress
  ) {
    for index in record.steps.indices where record.steps[index].state == .pending || record.steps[index].state == .running {
      record.steps[index].state = .planned
      record.steps[index].error = "skipped: rolled back"
    }
    for action in actions + [ReconfigureAction(kind: .commit)] {
      journal.actions.append(action)
      record.steps.append(.init(description: "roll back: " + action.description(pf: pf), state: .pending))
    }
  }

  /// Records the operation (and `edits` to allocations) in one transaction; on failure the
  /// operation stops where it is, its journal intact for the next start.
  private func save(_ record: OperationRecord, _ journal: ReconfigureJournal?, edits: [AllocationEdit] = []) async -> Bool {
    var writes = edits.map(\.storeChange)
    writes.append(.putOperation(StoredOperation(record: record, journal: journal)))
    do {
      try await store.commit(writes)
    } catch {
      var stopped = record
      stopped.error = "the state store failed (\(error.message)); the operation stops here and resumes at the next start"
      remember(stopped)
      journals[record.id] = nil
      releasePF(stopped.target)
      return false
    }
    if let journal { journals[record.id] = journal }
    remember(record)
    return true
  }

  private func finish(_ id: String) {
    journals[id] = nil
    runningOperations[id] = nil
    if let record = operations[id] { releasePF(record.target) }
  }

  private func releasePF(_ target: String) {
    guard let pf = PCIAddress(target) else { return }
    reconfiguring[pf] = nil
    for allocation in state.allocations.values where allocation.pf == pf { inFlight.remove(allocation.id) }
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
        inFlight.remove(allocation.id)
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
      } else {
        try await hypervisor.resume(deviceID: allocation.deviceID ?? allocation.id, in: vm)
      }
      return []
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
      return []
    case .bind:
      guard let vf = action.vf else { return [] }
      _ = try await prepareForPassthrough(vf: vf)
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
    guard var record = operations[id], let index = record.steps.firstIndex(where: { $0.state == .running }) else { return }
    record.steps[index].error = "waiting: " + text
    remember(record)
  }
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

/// How guests holding VFs are treated when their PF is reconfigured.
public enum ReconfigureStrategy: String, Hashable, Sendable, Codable, CaseIterable {
  /// Pause where the VMM can, otherwise detach and re-attach.
  case auto
  /// Pause every affected device; refused when some VMM cannot pause.
  case pause
  /// Announced hot-unplug, re-attach once the VFs are back.
  case detachReattach = "detach-reattach"
  /// Refused when any guest would see an unplug.
  case refuseIfDisruptive = "refuse-if-disruptive"
}

public struct ReconfigureRequest: Hashable, Sendable {
  public var meta: RequestMeta
  public var pf: PCIAddress
  public var count: Int
  public var strategy: ReconfigureStrategy
  public var dryRun: Bool

  public init(meta: RequestMeta = .init(), pf: PCIAddress, count: Int, strategy: ReconfigureStrategy = .auto, dryRun: Bool = false) {
    self.meta = meta
    self.pf = pf
    self.count = count
    self.strategy = strategy
    self.dryRun = dryRun
  }
}

/// One step of a reconfiguration, as journaled.
public struct ReconfigureAction: Hashable, Sendable, Codable {
  public enum Kind: String, Hashable, Sendable, Codable, CaseIterable {
    case plan, pause, detach
    case writeZero = "write-zero"
    case writeCount = "write-count"
    case release, verify, bind, resume, reattach, commit

    var isCountChange: Bool { self == .writeZero || self == .writeCount || self == .verify }
  }

  public var kind: Kind
  public var allocationID: String?
  public var vm: String?
  public var vf: PCIAddress?
  /// The count written or verified (default: the operation's target).
  public var count: Int?
  /// An undo of a step that may not have happened: its failure does not stop the operation.
  public var tolerant: Bool

  public init(
    kind: Kind, allocationID: String? = nil, vm: String? = nil, vf: PCIAddress? = nil, count: Int? = nil,
    tolerant: Bool = false
  ) {
    self.kind = kind
    self.allocationID = allocationID
    self.vm = vm
    self.vf = vf
    self.count = count
    self.tolerant = tolerant
  }

  func description(pf: PCIAddress) -> String {
    let allocation = allocationID ?? "?"
    let on = vf.map { " (VF \($0))" } ?? ""
    switch kind {
    case .plan: return "plan the new layout of PF \(pf)"
    case .pause: return "pause device \(allocation)\(on) in VM \(vm ?? "?"): the guest keeps its device"
    case .detach: return "detach \(allocation)\(on) from VM \(vm ?? "?"): the guest sees an unplug"
    case .writeZero: return "write 0 to sriov_numvfs of \(pf): its VFs are removed"
    case .writeCount: return "write \(count.map(String.init) ?? "N") to sriov_numvfs of \(pf) (autoprobe off)"
    case .release: return "end allocation \(allocation)\(on): its VF no longer exists"
    case .verify: return "verify that \(pf) has \(count.map(String.init) ?? "N") VFs and record the new layout"
    case .bind: return "bind VF \(vf?.description ?? "?") to vfio-pci"
    case .resume: return "resume device \(allocation)\(on) in VM \(vm ?? "?")"
    case .reattach: return "re-attach \(allocation)\(on) to VM \(vm ?? "?")"
    case .commit: return "commit"
    }
  }
}

/// The plan of an unfinished reconfiguration, kept with its operation in the store.
public struct ReconfigureJournal: Hashable, Sendable, Codable {
  public var pf: PCIAddress
  public var from: Int
  public var to: Int
  public var strategy: ReconfigureStrategy
  public var actions: [ReconfigureAction]
  public var rollingBack = false

  public init(pf: PCIAddress, from: Int, to: Int, strategy: ReconfigureStrategy, actions: [ReconfigureAction]) {
    self.pf = pf
    self.from = from
    self.to = to
    self.strategy = strategy
    self.actions = actions
  }

  /// Whether a VF count write has started (or step `failedAt`, a count step, was reached).
  func countWriteBegan(_ record: OperationRecord, failedAt: Int? = nil) -> Bool {
    actions.indices.contains { index in
      actions[index].kind.isCountChange
        && (record.steps[index].state != .pending && record.steps[index].state != .planned || index == failedAt)
    }
  }

  /// Undo of the pauses and detaches that happened (or may have): resume, re-attach.
  func rollbackBeforeCountWrite(_ record: OperationRecord) -> [ReconfigureAction] {
    var undo: [ReconfigureAction] = []
    for index in actions.indices.reversed() {
      let action = actions[index]
      let state = record.steps[index].state
      guard state == .succeeded || state == .running || state == .failed else { continue }
      let uncertain = state != .succeeded
      switch action.kind {
      case .pause:
        undo.append(.init(kind: .resume, allocationID: action.allocationID, vm: action.vm, vf: action.vf, tolerant: uncertain))
      case .detach:
        undo.append(.init(kind: .bind, vf: action.vf, tolerant: true))
        undo.append(.init(kind: .reattach, allocationID: action.allocationID, vm: action.vm, vf: action.vf, tolerant: uncertain))
      default: continue
      }
    }
    return undo
  }

  /// Back to the old count after a failed count write: write it, verify, then resume and
  /// re-attach every device the operation had paused or detached.
  func rollbackAfterCountWrite(_ record: OperationRecord) -> [ReconfigureAction] {
    var undo: [ReconfigureAction] = [
      .init(kind: .writeCount, count: from), .init(kind: .verify, count: from),
    ]
    for action in actions where action.kind == .pause || action.kind == .detach {
      undo.append(.init(kind: .bind, vf: action.vf, tolerant: true))
      undo.append(
        .init(kind: action.kind == .pause ? .resume : .reattach, allocationID: action.allocationID, vm: action.vm, vf: action.vf))
    }
    return undo
  }
}

/// Works out what a reconfiguration does to every allocation of the PF, and refuses what the
/// strategy forbids. Pure: the dry run and the real run use the same plan.
struct ReconfigurePlanner {
  let pf: PhysicalFunction
  let vfs: [VirtualFunction]
  let allocations: [Allocation]
  let vms: [String: VirtualMachineInfo]
  let count: Int
  let strategy: ReconfigureStrategy

  struct Plan {
    var actions: [ReconfigureAction]
    var impacts: [OperationRecord.Impact]
  }

  func plan() throws(AgentError) -> Plan {
    let indexOf = Dictionary(vfs.map { ($0.address, $0.index) }, uniquingKeysWith: { a, _ in a })
    var before: [ReconfigureAction] = []
    var releases: [ReconfigureAction] = []
    var binds: [ReconfigureAction] = []
    var after: [ReconfigureAction] = []
    var impacts: [OperationRecord.Impact] = []
    var refusals: [String] = []
    let sorted = allocations.sorted { (indexOf[$0.vf] ?? .max, $0.id) < (indexOf[$1.vf] ?? .max, $1.id) }
    let unchanged = count == pf.numVFs
    for allocation in sorted {
      let kept = (indexOf[allocation.vf] ?? .max) < count
      let vm = allocation.vm ?? "?"
      if unchanged {
        impacts.append(.init(allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "kept", guestSees: "nothing"))
        continue
      }
      if !kept {
        if allocation.attached {
          before.append(.init(kind: .detach, allocationID: allocation.id, vm: vm, vf: allocation.vf))
          if strategy == .refuseIfDisruptive {
            refusals.append("\(allocation.id) in VM \(vm) is on VF \(allocation.vf), which the new count removes (the guest would see an unplug)")
          }
        }
        releases.append(.init(kind: .release, allocationID: allocation.id, vf: allocation.vf))
        impacts.append(
          .init(allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "lost",
            guestSees: allocation.attached ? "unplug" : "nothing"))
        continue
      }
      guard allocation.attached else {
        impacts.append(.init(allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "kept", guestSees: "nothing"))
        continue
      }
      let canPause = vms[vm]?.vfioPause ?? false
      let pause: Bool
      switch strategy {
      case .detachReattach: pause = false
      case .auto: pause = canPause
      case .pause, .refuseIfDisruptive:
        pause = canPause
        if !canPause {
          refusals.append("VM \(vm) holds \(allocation.id) (VF \(allocation.vf)) and its VMM cannot pause VFIO devices")
        }
      }
      before.append(.init(kind: pause ? .pause : .detach, allocationID: allocation.id, vm: vm, vf: allocation.vf))
      binds.append(.init(kind: .bind, vf: allocation.vf))
      after.append(.init(kind: pause ? .resume : .reattach, allocationID: allocation.id, vm: vm, vf: allocation.vf))
      impacts.append(
        .init(allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm,
          outcome: pause ? "kept-paused" : "kept-reattached", guestSees: pause ? "pause" : "unplug and replug"))
    }
    if !refusals.isEmpty {
      let advice =
        strategy == .pause
        ? "use strategy detach-reattach (or auto) to unplug and replug instead"
        : "use strategy auto or detach-reattach to accept the unplug, or detach those VFs first"
      throw AgentError(
        .failedPrecondition,
        "strategy \(strategy.rawValue) refuses this reconfiguration of PF \(pf.address): "
          + refusals.joined(separator: "; ") + "; " + advice)
    }
    var actions: [ReconfigureAction] = [.init(kind: .plan, count: count)]
    if !unchanged {
      actions += before
      if pf.numVFs > 0 { actions.append(.init(kind: .writeZero)) }
      if count > 0 { actions.append(.init(kind: .writeCount, count: count)) }
      actions += releases
      actions.append(.init(kind: .verify, count: count))
      actions += binds
      actions += after
    }
    actions.append(.init(kind: .commit))
    return Plan(actions: actions, impacts: impacts)
  }
}
