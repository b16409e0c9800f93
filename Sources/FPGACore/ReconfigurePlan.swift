// The values of a reconfiguration: its request, its journaled steps, and the planner that makes them.

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
  /// Who asks when not a node API caller (`OperationRecord.startedBy`).
  public var startedBy: String?

  public init(
    meta: RequestMeta = .init(), pf: PCIAddress, count: Int, strategy: ReconfigureStrategy = .auto,
    dryRun: Bool = false,
    startedBy: String? = nil
  ) {
    self.startedBy = startedBy
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
    /// A layout restore sets the PF's QDMA queue count before its VFs (`count` is the qmax).
    case setQmax = "set-qmax"

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
  /// A step of the replug that replaces a refused resume: why the VMM refused it.
  public var fallback: String?

  public init(
    kind: Kind, allocationID: String? = nil, vm: String? = nil, vf: PCIAddress? = nil, count: Int? = nil,
    tolerant: Bool = false, fallback: String? = nil
  ) {
    self.fallback = fallback
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
    if fallback != nil {
      switch kind {
      case .detach:
        return "detach \(allocation)\(on) from VM \(vm ?? "?") (its resume was refused): the guest sees an unplug"
      case .bind: return "bind VF \(vf?.description ?? "?") to vfio-pci again for the replug"
      case .reattach: return "re-attach \(allocation)\(on) to VM \(vm ?? "?") in place of the refused resume"
      default: break
      }
    }
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
    case .setQmax: return "write \(count.map(String.init) ?? "?") to qdma/qmax of \(pf)"
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
  /// A restore of a recorded layout: a restart rolls it forward whatever step it reached (there
  /// is nothing to roll back to but a PF without its VFs).
  public var forwardOnly: Bool?
  /// Resume steps the VMM refused and a replug replaced (indices into `actions`): their failure
  /// does not fail the operation when the replug succeeds.
  public var replacedResumes: [Int]?

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
        undo.append(
          .init(kind: .resume, allocationID: action.allocationID, vm: action.vm, vf: action.vf, tolerant: uncertain))
      case .detach:
        undo.append(.init(kind: .bind, vf: action.vf, tolerant: true))
        undo.append(
          .init(kind: .reattach, allocationID: action.allocationID, vm: action.vm, vf: action.vf, tolerant: uncertain))
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
        .init(
          kind: action.kind == .pause ? .resume : .reattach, allocationID: action.allocationID, vm: action.vm,
          vf: action.vf))
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
        impacts.append(
          .init(
            allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "kept", guestSees: "nothing"))
        continue
      }
      if !kept {
        if allocation.attached {
          before.append(.init(kind: .detach, allocationID: allocation.id, vm: vm, vf: allocation.vf))
          if strategy == .refuseIfDisruptive {
            refusals.append(
              "\(allocation.id) in VM \(vm) is on VF \(allocation.vf), which the new count removes (the guest would see an unplug)"
            )
          }
        }
        releases.append(.init(kind: .release, allocationID: allocation.id, vf: allocation.vf))
        impacts.append(
          .init(
            allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "lost",
            guestSees: allocation.attached ? "unplug" : "nothing"))
        continue
      }
      guard allocation.attached else {
        impacts.append(
          .init(
            allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm, outcome: "kept", guestSees: "nothing"))
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
        .init(
          allocationID: allocation.id, vf: allocation.vf, vm: allocation.vm,
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
