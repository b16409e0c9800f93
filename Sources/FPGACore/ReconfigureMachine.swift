/// A reconfiguration as a value: the record clients see and the journal a restart needs, with
/// one transition table for the live run and for recovery. Events go in (`start`, `succeeded`,
/// `failed`, `waiting`); the next step to carry out comes out. It performs nothing itself: the
/// engine journals the machine before and after each step and carries the step out.
public struct ReconfigureMachine: Hashable, Sendable {
  public private(set) var record: OperationRecord
  public private(set) var journal: ReconfigureJournal

  /// What to do next.
  public enum Next: Hashable, Sendable {
    /// Carry out `action`, step `index` (already marked running: journal it first).
    case run(index: Int, action: ReconfigureAction)
    /// Every step has ended.
    case finished
  }

  /// A new reconfiguration from its plan; the plan step is done.
  public init(record: OperationRecord, journal: ReconfigureJournal) {
    self.record = record
    self.journal = journal
  }

  /// An operation a crash left unfinished, or nil when it needs nothing (ended, or no journal).
  /// Before any VF count write began the change is rolled back (paused devices resumed,
  /// detached ones re-attached); after, it is rolled forward to the planned layout. A step that
  /// was running is run again: every step is idempotent.
  public init?(recovering stored: StoredOperation) {
    guard let journal = stored.journal, !stored.record.state.isTerminal else { return nil }
    self.record = stored.record
    self.journal = journal
    if !journal.rollingBack && !journal.countWriteBegan(record) && journal.forwardOnly != true {
      self.journal.rollingBack = true
      record.error = "the agent stopped during this operation; it was rolled back at restart"
      append(self.journal.rollbackBeforeCountWrite(record))
    } else if !journal.rollingBack {
      record.error = nil
    }
    for index in record.steps.indices where record.steps[index].state == .running {
      record.steps[index].state = .pending
    }
  }

  public var id: String { record.id }
  public var isFinished: Bool { record.state.isTerminal }

  /// What the store keeps: the journal only while the operation has not ended.
  public var stored: StoredOperation { StoredOperation(record: record, journal: isFinished ? nil : journal) }

  private var runningIndex: Int? { record.steps.firstIndex { $0.state == .running } }

  /// Marks the next pending step running and returns it.
  public mutating func start(at now: WallTime) -> Next {
    guard !isFinished, let index = record.steps.firstIndex(where: { $0.state == .pending }) else { return .finished }
    record.steps[index].state = .running
    record.steps[index].startedAt = now
    record.steps[index].error = nil
    return .run(index: index, action: journal.actions[index])
  }

  /// The running step ended well; after the final commit the operation has ended.
  public mutating func succeeded(at now: WallTime) {
    guard let index = runningIndex else { return }
    record.steps[index].state = .succeeded
    record.steps[index].finishedAt = now
    record.steps[index].error = nil
    if journal.actions[index].kind == .commit {
      let replaced = Set(journal.replacedResumes ?? [])
      let failed = record.steps.indices.contains { record.steps[$0].state == .failed && !replaced.contains($0) }
      record.state = journal.rollingBack || failed ? .failed : .succeeded
      record.finishedAt = now
    }
  }

  /// The running step failed with `message`. Before any VF count write the operation turns
  /// into its rollback; a failed count write or verification restores the old count; a failed
  /// undo (`tolerant`) or a failure while rolling back is noted and the steps go on.
  public mutating func failed(_ message: String, at now: WallTime) {
    guard let index = runningIndex else { return }
    let action = journal.actions[index]
    record.steps[index].state = .failed
    record.steps[index].error = message
    record.steps[index].finishedAt = now
    if action.kind == .resume {
      // The VMM could not resume the paused device (its host VF missing, different, or not
      // bound to vfio-pci): that device alone is unplugged and plugged again.
      replug(resumeAt: index, because: message)
    } else if action.tolerant {
      return
    } else if !journal.rollingBack && !journal.countWriteBegan(record, failedAt: index) {
      journal.rollingBack = true
      record.error = "step \(index + 1) failed: \(message); rolled back"
      append(journal.rollbackBeforeCountWrite(record))
    } else if !journal.rollingBack && action.kind.isCountChange {
      journal.rollingBack = true
      record.error = "step \(index + 1) failed: \(message); restored \(journal.from) VFs"
      append(journal.rollbackAfterCountWrite(record))
    } else if record.error == nil {
      record.error = "step \(index + 1) failed: \(message)"
    }
  }

  /// The running step waits on something outside the agent (a blocked VF count write).
  public mutating func waiting(_ text: String) {
    guard let index = runningIndex else { return }
    record.steps[index].error = "waiting: " + text
  }

  /// The store failed: the operation stops where it is, its journal kept for the next start.
  public mutating func stopped(_ message: String) {
    record.error = "the state store failed (\(message)); the operation stops here and resumes at the next start"
  }

  /// Inserts, right after the refused resume at `index`, the replug that replaces it: detach
  /// the paused device, bind its VF to vfio-pci again, re-attach it.
  private mutating func replug(resumeAt index: Int, because message: String) {
    let resume = journal.actions[index]
    // An undo's resume (tolerant: the pause may not have happened) gets a tolerant replug.
    let replug: [ReconfigureAction] = [
      .init(
        kind: .detach, allocationID: resume.allocationID, vm: resume.vm, vf: resume.vf, tolerant: resume.tolerant,
        fallback: message),
      .init(kind: .bind, vf: resume.vf, tolerant: true, fallback: message),
      .init(
        kind: .reattach, allocationID: resume.allocationID, vm: resume.vm, vf: resume.vf, tolerant: resume.tolerant,
        fallback: message),
    ]
    journal.actions.insert(contentsOf: replug, at: index + 1)
    record.steps.insert(
      contentsOf: replug.map { .init(description: "fall back: " + $0.description(pf: journal.pf), state: .pending) },
      at: index + 1)
    journal.replacedResumes = (journal.replacedResumes ?? []) + [index]
    record.steps[index].error = message + "; the device is unplugged and plugged again instead"
  }

  /// Turns the operation into its rollback: the steps not yet done are skipped; `actions` and a
  /// final commit are appended.
  private mutating func append(_ actions: [ReconfigureAction]) {
    for index in record.steps.indices
    where record.steps[index].state == .pending || record.steps[index].state == .running {
      record.steps[index].state = .planned
      record.steps[index].error = "skipped: rolled back"
    }
    for action in actions + [ReconfigureAction(kind: .commit)] {
      journal.actions.append(action)
      record.steps.append(.init(description: "roll back: " + action.description(pf: journal.pf), state: .pending))
    }
  }
}
