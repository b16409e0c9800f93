public import FPGACore
public import SwiftProtobuf

/// Core values to their wire form. One direction only: requests are parsed in the services,
/// where each field is validated.
extension Google_Protobuf_Timestamp {
  public init(_ time: WallTime) {
    self.init(seconds: time.seconds, nanos: time.nanoseconds)
  }
}

extension Google_Protobuf_Duration {
  init(_ duration: Duration) {
    let (seconds, attoseconds) = duration.components
    self.init(seconds: seconds, nanos: Int32(attoseconds / 1_000_000_000))
  }
}

extension Fpga_Agent_V1_VFState {
  init(_ state: VFState) {
    switch state {
    case .free: self = .free
    case .allocated: self = .allocated
    case .attached: self = .attached
    case .detaching: self = .detaching
    case .unhealthy: self = .unhealthy
    }
  }
}

extension Fpga_Agent_V1_Card {
  init(_ card: Card) {
    self.init()
    id = card.id
    model = card.model
    numaNode = Int32(card.numaNode)
    draining = card.draining
  }
}

extension Fpga_Agent_V1_PhysicalFunction {
  init(_ pf: PhysicalFunction, draining: Bool) {
    self.init()
    bdf = pf.address.description
    cardID = pf.cardID
    vendorID = UInt32(pf.vendorID)
    deviceID = UInt32(pf.deviceID)
    vfDeviceID = UInt32(pf.vfDeviceID)
    totalVfs = UInt32(pf.totalVFs)
    numVfs = UInt32(pf.numVFs)
    vfOffset = UInt32(pf.vfOffset)
    vfStride = UInt32(pf.vfStride)
    driversAutoprobe = pf.driversAutoprobe
    driver = pf.driver ?? ""
    numaNode = Int32(pf.numaNode)
    qmax = UInt32(pf.qmax)
    self.draining = draining
    health = .init(pf.health)
    if let readings = pf.readings { self.readings = .init(readings) }
  }
}

extension Fpga_Agent_V1_DeviceHealth {
  init(_ health: DeviceHealth) {
    self.init()
    state = .init(health.state)
    since = .init(health.since)
    reasons = health.reasons.map { reason in
      .with {
        $0.kind = reason.kind
        $0.state = .init(reason.state)
        $0.detail = reason.detail
        $0.since = .init(reason.since)
      }
    }
  }
}

extension Fpga_Agent_V1_HealthState {
  init(_ state: DeviceHealth.State) {
    switch state {
    case .healthy: self = .healthy
    case .degraded: self = .degraded
    case .unhealthy: self = .unhealthy
    case .gone: self = .gone
    }
  }

  /// "healthy", "degraded", ... as fpgactl prints it.
  public var word: String {
    switch self {
    case .healthy, .unspecified: "healthy"
    case .degraded: "degraded"
    case .unhealthy: "unhealthy"
    case .gone: "gone"
    case .UNRECOGNIZED: "unknown"
    }
  }
}

extension Fpga_Agent_V1_DeviceReadings {
  init(_ readings: HealthReadings) {
    self.init()
    if let value = readings.correctableErrors { aerCorrectable = value }
    if let value = readings.nonfatalErrors { aerNonfatal = value }
    if let value = readings.fatalErrors { aerFatal = value }
    linkSpeed = readings.linkSpeed ?? ""
    maxLinkSpeed = readings.maxLinkSpeed ?? ""
    linkWidth = UInt32(readings.linkWidth ?? 0)
    maxLinkWidth = UInt32(readings.maxLinkWidth ?? 0)
  }
}

extension Fpga_Agent_V1_VirtualFunction {
  init(_ view: VFView) {
    self.init()
    let vf = view.function
    bdf = vf.address.description
    pfBdf = vf.pfAddress.description
    index = UInt32(vf.index)
    vendorID = UInt32(vf.vendorID)
    deviceID = UInt32(vf.deviceID)
    iommuGroup = Int32(vf.iommuGroup)
    numaNode = Int32(vf.numaNode)
    driver = vf.driver ?? ""
    driverOverride = vf.driverOverride ?? ""
    state = .init(view.state)
    allocationID = view.allocationID ?? ""
    vm = view.vm ?? ""
    vfioDevice = vf.vfioDevice ?? ""
    health = .init(vf.health)
    if let readings = vf.readings { self.readings = .init(readings) }
  }
}

extension Fpga_Agent_V1_Allocation {
  init(_ allocation: Allocation) {
    self.init()
    id = allocation.id
    vfBdf = allocation.vf.description
    pfBdf = allocation.pf.description
    cardID = allocation.cardID
    owner = allocation.owner
    vm = allocation.vm ?? ""
    idempotencyKey = allocation.idempotencyKey ?? ""
    createdAt = .init(allocation.createdAt)
    numaNode = Int32(allocation.numaNode)
    iommuGroup = Int32(allocation.iommuGroup)
    attached = allocation.attached
    deviceID = allocation.deviceID ?? ""
    rootPort = allocation.rootPort ?? ""
    detaching = allocation.detaching
    if let relayout = allocation.lastRelayout { lastRelayout = .init(relayout) }
  }
}

extension Fpga_Agent_V1_Relayout {
  init(_ relayout: Relayout) {
    self.init()
    how = relayout.how.rawValue
    operationID = relayout.operationID
    at = .init(relayout.at)
    detail = relayout.detail ?? ""
  }
}

extension Fpga_Agent_V1_VirtualMachine {
  init(_ vm: VirtualMachineInfo) {
    self.init()
    name = vm.name
    state = vm.state.rawValue
    qemuStatus = vm.qemuStatus
    qmpSocket = vm.qmpSocket
    rootPorts = UInt32(vm.rootPorts)
    freeRootPorts = UInt32(vm.freeRootPorts)
    vfioPause = vm.vfioPause
    error = vm.error ?? ""
  }
}

extension Fpga_Agent_V1_Inventory {
  init(_ snapshot: InventorySnapshot) {
    self.init()
    revision = snapshot.revision
    nodeID = snapshot.nodeID
    cards = snapshot.cards.map { cardView in
      var card = Fpga_Agent_V1_Card(cardView.card)
      card.pfs = cardView.pfs.map { pfView in
        var pf = Fpga_Agent_V1_PhysicalFunction(pfView.function, draining: pfView.draining)
        pf.vfs = pfView.vfs.map(Fpga_Agent_V1_VirtualFunction.init)
        return pf
      }
      return card
    }
    allocations = snapshot.allocations.map(Fpga_Agent_V1_Allocation.init)
    vms = snapshot.vms.map(Fpga_Agent_V1_VirtualMachine.init)
    accelerators = snapshot.accelerators.map(Fpga_Agent_V1_Accelerator.init)
    endedAllocations = snapshot.endedAllocations.map(Fpga_Agent_V1_EndedAllocation.init)
  }
}

extension Fpga_Agent_V1_EndedAllocation {
  init(_ ended: EndedAllocation) {
    self.init()
    allocation = .init(ended.allocation)
    reason = ended.reason
    endedAt = .init(ended.at)
  }
}

extension Fpga_Agent_V1_SharingPolicy {
  init(_ policy: TimeSharingScheduler.Policy, acceleratorID: String) {
    self.init()
    self.acceleratorID = acceleratorID
    timeSlice = .init(policy.slice)
    weights = policy.weights
    overcommitLimit = UInt32(policy.overcommitLimit)
  }
}

extension Fpga_Agent_V1_Accelerator {
  public init(_ view: AcceleratorView) {
    self.init()
    id = view.id
    cardID = view.cardID
    control = view.control
    lastSwitchTime = .init(view.lastSwitchTime)
    policy = .init(view.policy, acceleratorID: view.id)
    guests = view.guests.map { share in
      .with {
        $0.guest = share.guest
        $0.weight = share.weight
        $0.share = share.share
        $0.pending = .init(share.pending)
      }
    }
    metrics = .with {
      $0.utilization = view.metrics.utilization
      $0.switchesPerSecond = view.metrics.switchesPerSecond
      $0.meanSwitchTime = .init(view.metrics.meanSwitchTime)
      $0.waitP50 = .init(view.metrics.waitP50)
      $0.waitP99 = .init(view.metrics.waitP99)
      $0.overcommitRatio = view.metrics.overcommitRatio
      $0.switchOverhead = view.metrics.switchOverhead
      $0.window = .init(view.metrics.window)
    }
    loadedGuest = view.loadedGuest ?? ""
  }
}

extension Fpga_Agent_V1_Context {
  init(_ record: ContextRecord, active: Bool) {
    self.init()
    id = record.id
    acceleratorID = record.acceleratorID
    guest = record.guest
    function = record.function
    parameters = record.parameters
    savedStateBytes = record.savedStateBytes
    weight = record.weight
    self.active = active
  }
}

extension Fpga_Agent_V1_InventoryChange {
  init(_ change: InventoryChange) {
    self.init()
    switch change {
    case .cardUpdated(let card): cardUpdated = .init(card)
    case .cardRemoved(let id): cardRemoved = id
    case .pfUpdated(let pf, let draining): pfUpdated = .init(pf, draining: draining)
    case .pfRemoved(let address): pfRemoved = address.description
    case .vfUpdated(let view): vfUpdated = .init(view)
    case .vfRemoved(let address): vfRemoved = address.description
    case .allocationUpdated(let allocation): allocationUpdated = .init(allocation)
    case .allocationRemoved(let id): allocationRemoved = id
    case .vmUpdated(let vm): vmUpdated = .init(vm)
    case .vmRemoved(let name): vmRemoved = name
    case .acceleratorUpdated(let accelerator): acceleratorUpdated = .init(accelerator)
    case .acceleratorRemoved(let id): acceleratorRemoved = id
    }
  }
}

extension Fpga_Agent_V1_InventoryEvent {
  public init(_ event: InventoryEvent) {
    self.init()
    revision = event.revision
    switch event {
    case .snapshot(let snapshot, let resync):
      self.snapshot = .init(snapshot)
      self.resync = resync
    case .delta(_, let changes):
      delta = .with { $0.changes = changes.map(Fpga_Agent_V1_InventoryChange.init) }
    }
  }
}

extension Fpga_Agent_V1_NodeStatus {
  public init(_ status: NodeStatusValue, hostname: String, agentVersion: String) {
    self.init()
    nodeID = status.nodeID
    self.hostname = hostname
    self.agentVersion = agentVersion
    switch status.health {
    case .serving: health = .serving
    case .degraded: health = .degraded
    case .notServing: health = .notServing
    }
    problems = status.capabilities.problems
    capabilities = .with {
      $0.platform = status.capabilities.platform
      $0.iommu = status.capabilities.iommu
      $0.vfioPci = status.capabilities.vfioPCI
      $0.qdmaDriver = status.capabilities.qdmaDriver ?? ""
      $0.vfioPause = status.capabilities.vfioPause
    }
    revision = status.revision
    startedAt = .init(status.startedAt)
    uptime = .init(status.now.since(status.startedAt))
    cards = UInt32(status.counts.cards)
    pfs = UInt32(status.counts.pfs)
    vfsTotal = UInt32(status.counts.vfsTotal)
    vfsEnabled = UInt32(status.counts.vfsEnabled)
    vfsAllocated = UInt32(status.counts.vfsAllocated)
    vfsFree = UInt32(status.counts.vfsFree)
    orchestratorEpoch = status.orchestratorEpoch
    findings = status.findings
    orchestrator = .with {
      $0.address = status.link.address
      $0.state = status.link.state.rawValue
      $0.error = status.link.error ?? ""
      if let since = status.link.since { $0.since = .init(since) }
      $0.connections = status.link.connections
      $0.acknowledgedRevision = status.link.acknowledgedRevision
    }
    if let report = status.layoutRestore { layoutRestore = .init(report) }
  }
}

extension Fpga_Agent_V1_LayoutRestore {
  init(_ report: LayoutRestoreReport) {
    self.init()
    bootID = report.bootID ?? ""
    rebooted = report.rebooted
    enabled = report.enabled
    pfs = report.pfs.map { entry in
      .with {
        $0.pfBdf = entry.pf.description
        $0.foundVfs = UInt32(clamping: entry.found)
        $0.recordedVfs = UInt32(clamping: entry.recorded)
        $0.operationID = entry.operationID ?? ""
        $0.result = entry.result.rawValue
        $0.error = entry.error ?? ""
        $0.allocationsKept = UInt32(clamping: entry.allocationsKept)
        $0.vfsBound = UInt32(clamping: entry.vfsBound)
      }
    }
  }
}

extension Fpga_Agent_V1_OperationState {
  init(_ state: OperationRecord.State) {
    switch state {
    case .pending: self = .pending
    case .running: self = .running
    case .succeeded: self = .succeeded
    case .failed: self = .failed
    case .planned: self = .planned
    }
  }
}

extension Fpga_Agent_V1_Operation {
  public init(_ record: OperationRecord) {
    self.init()
    id = record.id
    kind = record.kind
    target = record.target
    startedBy = record.startedBy ?? ""
    state = .init(record.state)
    steps = record.steps.map { step in
      .with {
        $0.description_p = step.description
        $0.state = .init(step.state)
        $0.error = step.error ?? ""
        if let started = step.startedAt { $0.startedAt = .init(started) }
        if let finished = step.finishedAt { $0.finishedAt = .init(finished) }
      }
    }
    impacts = record.impacts.map { impact in
      .with {
        $0.allocationID = impact.allocationID
        $0.vfBdf = impact.vf.description
        $0.vm = impact.vm ?? ""
        $0.outcome = impact.outcome
        $0.guestSees = impact.guestSees
      }
    }
    error = record.error ?? ""
    createdAt = .init(record.createdAt)
    if let finished = record.finishedAt { finishedAt = .init(finished) }
  }
}
