/// After a restart: the records against what sysfs and the VMs report.
extension NodeEngine {
  /// Compares the allocations with the platform and the VMs, fixes the records to match what
  /// is really there, and reports each discrepancy (returned, and kept for `discrepancies`):
  /// allocations whose VF vanished end; attachments the VM no longer has become unattached;
  /// devices found in a VM that no allocation records are adopted.
  @discardableResult
  public func reconcile() async -> [String] {
    let before = discrepancies.count
    var edits: [AllocationEdit] = []
    for allocation in state.allocations.values.sorted(by: { $0.id < $1.id })
    where operations.reconfiguring[allocation.pf] == nil && !gate.reservations.isHeld(.allocation(allocation.id)) {
      if state.vf(allocation.vf) == nil {
        noteDiscrepancy(
          "allocation \(allocation.id) (owner \(allocation.owner)) was on VF \(allocation.vf), which no longer exists: ended"
        )
        edits.append(.remove(allocation))
      }
    }
    if let hypervisor {
      let scan = await hypervisor.scanPluggedDevices()
      let plugged = scan.devices
      // A VM whose devices could not be read is not known to lack any.
      let reachable = Set(state.vms.values.filter { $0.state != .unreachable }.map(\.name)).subtracting(scan.unread)
      for allocation in state.allocations.values.sorted(by: { $0.id < $1.id })
      where allocation.attached && operations.reconfiguring[allocation.pf] == nil
        && !gate.reservations.isHeld(.allocation(allocation.id))
        && !edits.contains(where: { if case .remove(let gone) = $0 { gone.id == allocation.id } else { false } })
      {
        let deviceID = allocation.deviceID ?? allocation.id
        if let found = plugged.first(where: { $0.deviceID == deviceID }) {
          if found.vm != allocation.vm || (found.rootPort != nil && found.rootPort != allocation.rootPort)
            || allocation.detaching
          {
            var fixed = allocation
            fixed.vm = found.vm
            fixed.rootPort = found.rootPort ?? allocation.rootPort
            fixed.detaching = false
            noteDiscrepancy(
              "allocation \(allocation.id) is plugged into VM \(found.vm) at \(fixed.rootPort ?? "?"): record updated")
            edits.append(.update(fixed))
          }
        } else if hostRebooted, let vm = allocation.vm, !reachable.contains(vm), !scan.unread.contains(vm) {
          var fixed = allocation
          fixed.attached = false
          fixed.detaching = false
          fixed.deviceID = nil
          fixed.rootPort = nil
          noteDiscrepancy(
            "allocation \(allocation.id) was attached to VM \(vm), which does not run since the host rebooted: now unattached, its VF kept"
          )
          edits.append(.update(fixed))
        } else if let vm = allocation.vm, reachable.contains(vm) {
          var fixed = allocation
          fixed.attached = false
          fixed.detaching = false
          fixed.deviceID = nil
          fixed.rootPort = nil
          noteDiscrepancy(
            "allocation \(allocation.id) was recorded as attached to VM \(vm), which does not have device \(deviceID): now unattached"
          )
          edits.append(.update(fixed))
        }
      }
      // An attach the VMM did but the agent did not record (it stopped between the VMM's answer
      // and its commit): the device is in the VM, so the allocation is attached.
      for allocation in state.allocations.values.sorted(by: { $0.id < $1.id })
      where !allocation.attached && operations.reconfiguring[allocation.pf] == nil
        && !gate.reservations.isHeld(.allocation(allocation.id))
        && !edits.contains(where: { if case .remove(let gone) = $0 { gone.id == allocation.id } else { false } })
      {
        guard
          let found = plugged.first(where: {
            $0.deviceID == allocation.id && ($0.host == nil || $0.host == allocation.vf)
          })
        else { continue }
        var fixed = allocation
        fixed.attached = true
        fixed.detaching = false
        fixed.vm = found.vm
        fixed.deviceID = found.deviceID
        fixed.rootPort = found.rootPort
        noteDiscrepancy(
          "allocation \(allocation.id) was recorded as not attached, but VM \(found.vm) holds it as device "
            + "\(found.deviceID) at \(found.rootPort ?? "?") (an attach the agent did not record): now attached")
        edits.append(.update(fixed))
      }
    }
    if hostRebooted, hypervisor == nil {
      for allocation in state.allocations.values.sorted(by: { $0.id < $1.id })
      where allocation.attached && operations.reconfiguring[allocation.pf] == nil
        && !gate.reservations.isHeld(.allocation(allocation.id))
        && !edits.contains(where: { if case .remove(let gone) = $0 { gone.id == allocation.id } else { false } })
      {
        var fixed = allocation
        fixed.attached = false
        fixed.detaching = false
        fixed.deviceID = nil
        fixed.rootPort = nil
        noteDiscrepancy(
          "allocation \(allocation.id) was attached to VM \(allocation.vm ?? "?") before the host rebooted: now unattached, its VF kept"
        )
        edits.append(.update(fixed))
      }
    }
    do {
      try await store.commit(edits.map(\.storeChange))
      apply(edits)
    } catch {
      noteDiscrepancy("the fixes above could not be recorded: \(error.message)")
    }
    await recoverAttachments()
    return Array(discrepancies.suffix(from: min(before, discrepancies.count)))
  }
}
