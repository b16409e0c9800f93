/// The node's single source of truth: the inventory, allocations, idempotency and fencing. The
/// API layer turns requests into calls on it; platforms report what they find into it.
public actor NodeEngine {
  public nonisolated let nodeID: String
  public nonisolated let startedAt: WallTime
  let platform: any NodePlatform
  let hypervisor: (any Hypervisor)?
  /// What the mutations under way hold, and the results of the finished ones (see
  /// `NodeEngine+Mutation.swift`).
  var gate = MutationGate()
  let clock: any WallClock
  var state: InventoryState
  let store: any StateStore
  /// The operations under way and the last ones that ended.
  var operations = Operations()
  /// PFs being reconfigured now.
  public var reconfiguringPFs: Set<PCIAddress> { Set(operations.reconfiguring.keys) }
  /// Drain flags restored from the store, applied once their PF or card is discovered.
  var pendingDrains: Set<String> = []
  /// What a restart found that disagreed with the records (for status and logs).
  public private(set) var discrepancies: [String] = []
  /// Test hook: crash or fail at a named reconfiguration step.
  let faults: FaultInjection?
  /// Set by `close()`: operations stop at their current step, which stays journaled.
  var stopping = false
  /// How long a reconfiguration waits for a guest to acknowledge an unplug.
  let detachTimeout: Duration
  /// Accelerator runners by accelerator id.
  let runners: [String: AcceleratorRunner]
  /// Registered contexts by id.
  var contexts: [String: ContextRecord] = [:]
  /// The orchestrator link's state, set by the link.
  public private(set) var link = OrchestratorLinkStatus()

  public func setLink(_ status: OrchestratorLinkStatus) { link = status }
  private let broadcaster = InventoryBroadcaster()
  private var capabilities: PlatformCapabilities
  /// Devices the last scan could not read (kept out of allocation, reported in status).
  private var scanProblems: [String] = []
  public internal(set) var highestEpoch: UInt64 = 0
  private let watchBufferLimit: Int
  /// Devices' health across scans (see `NodeEngine+Health.swift`).
  var healthTracker: HealthTracker
  /// PFs that left the bus while known, with since when (until they come back).
  var gone: [PCIAddress: WallTime] = [:]
  /// The last allocations the agent ended on its own (device gone), with the reason.
  public internal(set) var endedAllocations: [EndedAllocation] = []
  /// Drains the health policy raised, to record at the next commit of a scan.
  var healthDrains: [String] = []
  /// Attached VFs no process holds open (VF → its VM), found at the last rescan (linux platform).
  var unheldAttachments: [PCIAddress: String] = [:]
  /// Each managed PF's VF layout as the store has it (see `NodeEngine+Layouts.swift`).
  var recordedLayouts: [PCIAddress: PFLayout] = [:]
  /// PFs whose layout restore after a reboot failed: their record is kept, not overwritten by
  /// the layout found, until the agent changes them.
  var restoreFailed: Set<PCIAddress> = []
  /// The host rebooted since the last run (its boot id changed).
  var hostRebooted = false
  /// What start-up found of the boot and restored.
  var layoutReport: LayoutRestoreReport?
  /// Whether the first scan has dropped the health memories of devices no longer present.
  var healthPruned = false
  /// Told of every operation that ends.
  var operationObserver: (@Sendable (OperationRecord) -> Void)?
  /// Told of every allocation the agent ends on its own (and of a later, better reason).
  var endedObserver: (@Sendable (EndedAllocation) -> Void)?

  /// Awaited once before a new reconfiguration's first step, with its PF already marked as
  /// reconfiguring: schedulers' views fence the PF's VFs before any of them goes (DRA publishes
  /// them tainted). The fence bounds its own wait; a failed fence does not stop the operation.
  var reconfigurationFence: (@Sendable (PCIAddress) async -> Void)?

  public func fenceReconfigurations(_ fence: @escaping @Sendable (PCIAddress) async -> Void) {
    reconfigurationFence = fence
  }

  /// Calls `observer` with every allocation the agent ends on its own (the audit trail).
  public func observeEndedAllocations(_ observer: @escaping @Sendable (EndedAllocation) -> Void) {
    endedObserver = observer
  }

  public init(
    nodeID: String, platform: any NodePlatform, clock: any WallClock, hypervisor: (any Hypervisor)? = nil,
    store: any StateStore = MemoryStateStore(), faults: FaultInjection? = nil, detachTimeout: Duration = .seconds(30),
    accelerators: [AcceleratorRunner] = [], changeLogCapacity: Int = 4096, watchBufferLimit: Int = 4096,
    healthPolicy: HealthPolicy = HealthPolicy()
  ) {
    self.healthTracker = HealthTracker(policy: healthPolicy)
    self.runners = Dictionary(accelerators.map { ($0.spec.id, $0) }, uniquingKeysWith: { a, _ in a })
    self.store = store
    self.faults = faults
    self.detachTimeout = detachTimeout
    self.nodeID = nodeID
    self.platform = platform
    self.hypervisor = hypervisor
    self.clock = clock
    self.startedAt = clock.now()
    self.state = InventoryState(changeLogCapacity: changeLogCapacity)
    self.capabilities = PlatformCapabilities(platform: "unknown", iommu: false, vfioPCI: false, qdmaDriver: nil)
    self.watchBufferLimit = watchBufferLimit
  }

  // MARK: Discovery

  /// Scans the platform and folds what it found into the inventory; returns the revision.
  @discardableResult
  public func rescan() async throws(AgentError) -> UInt64 {
    let node = try await platform.discover()
    var found = await platform.capabilities()
    if found.platform == "linux" { await findUnheldAttachments() }
    var changes = changes(applying: node)
    if let hypervisor {
      let vms = await hypervisor.machines()
      found.vfioPause =
        !vms.isEmpty && vms.allSatisfy { $0.vfioPause || $0.state == .unreachable }
        && vms.contains { $0.vfioPause }
      changes += state.apply(vms: vms)
    }
    capabilities = found
    scanProblems = node.problems
    return await publishScan(changes)
  }

  /// Folds a platform scan into the inventory. A PF under reconfiguration keeps its recorded
  /// VFs until its operation verifies the new layout (`verified`).
  func changes(applying scan: DiscoveredNode, verified: PCIAddress? = nil) -> [InventoryChange] {
    var node = scan
    assessHealth(&node)
    for (index, pf) in node.pfs.enumerated()
    where pf.function.address != verified && operations.reconfiguring[pf.function.address] != nil {
      if let kept = state.discovered(pf.function.address) { node.pfs[index] = kept }
    }
    return state.apply(node) + applyPendingDrains()
  }

  /// Publishes a scan's changes, then records the end of allocations whose VF vanished under
  /// the agent (memory follows the platform; the store follows memory).
  @discardableResult
  func publishScan(_ changes: [InventoryChange]) async -> UInt64 {
    let revision = publish(changes)
    await saveLearned()
    if !healthDrains.isEmpty {
      let drains = healthDrains
      healthDrains = []
      do {
        try await store.commit(drains.map { .setDrain($0, true) })
      } catch {
        noteDiscrepancy("automatic drains could not be recorded (\(error.message)); they hold until the agent restarts")
      }
    }
    let ended = changes.compactMap { change -> String? in
      if case .allocationRemoved(let id) = change { return id }
      return nil
    }
    guard !ended.isEmpty else { return revision }
    for id in ended {
      let reason = endedAllocations.last { $0.allocation.id == id }?.reason ?? "its VF vanished from the platform"
      noteDiscrepancy("allocation \(id) ended: \(reason)")
    }
    do {
      try await store.commit(ended.map { .deleteAllocation($0) })
    } catch {
      noteDiscrepancy("ended allocations could not be recorded (\(error.message)); the next start reconciles them")
    }
    return revision
  }

  // MARK: Reading

  public func snapshot(cardID: String? = nil) throws(AgentError) -> InventorySnapshot {
    if let cardID, state.card(cardID) == nil {
      throw AgentError(.notFound, "card \(quoted(cardID)) is not on this node; `fpgactl inventory` lists the cards")
    }
    var snapshot = state.snapshot(nodeID: nodeID, cardID: cardID)
    snapshot.endedAllocations = endedAllocations.filter { cardID == nil || $0.allocation.cardID == cardID }
    return snapshot
  }

  public var revision: UInt64 { state.revision }

  /// The deltas after `revision`, nil when the change log no longer has them all.
  public func deltas(after revision: UInt64) -> [InventoryEvent]? { state.deltas(after: revision) }

  public func status() -> NodeStatusValue {
    var found = capabilities
    found.problems += scanProblems
    found.problems += healthProblems()
    if let problem = hypervisor?.connectionProblem { found.problems.append(problem) }
    // An SR-IOV PF without a driver cannot change its VF count (the kernel answers ENOENT).
    for address in state.pfAddresses {
      guard let pf = state.pf(address), pf.driver == nil, pf.totalVFs > 0 else { continue }
      found.problems.append(
        "PF \(address) has no driver bound: its VF count cannot change (bind its PF driver, qdma-pf on QDMA cards)")
    }
    var status = NodeStatusValue(
      nodeID: nodeID, startedAt: startedAt, now: clock.now(), revision: state.revision,
      counts: state.counts, capabilities: found, orchestratorEpoch: highestEpoch,
      watchers: broadcaster.watcherCount, link: link, findings: discrepancies)
    status.layoutRestore = layoutReport
    for entry in layoutReport?.pfs ?? [] where entry.result == .failed {
      status.capabilities.problems.append(
        "PF \(entry.pf)'s recorded layout (\(entry.recorded) VF\(entry.recorded == 1 ? "" : "s")) could not be restored after the reboot: \(entry.error ?? "unknown error"); reconfigure it (`fpgactl reconfigure \(entry.pf) \(entry.recorded)`) once the cause is fixed"
      )
    }
    return status
  }

  /// Starts a watch: a snapshot (revision 0 or too old) or the missed deltas, then every change.
  public func watch(from revision: UInt64) -> InventorySubscription {
    let initial: [InventoryEvent]
    if revision == 0 {
      initial = [.snapshot(state.snapshot(nodeID: nodeID), resync: false)]
    } else if let deltas = state.deltas(after: revision) {
      initial = deltas
    } else {
      initial = [.snapshot(state.snapshot(nodeID: nodeID), resync: true)]
    }
    return broadcaster.subscribe(initial: initial, bufferLimit: watchBufferLimit)
  }

  // MARK: Allocation

  public func allocate(_ request: AllocateRequest) async throws(AgentError) -> AllocationResult {
    try await mutate(
      "AllocateVF", request.meta, fingerprint: request.fingerprint,
      replay: { outcome in
        guard case .allocated(var result) = outcome else { return nil }
        result.replayed = true
        return result
      },
      plan: { () throws(AgentError) in
        let vf = try state.chooseVF(request.constraints, excluding: operations.reconfiguring, taken: gate.allocating)
        let allocation = Allocation(
          id: Self.makeID(prefix: "alloc-"), vf: vf.address, pf: vf.pfAddress, owner: request.owner,
          vm: request.vm, idempotencyKey: request.meta.idempotencyKey, createdAt: clock.now(),
          numaNode: vf.numaNode, iommuGroup: vf.iommuGroup)
        return .proceed((vf, allocation), reserving: [.allocation(allocation.id)], as: "allocation")
      },
      effects: { chosen, _ in
        let (vf, allocation) = chosen
        // The VF is taken at once (a concurrent request cannot choose it), but the allocation
        // enters the inventory, and is published, only once the store has it: a watcher never
        // sees an allocation that a failed write withdraws.
        gate.allocating[vf.address] = allocation.id
        var view = state.view(of: vf)
        view.state = .allocated
        view.allocationID = allocation.id
        view.vm = allocation.vm
        let estimate = AllocationResult(allocation: allocation, vf: view, replayed: false, revision: state.revision + 1)
        return Effects(
          writes: [.putAllocation(allocation)], outcome: .allocated(estimate),
          undo: { self.gate.allocating[vf.address] = nil },
          apply: {
            self.gate.allocating[vf.address] = nil
            let revision = self.publish(self.state.insert(allocation))
            let result = AllocationResult(allocation: allocation, vf: view, replayed: false, revision: revision)
            return (result, .allocated(result))
          })
      })
  }

  /// The VF the kubelet gave a pod becomes an allocation owned by `kubelet` (so the node API
  /// does not hand it out too), bound to vfio-pci. Allocating it again is a no-op.
  public func allocateForKubelet(vf: PCIAddress) async throws(AgentError) -> (Allocation, device: String) {
    try await allocateOwned(vf: vf, owner: "kubelet")
  }

  /// A VF chosen elsewhere (the kubelet, a DRA claim) becomes an allocation owned by `owner`,
  /// bound to vfio-pci; allocating it again for the same owner is a no-op, for another one an
  /// error naming the holder. `key` makes a retry replay the first allocation.
  public func allocateOwned(
    vf: PCIAddress, owner: String, key: String? = nil
  ) async throws(AgentError) -> (Allocation, device: String) {
    let allocation: Allocation
    if let id = state.vf(vf).flatMap({ state.view(of: $0).allocationID }), let existing = state.allocations[id] {
      guard existing.owner == owner else {
        throw AgentError(
          .failedPrecondition,
          "VF \(vf) is allocated to \(existing.owner) (\(existing.id)); it was not free for \(owner)")
      }
      allocation = existing
    } else {
      allocation = try await allocate(
        AllocateRequest(meta: RequestMeta(idempotencyKey: key), owner: owner, vm: nil, constraints: .init(vf: vf))
      ).allocation
    }
    return (allocation, try await prepareForPassthrough(vf: vf))
  }

  /// Binds a VF to vfio-pci (when it is not) and records what the platform shows; returns
  /// `/dev/vfio/N`.
  public func prepareForPassthrough(vf: PCIAddress) async throws(AgentError) -> String {
    if let known = state.vf(vf), known.driver == "vfio-pci", let device = known.vfioDevice { return device }
    let device = try await platform.prepareForPassthrough(vf: vf)
    await publishScan(changes(applying: try await platform.discover()))
    return device
  }

  public func release(_ request: ReleaseRequest) async throws(AgentError) -> ReleaseResult {
    try await mutate(
      "ReleaseVF", request.meta, fingerprint: request.allocationID,
      replay: { outcome in
        guard case .released(var result) = outcome else { return nil }
        result.replayed = true
        return result
      },
      plan: { () throws(AgentError) in
        guard let allocation = state.allocations[request.allocationID] else {
          throw AgentError(
            .notFound,
            "allocation \(request.allocationID) does not exist (already released, or never made); `fpgactl inventory` lists the allocations"
          )
        }
        if allocation.attached {
          throw AgentError(
            .failedPrecondition,
            "allocation \(allocation.id) is attached to VM \(allocation.vm ?? "?"): detach it first (`fpgactl detach \(allocation.id)`)"
          )
        }
        return .proceed(allocation, reserving: [.allocation(allocation.id)], as: "release")
      },
      effects: { allocation, _ in
        // The allocation stays (reserved) until the store no longer has it, so its VF is not
        // handed out before the release is durable; a failed write leaves it as it was.
        Effects(
          writes: [.deleteAllocation(allocation.id)],
          outcome: .released(ReleaseResult(allocation: allocation, replayed: false, revision: state.revision + 1)),
          apply: {
            var revision = self.state.revision
            if let (_, changes) = self.state.remove(allocation: allocation.id) { revision = self.publish(changes) }
            let result = ReleaseResult(allocation: allocation, replayed: false, revision: revision)
            return (result, .released(result))
          })
      })
  }

  // MARK: Shutdown

  /// Ends every watch stream and stops the accelerators and the operations under way, for a
  /// graceful shutdown. An operation stops where it is: the step it was carrying out stays
  /// "running" in its journal and is carried out again at the next start.
  ///
  /// The operations' tasks are owned by the caller's service: they are awaited here, so none
  /// outlives the service group. A step blocked in the kernel that never returns is bounded by
  /// the group's graceful-shutdown and cancellation limits, and its journal is durable.
  public func close() async {
    stopping = true
    let running = operations.tasks
    for task in running.values { task.cancel() }
    for runner in runners.values { await runner.stop() }
    broadcaster.close()
    operations.log.close()
    for waiters in gate.keyWaiters.values {
      for waiter in waiters { waiter.resume() }
    }
    gate.keyWaiters = [:]
    for task in running.values { await task.value }
  }

  // MARK: Operations

  public func operation(_ id: String) throws(AgentError) -> OperationRecord {
    guard let record = operations.log[id] else {
      throw AgentError(
        .notFound,
        "operation \(id) is not known: it never existed or ended more than \(operations.log.history) operations ago")
    }
    return record
  }

  /// The operation now, then after every change, ending once it is finished.
  public func watchOperation(_ id: String) throws(AgentError) -> AsyncStream<OperationRecord> {
    guard !stopping else { throw AgentError(.unavailable, "the agent is shutting down; retry once it has restarted") }
    let record = try operation(id)
    return operations.log.watch(record) { watcher in Task { await self.dropOperationWatcher(id, watcher) } }
  }

  private func dropOperationWatcher(_ id: String, _ watcher: UInt64) {
    operations.log.dropWatcher(id, watcher)
  }

  /// The last `limit` operations the agent keeps (dry-run plans included), newest first.
  public func recentOperations(_ limit: Int) -> [OperationRecord] { operations.log.recent(limit) }

  /// Every change to any operation from now on; ends at shutdown.
  public func watchOperations() throws(AgentError) -> AsyncStream<OperationRecord> {
    guard !stopping else { throw AgentError(.unavailable, "the agent is shutting down; retry once it has restarted") }
    return operations.log.feed { watcher in Task { await self.dropOperationFeed(watcher) } }
  }

  private func dropOperationFeed(_ watcher: UInt64) { operations.log.dropFeed(watcher) }

  /// Operations ended since the start, by kind and result.
  public var endedOperations: [OperationTally: Int] { operations.log.ended }

  /// Stores a new or changed operation and tells its watchers.
  func remember(_ record: OperationRecord) {
    let ended =
      record.state.isTerminal && record.state != .planned && operations.log[record.id]?.state.isTerminal != true
    operations.log.remember(record)
    if ended { operationObserver?(record) }
  }

  /// Watchers cut off for falling behind since the start.
  public var watcherCutOffs: UInt64 { broadcaster.cutOffCount }

  /// Calls `observer` with every accelerator's switches and waits (for metrics).
  public func observeAccelerators(_ observer: @escaping @Sendable (AcceleratorEvent) -> Void) async {
    for runner in runners.values { await runner.observe(observer) }
  }

  /// Calls `observer` with every operation that ends (for metrics).
  public func observeOperations(_ observer: @escaping @Sendable (OperationRecord) -> Void) {
    operationObserver = observer
  }

  // MARK: Internals

  // MARK: Restart

  /// Takes back what the store kept: allocations, idempotency keys, the epoch, drain flags and
  /// operations. Called once, before the first scan; unfinished operations are finished by
  /// `recover()` after it.
  public func restore() async throws(AgentError) -> PersistedState {
    let persisted = try store.load()
    // This run's revisions start above every revision an earlier run handed out, so a watcher
    // resuming from one of those gets a resync snapshot, never another run's deltas.
    try await store.commit([.setStarts(persisted.starts + 1)])
    state.skipRevisions(to: persisted.starts << 32)
    var changes: [InventoryChange] = []
    var taken: [PCIAddress: String] = [:]
    for allocation in persisted.allocations where state.allocations[allocation.id] == nil {
      // One VF, one allocation: a second record for a VF (never written by this agent) is
      // reported and left out rather than trusted.
      if let first = taken[allocation.vf] {
        noteDiscrepancy(
          "allocations \(first) and \(allocation.id) both name VF \(allocation.vf): \(allocation.id) left out")
        continue
      }
      taken[allocation.vf] = allocation.id
      changes += state.insert(allocation)
    }
    for record in persisted.idempotency { gate.ledger.record(record) }
    healthTracker.restore(Array(persisted.health.values))
    // PFs an unfinished operation was changing: the first scan keeps their allocations until
    // `recover` takes the operation up (its verify step decides what the PF has).
    for operation in persisted.operations {
      guard let journal = operation.journal, !operation.record.state.isTerminal else { continue }
      operations.reconfiguring[journal.pf] = operation.record.id
    }
    highestEpoch = max(highestEpoch, persisted.epoch)
    pendingDrains = persisted.drains
    for operation in persisted.operations.suffix(operations.log.history) {
      remember(operation.record)
    }
    publish(changes)
    await restoreAccelerators(persisted)
    return persisted
  }

  /// Applies drain flags kept in the store to the PFs and cards now known.
  func applyPendingDrains() -> [InventoryChange] {
    var changes: [InventoryChange] = []
    for target in pendingDrains.sorted() {
      if let address = PCIAddress(target), state.pf(address) != nil {
        changes += state.setDraining(pf: address, true)
        pendingDrains.remove(target)
      } else if state.card(target) != nil {
        changes += state.setDraining(card: target, true)
        pendingDrains.remove(target)
      }
    }
    return changes
  }

  func noteDiscrepancy(_ text: String) {
    discrepancies.append(text)
    if discrepancies.count > 256 { discrepancies.removeFirst(discrepancies.count - 256) }
  }

  @discardableResult
  func publish(_ changes: [InventoryChange]) -> UInt64 {
    guard !changes.isEmpty else { return state.revision }
    let revision = state.commit(changes)
    broadcaster.publish(.delta(revision: revision, changes: changes))
    return revision
  }

  static func makeID(prefix: String) -> String {
    var generator = SystemRandomNumberGenerator()
    return prefix + hex(Int(generator.next() & 0xffff_ffff_ffff), width: 12)
  }
}
