/// An allocation the agent ended on its own, with why (its device left the bus, or its VF
/// vanished behind the agent's back): for the owner, in the inventory and status.
public struct EndedAllocation: Hashable, Sendable {
  public var allocation: Allocation
  public var reason: String
  public var at: WallTime
  /// The revision that removed it.
  public var revision: UInt64 = 0

  public init(allocation: Allocation, reason: String, at: WallTime) {
    self.allocation = allocation
    self.reason = reason
    self.at = at
  }
}

extension NodeEngine {
  /// PFs that left the bus and have not come back, with since when.
  public var gonePFs: [PCIAddress: WallTime] { gone }

  /// How many ended allocations are kept for readers.
  static let endedAllocationHistory = 64

  /// Assesses every scanned device's health before the scan is applied: a PF's own readings;
  /// a VF's own, plus its PF's (a PF that is unhealthy makes its VFs unusable too). PFs known
  /// before and missing now are gone: their allocations end with that reason.
  func assessHealth(_ node: inout DiscoveredNode) {
    let now = clock.now()
    let scanned = Set(node.pfs.map(\.function.address))
    for address in state.pfAddresses where !scanned.contains(address) && operations.reconfiguring[address] == nil {
      gone[address] = gone[address] ?? now
      healthTracker.forget(address)
      // A PF leaving the bus loses its VFs first (the kernel disables SR-IOV, then removes the
      // PF): allocations that ended moments ago on its VFs ended because the PF went.
      for index in endedAllocations.indices
      where endedAllocations[index].allocation.pf == address && now.since(endedAllocations[index].at) < .seconds(30)
        && endedAllocations[index].reason.hasPrefix("VF ")
      {
        let vf = endedAllocations[index].allocation.vf
        endedAllocations[index].reason =
          "PF \(address) is gone from the PCI bus (surprise removal or hot-unplug); VF \(vf) went with it"
        noteDiscrepancy("allocation \(endedAllocations[index].allocation.id): its PF \(address) then left the bus")
        endedObserver?(endedAllocations[index])
      }
    }
    let present = Set(node.pfs.flatMap { [$0.function.address] + $0.vfs.map(\.address) })
    if !healthPruned {
      healthPruned = true
      healthTracker.forget(allBut: present)
    }
    // A VF that left is a new function when it comes back (a VF count change re-creates them):
    // it is judged from its own first reading then.
    for pf in state.pfAddresses {
      for vf in state.vfs(of: pf) where !present.contains(vf.address) { healthTracker.forget(vf.address) }
    }
    for allocation in state.allocations.values.sorted(by: { $0.id < $1.id })
    where !present.contains(allocation.vf) && operations.reconfiguring[allocation.pf] == nil {
      let reason =
        gone[allocation.pf] != nil
        ? "PF \(allocation.pf) is gone from the PCI bus (surprise removal or hot-unplug); VF \(allocation.vf) went with it"
        : "VF \(allocation.vf) vanished from the platform (its PF's VF count changed behind the agent, or the PF is leaving the bus)"
      var ended = EndedAllocation(allocation: allocation, reason: reason, at: now)
      ended.revision = state.revision + 1  // the scan's changes are the next revision
      endedAllocations.append(ended)
      endedObserver?(ended)
      healthTracker.forget(allocation.vf)
    }
    if endedAllocations.count > Self.endedAllocationHistory {
      endedAllocations.removeFirst(endedAllocations.count - Self.endedAllocationHistory)
    }
    for index in node.pfs.indices {
      let address = node.pfs[index].function.address
      gone[address] = nil
      let pfHealth = healthTracker.assess(address, readings: node.pfs[index].function.readings, now: now)
      node.pfs[index].function.health = pfHealth
      for vfIndex in node.pfs[index].vfs.indices {
        let vf = node.pfs[index].vfs[vfIndex]
        var readings = vf.readings
        // Found before an await: only while the VF is still attached (a detach may have ended
        // in between).
        if let vm = unheldAttachments[vf.address], readings != nil,
          let id = state.view(of: vf).allocationID, let allocation = state.allocations[id],
          allocation.attached, !allocation.detaching, allocation.vm == vm
        {
          readings?.unheldBy = vm
        }
        var health = healthTracker.assess(
          vf.address, readings: readings, noIOMMUGroup: vf.iommuGroup < 0, driverChanges: false, now: now)
        if pfHealth.state >= .unhealthy {
          health.reasons.append(
            DeviceHealth.Reason(
              kind: "parent", state: pfHealth.state,
              detail: "its PF \(address) is \(pfHealth.state.rawValue): \(pfHealth.summary)",
              since: pfHealth.since))
          if pfHealth.state > health.state {
            health.state = pfHealth.state
            health.since = pfHealth.since
          }
        }
        node.pfs[index].vfs[vfIndex].health = health
      }
      if healthTracker.policy.drainOnFatal, pfHealth.reasons.contains(where: { $0.kind == "aer-fatal" }),
        !state.isPFDraining(address)
      {
        pendingDrains.insert(address.description)
        healthDrains.append(address.description)
        noteDiscrepancy("PF \(address) drained automatically (health.drain_on_fatal): \(pfHealth.summary)")
      }
    }
  }

  /// Attached VFs whose VFIO group no process holds open: the VM the records name no longer uses
  /// the device (it crashed, or the device was unplugged behind the agent). Operations under way
  /// (a paused VF is closed on purpose) and detaches are left alone.
  func findUnheldAttachments() async {
    let attached = state.allocations.values.filter {
      $0.attached && !$0.detaching && operations.reconfiguring[$0.pf] == nil
    }
    var unheld: [PCIAddress: String] = [:]
    for pf in Set(attached.map(\.pf)).sorted() {
      let holders = await platform.vfHolders(pf: pf)
      for allocation in attached where allocation.pf == pf && holders[allocation.vf] == nil {
        unheld[allocation.vf] = allocation.vm ?? "its VM"
      }
    }
    unheldAttachments = unheld
  }

  /// The health problems status reports: devices gone, and every device not healthy.
  func healthProblems() -> [String] {
    var problems: [String] = []
    for (address, since) in gone.sorted(by: { $0.key < $1.key }) {
      problems.append("PF \(address) is gone from the PCI bus since \(since): its VFs and their allocations ended")
    }
    for address in state.pfAddresses {
      guard let pf = state.pf(address) else { continue }
      if pf.health.state != .healthy {
        problems.append("PF \(address) is \(pf.health.state.rawValue) since \(pf.health.since): \(pf.health.summary)")
      }
      for vf in state.vfs(of: address)
      where vf.health.state != .healthy
        && !vf.health.reasons.contains(where: {
          $0.kind == "parent" || $0.kind == "no-iommu-group"
        })
      {
        problems.append(
          "VF \(vf.address) is \(vf.health.state.rawValue) since \(vf.health.since): \(vf.health.summary)")
      }
    }
    return problems
  }
}
