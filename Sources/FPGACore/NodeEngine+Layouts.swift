/// What the agent remembers of the node across host reboots: each managed PF's VF layout as last
/// seen, and the kernel's boot id. After a reboot every PF comes back with no VFs; the agent
/// re-creates the recorded layouts (VF count, QDMA queue count, the allocated VFs bound to
/// vfio-pci again) before it reconciles, one journaled operation (kind `restore`) per PF, so the
/// allocations keep their VFs and the device plugin and DRA see the same devices again.
public struct PFLayout: Hashable, Sendable, Codable {
  public var pf: PCIAddress
  public var numVFs: Int
  /// `qdma/qmax` when the PF had a non-zero one.
  public var qmax: Int?
  /// When it was recorded.
  public var at: WallTime

  public init(pf: PCIAddress, numVFs: Int, qmax: Int?, at: WallTime) {
    self.pf = pf
    self.numVFs = numVFs
    self.qmax = qmax
    self.at = at
  }

  /// Same layout, whenever recorded.
  func sameLayout(as other: PFLayout) -> Bool { numVFs == other.numVFs && qmax == other.qmax }
}

/// The kernel's boot id as read from `/proc/sys/kernel/random/boot_id`.
public enum BootID {
  /// The id when `text` is one (1-64 hex digits and dashes, surrounding white space ignored).
  public static func validated(_ text: String) -> String? {
    let id = text.trimmingWhitespace()
    guard (1...64).contains(id.utf8.count),
      id.utf8.allSatisfy({ $0 == UInt8(ascii: "-") || ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) })
    else { return nil }
    return id
  }
}

extension String {
  fileprivate func trimmingWhitespace() -> String {
    let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" }
    guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else {
      return ""
    }
    return String(self[first...last])
  }
}

/// What the agent found of the host's boot at start-up and what it restored.
public struct LayoutRestoreReport: Hashable, Sendable {
  public enum Result: String, Hashable, Sendable {
    case restored, failed, skipped, running
  }

  public struct PF: Hashable, Sendable {
    public var pf: PCIAddress
    public var found: Int
    public var recorded: Int
    public var operationID: String?
    public var result: Result
    public var error: String?
    public var allocationsKept = 0
    public var vfsBound = 0
  }

  public var bootID: String?
  public var previousBootID: String?
  public var rebooted = false
  public var enabled = true
  public var pfs: [PF] = []
  public var at: WallTime

  /// One line for logs and findings.
  public var summary: String {
    guard rebooted else { return "no host reboot since the last run" }
    let done = pfs.map { entry -> String in
      switch entry.result {
      case .restored:
        return
          "PF \(entry.pf) restored to \(entry.recorded) VFs (found \(entry.found)), \(entry.allocationsKept) allocation\(entry.allocationsKept == 1 ? "" : "s") kept, \(entry.vfsBound) VF\(entry.vfsBound == 1 ? "" : "s") bound to vfio-pci (\(entry.operationID ?? "?"))"
      case .failed:
        return "PF \(entry.pf) could not be restored to \(entry.recorded) VFs: \(entry.error ?? "unknown error")"
      case .skipped:
        return
          "PF \(entry.pf) has \(entry.found) of its \(entry.recorded) recorded VFs: \(entry.error ?? "not restored")"
      case .running:
        return "PF \(entry.pf) is being restored to \(entry.recorded) VFs (\(entry.operationID ?? "?"))"
      }
    }
    let head = "the host rebooted since the last run (boot id \(previousBootID ?? "?") → \(bootID ?? "?"))"
    return done.isEmpty ? head + ": every PF has its recorded VFs" : head + ": " + done.joined(separator: "; ")
  }
}

extension NodeEngine {
  /// What start-up found of the host's boot and restored (nil before `restoreLayouts`).
  public var layoutRestore: LayoutRestoreReport? { layoutReport }

  /// At start-up, after `restore()` and before the first scan: when the host rebooted since the
  /// last run (its boot id changed), re-creates each recorded layout a PF lost, one journaled
  /// operation per PF, and waits for them. Health judgements are dropped at a reboot (every device
  /// was enumerated again: its counters start from zero). `enabled` false
  /// (`layout.restore_on_boot`) only reports what would have been restored.
  @discardableResult
  public func restoreLayouts(_ persisted: PersistedState, enabled: Bool) async -> LayoutRestoreReport {
    recordedLayouts = persisted.layouts
    let bootID = await platform.bootID()
    var report = LayoutRestoreReport(
      bootID: bootID, previousBootID: persisted.bootID, enabled: enabled, at: clock.now())
    defer { layoutReport = report }
    guard let bootID else { return report }
    let recordBoot: [StoreChange] = bootID == persisted.bootID ? [] : [.setBootID(bootID)]
    guard let previous = persisted.bootID, previous != bootID else {
      await recordQuietly(recordBoot)
      return report
    }
    report.rebooted = true
    hostRebooted = true
    healthTracker.forgetAll()
    let node: DiscoveredNode
    do {
      node = try await platform.discover()
    } catch {
      report.pfs = persisted.layouts.values.sorted { $0.pf < $1.pf }.map {
        .init(
          pf: $0.pf, found: 0, recorded: $0.numVFs, result: .failed,
          error: "the node could not be scanned: \(error.message)")
      }
      for entry in report.pfs { restoreFailed.insert(entry.pf) }
      noteDiscrepancy(report.summary)
      await recordQuietly(recordBoot)
      return report
    }
    var planned: [(index: Int, machine: ReconfigureMachine, holder: Reservations.Holder)] = []
    for pf in node.pfs.map(\.function).sorted(by: { $0.address < $1.address }) {
      guard let layout = persisted.layouts[pf.address], pf.numVFs < layout.numVFs else { continue }
      var entry = LayoutRestoreReport.PF(
        pf: pf.address, found: pf.numVFs, recorded: layout.numVFs, result: .skipped)
      if !enabled {
        entry.error = "layout.restore_on_boot is off"
        report.pfs.append(entry)
        continue
      }
      do throws(AgentError) {
        let (machine, holder) = try planRestore(pf, to: layout)
        entry.operationID = machine.id
        entry.result = .running
        planned.append((report.pfs.count, machine, holder))
      } catch {
        entry.result = .failed
        entry.error = error.message
        restoreFailed.insert(pf.address)
      }
      report.pfs.append(entry)
    }
    // The new boot and every restore's journal in one transaction: a crash before it restores
    // again at the next start; after it, `recover` rolls the journaled restores forward.
    do {
      try await store.commit(recordBoot + planned.map { .putOperation($0.machine.stored) })
    } catch {
      for (index, _, holder) in planned {
        gate.reservations.release(holder)
        report.pfs[index].result = .failed
        report.pfs[index].error = "the state store could not record the restore: \(error.message)"
        restoreFailed.insert(report.pfs[index].pf)
      }
      planned = []
    }
    var started: [(index: Int, id: String)] = []
    for (index, machine, holder) in planned {
      operations.restoreActions[machine.id] = machine.journal.actions
      begin(machine, holder: holder, faultsApply: true)
      started.append((index, machine.id))
    }
    for (index, id) in started {
      await waitForOperation(id)
      let record = operations.log[id]
      let pf = report.pfs[index].pf
      if record?.state == .succeeded {
        report.pfs[index].result = .restored
        report.pfs[index].allocationsKept = state.allocations.values.filter { $0.pf == pf }.count
        report.pfs[index].vfsBound =
          record.map { operation in
            zip(operation.steps, operations.restoreActions[id] ?? []).filter {
              $0.0.state == .succeeded && $0.1.kind == .bind
            }
            .count
          } ?? 0
      } else if record?.state == .failed {
        report.pfs[index].result = .failed
        report.pfs[index].error = record?.error ?? "the operation failed"
        restoreFailed.insert(pf)
      }
      operations.restoreActions[id] = nil
    }
    noteDiscrepancy(report.summary)
    return report
  }

  /// Plans the journaled restore of `pf` to `layout` and reserves the PF and its allocations
  /// for it (held until the operation ends).
  private func planRestore(_ pf: PhysicalFunction, to layout: PFLayout) throws(AgentError) -> (
    ReconfigureMachine, Reservations.Holder
  ) {
    guard pf.driver != nil else {
      throw AgentError(
        .failedPrecondition,
        "PF \(pf.address) has no driver bound: its VF count cannot change (bind its PF driver, qdma-pf on QDMA cards)")
    }
    guard layout.numVFs <= pf.totalVFs else {
      throw AgentError(
        .failedPrecondition,
        "the recorded \(layout.numVFs) VFs are more than PF \(pf.address) supports (\(pf.totalVFs))")
    }
    let allocations = state.allocations.values.filter { $0.pf == pf.address }.sorted { $0.id < $1.id }
    var actions: [ReconfigureAction] = [.init(kind: .plan, count: layout.numVFs)]
    if let qmax = layout.qmax, qmax != pf.qmax { actions.append(.init(kind: .setQmax, count: qmax)) }
    if pf.numVFs > 0 { actions.append(.init(kind: .writeZero)) }
    actions.append(.init(kind: .writeCount, count: layout.numVFs))
    actions.append(.init(kind: .verify, count: layout.numVFs))
    for allocation in allocations { actions.append(.init(kind: .bind, vf: allocation.vf, tolerant: true)) }
    actions.append(.init(kind: .commit))
    let id = Self.makeID(prefix: "op-")
    let holder = gate.reservations.holder("layout restore \(id)")
    try gate.reservations.take([.pf(pf.address)] + allocations.map { .allocation($0.id) }, for: holder)
    let now = clock.now()
    var record = OperationRecord(
      id: id, kind: "restore", target: pf.address.description, state: .running,
      steps: actions.map { .init(description: $0.description(pf: pf.address), state: .pending) },
      impacts: allocations.map {
        .init(allocationID: $0.id, vf: $0.vf, vm: $0.vm, outcome: "kept", guestSees: "nothing (the host rebooted)")
      },
      createdAt: now)
    record.startedBy = "agent"
    record.steps[0].description = "plan: restore PF \(pf.address)'s recorded layout after the host rebooted"
    record.steps[0].state = .succeeded
    record.steps[0].startedAt = now
    record.steps[0].finishedAt = now
    var journal = ReconfigureJournal(
      pf: pf.address, from: pf.numVFs, to: layout.numVFs, strategy: .auto, actions: actions)
    journal.forwardOnly = true
    return (ReconfigureMachine(record: record, journal: journal), holder)
  }

  /// Commits `changes`, noting a failure (the boot id: the next start may take it for a reboot).
  private func recordQuietly(_ changes: [StoreChange]) async {
    guard !changes.isEmpty else { return }
    do {
      try await store.commit(changes)
    } catch {
      noteDiscrepancy("the boot id could not be recorded (\(error.message)); the next start may restore again")
    }
  }

  /// Records the layout of every PF whose VF count or queue count changed since it was last
  /// recorded. A PF whose restore failed keeps its record until the agent changes it again.
  func layoutChanges(verified: PCIAddress? = nil) -> [PFLayout] {
    var changed: [PFLayout] = []
    for address in state.pfAddresses
    where (operations.reconfiguring[address] == nil || address == verified) && !restoreFailed.contains(address) {
      guard let pf = state.pf(address) else { continue }
      let layout = PFLayout(pf: address, numVFs: pf.numVFs, qmax: pf.qmax > 0 ? pf.qmax : nil, at: clock.now())
      if let known = recordedLayouts[address], known.sameLayout(as: layout) { continue }
      changed.append(layout)
    }
    return changed
  }

  /// Writes the layouts and health memories that changed (after a scan is published).
  func saveLearned(verified: PCIAddress? = nil) async {
    let layouts = layoutChanges(verified: verified)
    let (put, delete) = healthTracker.unsaved()
    guard !layouts.isEmpty || !put.isEmpty || !delete.isEmpty else { return }
    do {
      try await store.commit(
        layouts.map { .putLayout($0) } + put.map { .putHealth($0) } + delete.map { .deleteHealth($0) })
      for layout in layouts { recordedLayouts[layout.pf] = layout }
      healthTracker.markSaved(put: put, delete: delete)
    } catch {
      noteDiscrepancy("device health and layouts could not be recorded (\(error.message)); retried at the next scan")
    }
  }

  // MARK: Health, cleared by an operator

  /// Clears a device's health judgement: the counters it shows now become its baseline, the
  /// errors it had before the agent first saw it are accepted, and it is assessed again at once
  /// (a reason that still holds, such as a degraded link, comes back). Kept in the store.
  public func clearHealth(_ device: PCIAddress, reason: String, meta: RequestMeta) async throws(AgentError) -> (
    DeviceHealth, revision: UInt64, replayed: Bool
  ) {
    try await mutate(
      "ClearDeviceHealth", meta, fingerprint: "\(device)\u{0}\(reason)",
      replay: { outcome in
        guard case .revision(let revision) = outcome else { return nil }
        return (health(of: device) ?? DeviceHealth(), revision, true)
      },
      plan: { () throws(AgentError) -> Plan<Void, (DeviceHealth, revision: UInt64, replayed: Bool)> in
        guard health(of: device) != nil else {
          throw AgentError(
            .notFound, "device \(device) is not managed by this node; `fpgactl inventory --vfs` lists them")
        }
        return .proceed((), reserving: [.health(device)], as: "health clear of \(device)")
      },
      effects: { _, _ throws(AgentError) in
        let note = "\(reason) (at \(clock.now()))"
        var tracker = healthTracker
        guard tracker.clear(device, note: note), let memory = tracker.memory(of: device) else {
          throw AgentError(.failedPrecondition, "device \(device) has not been assessed yet; retry after the next scan")
        }
        return Effects(
          writes: [.putHealth(memory)], outcome: .revision(state.revision + 1),
          apply: {
            // Applied once durable: a scan in between judged by the old baseline, as it should.
            _ = self.healthTracker.clear(device, note: note)
            let revision = (try? await self.rescan()) ?? self.state.revision
            return ((self.health(of: device) ?? DeviceHealth(), revision, false), .revision(revision))
          })
      })
  }

  /// A PF's or VF's health as the inventory has it.
  func health(of device: PCIAddress) -> DeviceHealth? {
    if let pf = state.pf(device) { return pf.health }
    return state.vf(device)?.health
  }
}

extension Validate {
  /// Why an operator clears a device's health: 1-256 characters, no control characters (it goes
  /// to the audit trail and the logs as given).
  public static func healthClearReason(_ text: String) throws(AgentError) -> String {
    guard !text.isEmpty else {
      throw AgentError(
        .invalidArgument, "reason is required: say why the device's errors are accepted (1-256 characters)")
    }
    guard text.utf8.count <= 256 else {
      throw AgentError(.invalidArgument, "reason is \(text.utf8.count) bytes long; the limit is 256")
    }
    guard !text.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) else {
      throw AgentError(.invalidArgument, "reason has control characters; write it on one line")
    }
    return text
  }
}

extension NodeEngine {
  /// Who holds each of `pf`'s VFs open now (`/dev/vfio/N`), as the platform tells.
  public func holders(of pf: PCIAddress) async -> [PCIAddress: String] { await platform.vfHolders(pf: pf) }
}
