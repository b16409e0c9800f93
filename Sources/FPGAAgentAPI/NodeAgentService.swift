public import FPGACore
public import GRPCCore
public import Logging
import Synchronization
import SwiftProtobuf

/// The node API (`fpga.agent.v1.NodeAgent`): parses and validates requests, calls the engine,
/// converts results. It holds no state of its own beyond a cache of the encoded inventory.
public struct NodeAgentService: Fpga_Agent_V1_NodeAgent.SimpleServiceProtocol {
  let engine: NodeEngine
  let hostname: String
  let agentVersion: String
  let logger: Logger
  let defaultDetachTimeout: Duration
  /// Reads the last entries of the audit trail and names its file; nil: no trail kept.
  public typealias AuditTrail = @Sendable (Int) -> (entries: [Fpga_Agent_V1_AuditEntry], path: String)
  let auditTrail: AuditTrail?
  private let inventoryCache = InventoryCache()

  public init(
    engine: NodeEngine, hostname: String, agentVersion: String, logger: Logger,
    defaultDetachTimeout: Duration = .seconds(10), auditTrail: AuditTrail? = nil
  ) {
    self.defaultDetachTimeout = defaultDetachTimeout
    self.auditTrail = auditTrail
    self.engine = engine
    self.hostname = hostname
    self.agentVersion = agentVersion
    self.logger = logger
  }

  // MARK: Status and inventory

  public func getNodeStatus(
    request: Fpga_Agent_V1_GetNodeStatusRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_NodeStatus {
    Fpga_Agent_V1_NodeStatus(await engine.status(), hostname: hostname, agentVersion: agentVersion)
  }

  public func getInventory(
    request: Fpga_Agent_V1_GetInventoryRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_Inventory {
    let cardID = try Validate.cardID(request.cardID)
    guard cardID == nil else { return Fpga_Agent_V1_Inventory(try await engine.snapshot(cardID: cardID)) }
    if let cached = inventoryCache.get(revision: await engine.revision) { return cached }
    if let from = inventoryCache.revision, let events = await engine.deltas(after: from),
      var updated = inventoryCache.apply(events, from: from)
    {
      // Deltas carry devices and allocations; why the agent ended some comes with them here.
      updated.endedAllocations = await engine.endedAllocations.map(Fpga_Agent_V1_EndedAllocation.init)
      inventoryCache.set(updated)
      return updated
    }
    let inventory = Fpga_Agent_V1_Inventory(try await engine.snapshot())
    inventoryCache.set(inventory)
    return inventory
  }

  public func watchInventory(
    request: Fpga_Agent_V1_WatchInventoryRequest,
    response: RPCWriter<Fpga_Agent_V1_InventoryEvent>,
    context: ServerContext
  ) async throws {
    var from = request.fromRevision
    let current = Mutex<InventorySubscription?>(nil)
    try await withRPCCancellationHandler {
      // A watcher that falls behind is cut off by the engine; it resumes here from the last
      // revision it was sent, as a reconnecting client would.
      while !context.cancellation.isCancelled {
        let subscription = await engine.watch(from: from)
        current.withLock { $0 = subscription }
        if context.cancellation.isCancelled { subscription.cancel() }
        for await event in subscription.events {
          try await response.write(Fpga_Agent_V1_InventoryEvent(event))
          from = event.revision
        }
        guard subscription.wasLagged else { return }
        logger.debug("inventory watcher fell behind; resuming", metadata: ["fpga.revision": "\(from)"])
      }
    } onCancelRPC: {
      current.withLock { $0?.cancel() }
    }
  }

  public func rescan(
    request: Fpga_Agent_V1_RescanRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_RescanResponse {
    let before = await engine.revision
    let after = try await engine.rescan()
    if after != before { logger.info("rescan found changes", metadata: ["fpga.revision": "\(after)"]) }
    return .with {
      $0.revision = after
      $0.changed = after != before
    }
  }

  // MARK: Allocation

  public func allocateVF(
    request: Fpga_Agent_V1_AllocateVFRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_AllocateVFResponse {
    let constraints = request.constraints
    let command = AllocateRequest(
      meta: try RequestMeta(request.meta),
      owner: try Validate.owner(request.owner),
      vm: try Validate.vmName(request.vm),
      constraints: AllocationConstraints(
        cardID: try Validate.cardID(constraints.cardID, field: "constraints.card_id"),
        pf: constraints.pfBdf.isEmpty
          ? nil : try PCIAddress.parse(constraints.pfBdf, field: "constraints.pf_bdf"),
        numaNode: constraints.hasNumaNode ? try numaNode(constraints.numaNode) : nil))
    let result = try await engine.allocate(command)
    if !result.replayed {
      logger.info(
        "allocated VF",
        metadata: [
          "fpga.alloc": "\(result.allocation.id)", "fpga.vf": "\(result.allocation.vf)",
          "fpga.owner": "\(result.allocation.owner)",
        ])
    }
    return .with {
      $0.allocation = .init(result.allocation)
      $0.vf = .init(result.vf)
      $0.replayed = result.replayed
      $0.revision = result.revision
    }
  }

  public func releaseVF(
    request: Fpga_Agent_V1_ReleaseVFRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_ReleaseVFResponse {
    let command = ReleaseRequest(
      meta: try RequestMeta(request.meta),
      allocationID: try Validate.id(request.allocationID, field: "allocation_id", prefix: "alloc-"))
    let result = try await engine.release(command)
    if !result.replayed {
      logger.info(
        "released VF",
        metadata: ["fpga.alloc": "\(result.allocation.id)", "fpga.vf": "\(result.allocation.vf)"])
    }
    return .with {
      $0.allocation = .init(result.allocation)
      $0.replayed = result.replayed
      $0.revision = result.revision
    }
  }

  // MARK: Attachment (QEMU)

  public func attachVF(
    request: Fpga_Agent_V1_AttachVFRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_AttachVFResponse {
    guard let vm = try Validate.vmName(request.vm) else {
      throw AgentError(.invalidArgument, "vm is required: the VM to plug the VF into (`fpgactl vms` lists them)")
    }
    let command = AttachRequest(
      meta: try RequestMeta(request.meta),
      allocationID: try Validate.id(request.allocationID, field: "allocation_id", prefix: "alloc-"), vm: vm)
    let result = try await engine.attach(command)
    if !result.replayed {
      logger.info(
        "attached VF",
        metadata: [
          "fpga.alloc": "\(result.allocation.id)", "fpga.vf": "\(result.allocation.vf)", "fpga.vm": "\(vm)",
          "fpga.port": "\(result.rootPort)",
        ])
    }
    return .with {
      $0.allocation = .init(result.allocation)
      $0.deviceID = result.deviceID
      $0.rootPort = result.rootPort
      $0.replayed = result.replayed
    }
  }

  public func detachVF(
    request: Fpga_Agent_V1_DetachVFRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_DetachVFResponse {
    var timeout = defaultDetachTimeout
    if request.hasTimeout {
      timeout = try Validate.duration(
        seconds: request.timeout.seconds, nanos: request.timeout.nanos, field: "timeout", in: Bounds.detachTimeout,
        rangeText: Bounds.detachTimeoutText)
    }
    let command = DetachRequest(
      meta: try RequestMeta(request.meta),
      allocationID: try Validate.id(request.allocationID, field: "allocation_id", prefix: "alloc-"), timeout: timeout)
    let result = try await engine.detach(command)
    if !result.replayed {
      logger.info(
        "detached VF", metadata: ["fpga.alloc": "\(result.allocation.id)", "fpga.vf": "\(result.allocation.vf)"])
    }
    return .with {
      $0.allocation = .init(result.allocation)
      $0.replayed = result.replayed
    }
  }

  // MARK: Reconfiguration and operations

  public func reconfigure(
    request: Fpga_Agent_V1_ReconfigureRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_Operation {
    let meta = try RequestMeta(request.meta)
    let pf = try PCIAddress.parse(request.pfBdf, field: "pf_bdf")
    let strategy: ReconfigureStrategy
    switch request.strategy {
    case .unspecified: strategy = .auto
    case .pause: strategy = .pause
    case .detachReattach: strategy = .detachReattach
    case .refuseIfDisruptive: strategy = .refuseIfDisruptive
    case .UNRECOGNIZED(let value):
      throw AgentError(.invalidArgument, "strategy \(value) is not a known ReconfigureStrategy")
    }
    _ = try Validate.number(
      request.vfCount, field: "vf_count", in: Bounds.vfCount, note: "no PF has more VFs; its total_vfs is the limit")
    let record = try await engine.reconfigure(
      ReconfigureRequest(meta: meta, pf: pf, count: Int(request.vfCount), strategy: strategy, dryRun: request.dryRun))
    logger.info(
      request.dryRun ? "planned a reconfiguration" : "reconfiguration started",
      metadata: [
        "fpga.pf": "\(pf)", "fpga.vfs": "\(request.vfCount)", "fpga.strategy": "\(strategy.rawValue)",
        "fpga.op": "\(record.id)",
      ])
    return .init(record)
  }

  public func getOperation(
    request: Fpga_Agent_V1_GetOperationRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_Operation {
    let id = try Validate.id(request.id, field: "id", prefix: "op-")
    return .init(try await engine.operation(id))
  }

  public func watchOperation(
    request: Fpga_Agent_V1_WatchOperationRequest,
    response: RPCWriter<Fpga_Agent_V1_Operation>,
    context: ServerContext
  ) async throws {
    let id = try Validate.id(request.id, field: "id", prefix: "op-")
    let updates = try await engine.watchOperation(id)
    try await withRPCCancellationHandler {
      for await record in updates {
        try await response.write(.init(record))
      }
    } onCancelRPC: {
      // The stream's buffer is small and the operation ends; nothing else holds the handler.
    }
  }

  // MARK: Draining

  public func drainDevice(
    request: Fpga_Agent_V1_DrainDeviceRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_Operation {
    let meta = try RequestMeta(request.meta)
    let target = try NodeEngine.DrainTarget.parse(request.device, field: "device")
    let record = try await engine.drain(target, releaseUnattached: request.releaseUnattached, meta: meta)
    logger.info("drained", metadata: ["fpga.device": "\(request.device)", "fpga.op": "\(record.id)"])
    return .init(record)
  }

  public func undrainDevice(
    request: Fpga_Agent_V1_UndrainDeviceRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_UndrainDeviceResponse {
    let meta = try RequestMeta(request.meta)
    let target = try NodeEngine.DrainTarget.parse(request.device, field: "device")
    let revision = try await engine.undrain(target, meta: meta)
    return .with { $0.revision = revision }
  }

  // MARK: Contexts and sharing

  public func registerContext(
    request: Fpga_Agent_V1_RegisterContextRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_RegisterContextResponse {
    let given = request.context
    _ = try Validate.number(given.weight, field: "context.weight", in: 0...Bounds.weight.upperBound, note: "0 means 1")
    _ = try Validate.number(
      given.savedStateBytes, field: "context.saved_state_bytes", in: Bounds.savedStateBytes,
      note: "256 MiB: what one context switch may move")
    let (record, replayed) = try await engine.registerContext(
      .init(
        meta: try RequestMeta(request.meta), acceleratorID: given.acceleratorID, guest: given.guest,
        function: given.function, parameters: given.parameters, savedStateBytes: given.savedStateBytes,
        weight: given.weight))
    if !replayed {
      logger.info(
        "context registered",
        metadata: [
          "fpga.context": "\(record.id)", "fpga.accelerator": "\(record.acceleratorID)",
          "fpga.guest": "\(record.guest)",
        ])
    }
    let active =
      await engine.listContexts(acceleratorID: record.acceleratorID, guest: record.guest).first?.active ?? false
    return .with {
      $0.context = .init(record, active: active)
      $0.replayed = replayed
    }
  }

  public func listContexts(
    request: Fpga_Agent_V1_ListContextsRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_ListContextsResponse {
    let guest = try Validate.vmName(request.guest, field: "guest")
    let accelerator = request.acceleratorID.isEmpty ? nil : request.acceleratorID
    if let accelerator { try await engine.requireAccelerator(accelerator) }
    let found = await engine.listContexts(acceleratorID: accelerator, guest: guest)
    return .with { $0.contexts = found.map { Fpga_Agent_V1_Context($0.0, active: $0.active) } }
  }

  public func deleteContext(
    request: Fpga_Agent_V1_DeleteContextRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_DeleteContextResponse {
    let id = try Validate.id(request.contextID, field: "context_id", prefix: "ctx-")
    try await engine.deleteContext(id, meta: try RequestMeta(request.meta))
    logger.info("context deleted", metadata: ["fpga.context": "\(id)"])
    return .init()
  }

  public func switchContext(
    request: Fpga_Agent_V1_SwitchContextRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_SwitchContextResponse {
    let id = try Validate.id(request.contextID, field: "context_id", prefix: "ctx-")
    let now: Bool
    switch request.timing {
    case .unspecified, .nextSlice: now = false
    case .now: now = true
    case .UNRECOGNIZED(let value): throw AgentError(.invalidArgument, "timing \(value) is not a known SwitchTiming")
    }
    let time = try await engine.switchContext(id, now: now, meta: try RequestMeta(request.meta))
    return .with {
      $0.switched = time != nil
      $0.switchTime = .init(time ?? .zero)
    }
  }

  public func setSharingPolicy(
    request: Fpga_Agent_V1_SetSharingPolicyRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_SetSharingPolicyResponse {
    let given = request.policy
    // Every number is checked here, before the engine computes anything from it (its
    // idempotency fingerprint included).
    guard given.hasTimeSlice else {
      throw AgentError(
        .invalidArgument, "policy.time_slice is required: \(Bounds.timeSliceText), e.g. {nanos: 10000000} for 10 ms")
    }
    let slice = try Validate.duration(
      seconds: given.timeSlice.seconds, nanos: given.timeSlice.nanos, field: "policy.time_slice",
      in: Bounds.timeSlice, rangeText: Bounds.timeSliceText)
    let limit = try Validate.number(
      given.overcommitLimit, field: "policy.overcommit_limit", in: Bounds.overcommitLimit, note: "guests")
    guard given.weights.count <= Bounds.weightEntries else {
      throw AgentError(
        .invalidArgument, "policy.weights has \(given.weights.count) entries: at most \(Bounds.weightEntries)")
    }
    for (guest, weight) in given.weights.sorted(by: { $0.key < $1.key }) {
      guard try Validate.vmName(guest, field: "policy.weights key") != nil else {
        throw AgentError(.invalidArgument, "policy.weights has an empty guest name")
      }
      _ = try Validate.number(weight, field: "policy.weights[\(guest)]", in: Bounds.weight)
    }
    let policy = TimeSharingScheduler.Policy(slice: slice, weights: given.weights, overcommitLimit: Int(limit))
    let applied = try await engine.setSharingPolicy(
      acceleratorID: given.acceleratorID, policy: policy, meta: try RequestMeta(request.meta))
    logger.info("sharing policy set", metadata: ["fpga.accelerator": "\(given.acceleratorID)"])
    return .with { $0.policy = .init(applied, acceleratorID: given.acceleratorID) }
  }

  public func moveContext(
    request: Fpga_Agent_V1_MoveContextRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_MoveContextResponse {
    let id = try Validate.id(request.contextID, field: "context_id", prefix: "ctx-")
    let (record, carried) = try await engine.moveContext(
      id, to: request.acceleratorID, meta: try RequestMeta(request.meta))
    logger.info("context moved", metadata: ["fpga.context": "\(id)", "fpga.accelerator": "\(record.acceleratorID)"])
    return .with {
      $0.context = .init(record, active: false)
      $0.carried = .init(carried)
    }
  }

  // MARK: Audit

  public func getAuditTrail(
    request: Fpga_Agent_V1_GetAuditTrailRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_GetAuditTrailResponse {
    _ = try Validate.number(request.limit, field: "limit", in: Bounds.auditLimit, note: "0 means 100")
    guard let auditTrail else {
      throw AgentError(.failedPrecondition, "this agent keeps no audit trail")
    }
    let (entries, path) = auditTrail(request.limit == 0 ? 100 : Int(request.limit))
    return .with {
      $0.entries = entries
      $0.path = path
    }
  }

  // MARK: Device health

  public func clearDeviceHealth(
    request: Fpga_Agent_V1_ClearDeviceHealthRequest, context: ServerContext
  ) async throws -> Fpga_Agent_V1_ClearDeviceHealthResponse {
    let meta = try RequestMeta(request.meta)
    let device = try PCIAddress.parse(request.device, field: "device")
    let reason = try Validate.healthClearReason(request.reason)
    let (health, revision, replayed) = try await engine.clearHealth(device, reason: reason, meta: meta)
    if !replayed {
      logger.notice(
        "device health cleared", metadata: ["fpga.device": "\(device)", "fpga.reason": "\(reason)"])
    }
    return .with {
      $0.health = .init(health)
      $0.revision = revision
      $0.replayed = replayed
    }
  }

  private func numaNode(_ value: Int32) throws(AgentError) -> Int {
    Int(try Validate.number(value, field: "constraints.numa_node", in: Bounds.numaNode, note: "NUMA nodes"))
  }
}

/// Capabilities that belong to parts of the agent not built yet: refused with UNIMPLEMENTED and
/// a message that says what is missing.
extension RequestMeta {
  init(_ meta: Fpga_Agent_V1_RequestMeta) throws(AgentError) {
    self.init(
      idempotencyKey: try Validate.idempotencyKey(meta.idempotencyKey),
      orchestratorEpoch: meta.orchestratorEpoch)
  }
}

/// The full inventory in wire form, kept current by applying the engine's deltas to it, so a
/// GetInventory after a change converts only what changed instead of the whole node.
final class InventoryCache: Sendable {
  private struct State {
    var inventory: Fpga_Agent_V1_Inventory
    /// VF BDF → (card, PF, VF) positions in `inventory`.
    var vfPositions: [String: (Int, Int, Int)]
  }

  private let state = Mutex<State?>(nil)

  /// The inventory at `revision` when the cache has it.
  func get(revision: UInt64) -> Fpga_Agent_V1_Inventory? {
    state.withLock { $0?.inventory.revision == revision ? $0?.inventory : nil }
  }

  var revision: UInt64? { state.withLock { $0?.inventory.revision } }

  /// Replaces the cache with a full inventory (unless it already holds a newer one).
  func set(_ inventory: Fpga_Agent_V1_Inventory) {
    state.withLock { current in
      guard (current?.inventory.revision ?? 0) <= inventory.revision else { return }
      var positions: [String: (Int, Int, Int)] = [:]
      for (c, card) in inventory.cards.enumerated() {
        for (p, pf) in card.pfs.enumerated() {
          for (v, vf) in pf.vfs.enumerated() { positions[vf.bdf] = (c, p, v) }
        }
      }
      current = State(inventory: inventory, vfPositions: positions)
    }
  }

  /// Applies `events` (deltas following the cached revision); returns the result, or nil when a
  /// change reshapes the tree (cards, PFs, VFs coming or going) and a full conversion is needed.
  func apply(_ events: [InventoryEvent], from revision: UInt64) -> Fpga_Agent_V1_Inventory? {
    state.withLock { current -> Fpga_Agent_V1_Inventory? in
      guard var cached = current, cached.inventory.revision == revision else { return nil }
      for event in events {
        guard case .delta(let eventRevision, let changes) = event else { return nil }
        for change in changes {
          switch change {
          case .vfUpdated(let view):
            guard let (c, p, v) = cached.vfPositions[view.function.address.description] else { return nil }
            cached.inventory.cards[c].pfs[p].vfs[v] = .init(view)
          case .allocationUpdated(let allocation):
            let message = Fpga_Agent_V1_Allocation(allocation)
            if let index = cached.inventory.allocations.firstIndex(where: { $0.id == allocation.id }) {
              cached.inventory.allocations[index] = message
            } else {
              let index = cached.inventory.allocations.firstIndex { $0.id > allocation.id }
              cached.inventory.allocations.insert(message, at: index ?? cached.inventory.allocations.endIndex)
            }
          case .allocationRemoved(let id):
            cached.inventory.allocations.removeAll { $0.id == id }
          case .pfUpdated(let pf, let draining):
            let bdf = pf.address.description
            guard let c = cached.inventory.cards.firstIndex(where: { $0.id == pf.cardID }),
              let p = cached.inventory.cards[c].pfs.firstIndex(where: { $0.bdf == bdf }),
              Int(cached.inventory.cards[c].pfs[p].numVfs) == pf.numVFs
            else { return nil }
            let vfs = cached.inventory.cards[c].pfs[p].vfs
            cached.inventory.cards[c].pfs[p] = .init(pf, draining: draining)
            cached.inventory.cards[c].pfs[p].vfs = vfs
          case .cardUpdated(let card):
            guard let c = cached.inventory.cards.firstIndex(where: { $0.id == card.id }) else { return nil }
            let pfs = cached.inventory.cards[c].pfs
            cached.inventory.cards[c] = .init(card)
            cached.inventory.cards[c].pfs = pfs
          case .vmUpdated(let vm):
            let message = Fpga_Agent_V1_VirtualMachine(vm)
            if let index = cached.inventory.vms.firstIndex(where: { $0.name == vm.name }) {
              cached.inventory.vms[index] = message
            } else {
              let index = cached.inventory.vms.firstIndex { $0.name > vm.name }
              cached.inventory.vms.insert(message, at: index ?? cached.inventory.vms.endIndex)
            }
          case .vmRemoved(let name):
            cached.inventory.vms.removeAll { $0.name == name }
          case .acceleratorUpdated(let accelerator):
            let message = Fpga_Agent_V1_Accelerator(accelerator)
            if let index = cached.inventory.accelerators.firstIndex(where: { $0.id == accelerator.id }) {
              cached.inventory.accelerators[index] = message
            } else {
              let index = cached.inventory.accelerators.firstIndex { $0.id > accelerator.id }
              cached.inventory.accelerators.insert(message, at: index ?? cached.inventory.accelerators.endIndex)
            }
          case .acceleratorRemoved(let id):
            cached.inventory.accelerators.removeAll { $0.id == id }
          case .vfRemoved, .pfRemoved, .cardRemoved:
            return nil
          }
        }
        cached.inventory.revision = eventRevision
      }
      current = cached
      return cached.inventory
    }
  }
}
