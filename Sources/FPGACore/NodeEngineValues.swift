// The values the engine's public calls take and give back.

/// Idempotency and fencing of a mutating request.
public struct RequestMeta: Hashable, Sendable {
  public var idempotencyKey: String?
  public var orchestratorEpoch: UInt64

  public init(idempotencyKey: String? = nil, orchestratorEpoch: UInt64 = 0) {
    self.idempotencyKey = idempotencyKey
    self.orchestratorEpoch = orchestratorEpoch
  }
}

public struct AllocateRequest: Hashable, Sendable {
  public var meta: RequestMeta
  public var owner: String
  public var vm: String?
  public var constraints: AllocationConstraints

  public init(
    meta: RequestMeta = .init(), owner: String, vm: String? = nil, constraints: AllocationConstraints = .init()
  ) {
    self.meta = meta
    self.owner = owner
    self.vm = vm
    self.constraints = constraints
  }

  var fingerprint: String {
    ([
      owner, vm ?? "", constraints.cardID ?? "", constraints.pf?.description ?? "",
      constraints.numaNode.map(String.init) ?? "",
    ] + (constraints.vf.map { [$0.description] } ?? [])).joined(separator: "\u{0}")
  }
}

public struct AllocationResult: Hashable, Sendable, Codable {
  public var allocation: Allocation
  public var vf: VFView
  public var replayed: Bool
  public var revision: UInt64
}

public struct ReleaseRequest: Hashable, Sendable {
  public var meta: RequestMeta
  public var allocationID: String

  public init(meta: RequestMeta = .init(), allocationID: String) {
    self.meta = meta
    self.allocationID = allocationID
  }
}

public struct ReleaseResult: Hashable, Sendable, Codable {
  public var allocation: Allocation
  public var replayed: Bool
  public var revision: UInt64
}

/// What GetNodeStatus reports.
public struct NodeStatusValue: Hashable, Sendable {
  public var nodeID: String
  public var startedAt: WallTime
  public var now: WallTime
  public var revision: UInt64
  public var counts: InventoryState.Counts
  public var capabilities: PlatformCapabilities
  public var orchestratorEpoch: UInt64
  public var watchers: Int
  public var link: OrchestratorLinkStatus
  /// What reconciliation found and fixed, oldest first.
  public var findings: [String]
  /// The host's boot and the layouts restored at start-up.
  public var layoutRestore: LayoutRestoreReport?

  /// Serving when nothing is wrong, degraded when the platform reports problems but devices
  /// are managed, not serving when no device can be managed.
  public var health: Health {
    if capabilities.problems.isEmpty { return .serving }
    return counts.pfs > 0 ? .degraded : .notServing
  }

  public enum Health: String, Hashable, Sendable { case serving, degraded, notServing = "not-serving" }
}

/// The agent's link to an orchestrator, as status reports it.
public struct OrchestratorLinkStatus: Hashable, Sendable {
  public enum State: String, Hashable, Sendable { case off, connecting, connected, disconnected }
  public var address = ""
  public var state = State.off
  public var error: String?
  public var since: WallTime?
  public var connections: UInt64 = 0
  public var acknowledgedRevision: UInt64 = 0

  public init() {}
}
