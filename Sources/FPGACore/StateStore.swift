import Synchronization

/// Where the agent keeps what must survive a restart: allocations and attachments, idempotency
/// keys with their results, the orchestrator epoch, drain flags and the operation journal.
/// A request's changes are durable before it is answered; a failed write leaves nothing behind.
public protocol StateStore: Sendable {
  /// Everything kept, read once at start-up.
  func load() throws(AgentError) -> PersistedState
  /// Applies `changes` atomically: all of them or none. Returns once they are durable.
  /// Concurrent commits may share a transaction (group commit); each stays all-or-nothing.
  func commit(_ changes: [StoreChange]) async throws(AgentError)
}

/// What a state store holds.
public struct PersistedState: Hashable, Sendable {
  public var allocations: [Allocation] = []
  /// Oldest first.
  public var idempotency: [IdempotencyRecord] = []
  public var epoch: UInt64 = 0
  /// How many times an agent started on this store.
  public var starts: UInt64 = 0
  /// Drained PFs (BDF) and cards (`card-…`).
  public var drains: Set<String> = []
  /// Oldest first; unfinished ones carry their journal.
  public var operations: [StoredOperation] = []
  /// Registered contexts.
  public var contexts: [ContextRecord] = []
  /// Sharing policies set through the API, by accelerator.
  public var policies: [String: TimeSharingScheduler.Policy] = [:]
  /// Records of the agent's other parts (e.g. the DRA driver's prepared claims), by kind then
  /// key, each an encoded value.
  public var records: [String: [String: String]] = [:]
  /// What the agent learned of each device's health (judgements and their baselines).
  public var health: [PCIAddress: HealthMemory] = [:]
  /// The VF layout of each managed PF as last seen, restored after a host reboot.
  public var layouts: [PCIAddress: PFLayout] = [:]
  /// The kernel's boot id the last run saw (nil: none recorded yet).
  public var bootID: String?

  public init() {}

  /// Applies `changes` as a store does.
  public mutating func apply(_ changes: [StoreChange]) {
    for change in changes {
      switch change {
      case .putAllocation(let allocation):
        if let index = allocations.firstIndex(where: { $0.id == allocation.id }) {
          allocations[index] = allocation
        } else {
          allocations.append(allocation)
        }
      case .deleteAllocation(let id): allocations.removeAll { $0.id == id }
      case .putIdempotency(let record):
        idempotency.removeAll { $0.scope == record.scope && $0.key == record.key }
        idempotency.append(record)
      case .setEpoch(let value): epoch = max(epoch, value)
      case .setStarts(let value): starts = value
      case .putContext(let record):
        contexts.removeAll { $0.id == record.id }
        contexts.append(record)
      case .deleteContext(let id): contexts.removeAll { $0.id == id }
      case .putPolicy(let id, let policy): policies[id] = policy
      case .setDrain(let target, let on):
        if on { drains.insert(target) } else { drains.remove(target) }
      case .putOperation(let operation):
        if let index = operations.firstIndex(where: { $0.record.id == operation.record.id }) {
          operations[index] = operation
        } else {
          operations.append(operation)
        }
      case .putRecord(let kind, let key, let value): records[kind, default: [:]][key] = value
      case .deleteRecord(let kind, let key): records[kind]?[key] = nil
      case .putHealth(let memory): health[memory.address] = memory
      case .deleteHealth(let address): health[address] = nil
      case .putLayout(let layout): layouts[layout.pf] = layout
      case .setBootID(let id): bootID = id
      }
    }
  }
}

/// One change to the store.
public enum StoreChange: Hashable, Sendable {
  case putAllocation(Allocation)
  case deleteAllocation(String)
  case putIdempotency(IdempotencyRecord)
  /// Raises the highest orchestrator epoch seen.
  case setEpoch(UInt64)
  /// Counts agent starts (each start's revisions begin at starts << 32).
  case setStarts(UInt64)
  /// Sets or clears the drain flag of a PF (BDF) or card (`card-…`).
  case setDrain(String, Bool)
  /// Adds or replaces an operation; `journal` is nil once it has ended.
  case putOperation(StoredOperation)
  case putContext(ContextRecord)
  case deleteContext(String)
  /// An accelerator's sharing policy.
  case putPolicy(String, TimeSharingScheduler.Policy)
  /// A record of another part of the agent: kind, key, encoded value.
  case putRecord(String, String, String)
  case deleteRecord(String, String)
  /// A device's health memory; removed when the device is forgotten.
  case putHealth(HealthMemory)
  case deleteHealth(PCIAddress)
  /// A PF's VF layout as last seen.
  case putLayout(PFLayout)
  /// The boot id of the host this run started on.
  case setBootID(String)
}

/// The result an idempotency key replays.
public enum IdempotentOutcome: Hashable, Sendable, Codable {
  case allocated(AllocationResult)
  case released(ReleaseResult)
  case operation(String)
  case attached(AttachResult)
  case detached(Allocation)
  /// UndrainDevice: the revision it published.
  case revision(UInt64)
  /// RegisterContext.
  case context(ContextRecord)
  /// DeleteContext.
  case deleted
  /// SwitchContext: the switch time in nanoseconds, when it was made at once.
  case switched(Int64?)
  /// SetSharingPolicy: the policy applied.
  case policy(TimeSharingScheduler.Policy)
  /// MoveContext: the context on its new accelerator and the work carried along.
  case moved(ContextRecord, carriedNanoseconds: Int64)
}

/// An idempotency key and the result of its request.
public struct IdempotencyRecord: Hashable, Sendable, Codable {
  public var scope: String
  public var key: String
  public var fingerprint: String
  public var outcome: IdempotentOutcome

  public init(scope: String, key: String, fingerprint: String, outcome: IdempotentOutcome) {
    self.scope = scope
    self.key = key
    self.fingerprint = fingerprint
    self.outcome = outcome
  }
}

/// An operation as kept: what clients see, and the journal that lets a restart finish it.
public struct StoredOperation: Hashable, Sendable, Codable {
  public var record: OperationRecord
  /// Present while the operation has not ended.
  public var journal: ReconfigureJournal?

  public init(record: OperationRecord, journal: ReconfigureJournal?) {
    self.record = record
    self.journal = journal
  }
}

/// A store in memory: the engine's default (tests, benchmarks); it can be told to fail its next
/// writes, as a full disk would.
public final class MemoryStateStore: StateStore {
  private let state: PthreadLocked<(persisted: PersistedState, failures: Int, commits: Int)>

  public init(_ persisted: PersistedState = PersistedState()) {
    state = PthreadLocked((persisted, 0, 0))
  }

  public func load() throws(AgentError) -> PersistedState { state.withLock { $0.persisted } }

  public func commit(_ changes: [StoreChange]) async throws(AgentError) {
    let failed = state.withLock { state -> Bool in
      if state.failures > 0 {
        state.failures -= 1
        return true
      }
      state.persisted.apply(changes)
      state.commits += 1
      return false
    }
    if failed {
      throw AgentError(.resourceExhausted, "the state store could not record the change (disk full); nothing changed")
    }
  }

  /// The next `count` commits fail.
  public func failNext(_ count: Int) { state.withLock { $0.failures = count } }

  public var persisted: PersistedState { state.withLock { $0.persisted } }
  public var commits: Int { state.withLock { $0.commits } }
}
