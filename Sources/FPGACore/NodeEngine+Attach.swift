/// Attaching allocated VFs to running VMs and detaching them, through the hypervisor seam.
extension NodeEngine {
  public func attach(_ request: AttachRequest) async throws(AgentError) -> AttachResult {
    try await mutate(
      "AttachVF", request.meta, fingerprint: request.allocationID + "\u{0}" + request.vm,
      replay: { outcome in
        guard case .attached(var result) = outcome else { return nil }
        result.replayed = true
        return result
      },
      plan: { () throws(AgentError) -> Plan<(any Hypervisor, Allocation, VirtualMachineInfo), AttachResult> in
        let hypervisor = try requireHypervisor()
        let allocation = try existingAllocation(request.allocationID)
        guard let vm = state.vms[request.vm] else {
          throw AgentError(
            .notFound,
            "VM \(request.vm) is not known to this agent, which serves \(hypervisor.whichVMs); `fpgactl vms` lists them"
          )
        }
        if allocation.attached, !gate.reservations.isHeld(.allocation(allocation.id)) {
          if allocation.vm == request.vm, let port = allocation.rootPort, !allocation.detaching {
            return .answer(
              AttachResult(
                allocation: allocation, deviceID: allocation.deviceID ?? allocation.id, rootPort: port, replayed: true))
          }
          throw AgentError(
            .failedPrecondition,
            "allocation \(allocation.id) is attached to VM \(allocation.vm ?? "?"); detach it first (`fpgactl detach \(allocation.id)`)"
          )
        }
        if let intended = allocation.vm, intended != request.vm {
          throw AgentError(
            .failedPrecondition,
            "allocation \(allocation.id) was made for VM \(intended), not \(request.vm); allocate another VF for \(request.vm)"
          )
        }
        guard vm.state != .unreachable else {
          throw AgentError(
            .unavailable, "VM \(vm.name) is unreachable: \(vm.error ?? "its QMP socket does not answer")")
        }
        return .proceed((hypervisor, allocation, vm), reserving: [.allocation(allocation.id)], as: "attach")
      },
      effects: { planned, _ throws(AgentError) in
        let (hypervisor, before, vm) = planned
        if hypervisor.passesThroughVFIO { _ = try await prepareForPassthrough(vf: before.vf) }
        let port = try await hypervisor.attach(vf: before.vf, to: vm.name, deviceID: before.id)
        var allocation = before
        allocation.attached = true
        allocation.vm = vm.name
        allocation.deviceID = allocation.id
        allocation.rootPort = port
        allocation.detaching = false
        let result = AttachResult(allocation: allocation, deviceID: allocation.id, rootPort: port, replayed: false)
        return Effects(
          writes: [.putAllocation(allocation)], outcome: .attached(result),
          undo: {
            // Unrecorded, the attachment is undone so that nothing changed.
            try? await hypervisor.detach(deviceID: allocation.id, from: vm.name, timeout: .seconds(10))
            self.publish(self.state.apply(vms: await hypervisor.machines()))
          },
          apply: {
            var changes = self.state.update(allocation)
            changes += self.state.apply(vms: await hypervisor.machines())
            self.publish(changes)
            return (result, nil)
          })
      })
  }

  public func detach(_ request: DetachRequest) async throws(AgentError) -> DetachResult {
    try await mutate(
      "DetachVF", request.meta, fingerprint: request.allocationID,
      replay: { outcome in
        guard case .detached(let allocation) = outcome else { return nil }
        return DetachResult(allocation: allocation, replayed: true)
      },
      plan: { () throws(AgentError) -> Plan<(any Hypervisor, Allocation, String), DetachResult> in
        let hypervisor = try requireHypervisor()
        let allocation = try existingAllocation(request.allocationID)
        guard allocation.attached, let vm = allocation.vm else {
          throw AgentError(.failedPrecondition, "allocation \(allocation.id) is not attached to a VM")
        }
        return .proceed((hypervisor, allocation, vm), reserving: [.allocation(allocation.id)], as: "detach")
      },
      effects: { planned, claim throws(AgentError) in
        let (hypervisor, before, vm) = planned
        var allocation = before
        if !allocation.detaching {
          // Durable, then shown: the unplug is under way.
          allocation.detaching = true
          try await commit(claim, [.putAllocation(allocation)])
          publish(state.update(allocation))
        }
        do throws(AgentError) {
          try await hypervisor.detach(
            deviceID: allocation.deviceID ?? allocation.id, from: vm, timeout: request.timeout)
        } catch {
          // The device may still be in the guest: it stays "detaching", visibly, until a retry
          // sees the unplug through.
          publish(state.apply(vms: await hypervisor.machines()))
          throw error
        }
        allocation.attached = false
        allocation.detaching = false
        allocation.deviceID = nil
        allocation.rootPort = nil
        let detached = allocation
        // The device is out of the guest whatever the store says: memory follows the VM. A
        // failed write is reconciled at the next start (the VM no longer has the device).
        return Effects(
          writes: [.putAllocation(detached)], outcome: .detached(detached), applyWhenUnwritten: true,
          apply: {
            var changes = self.state.update(detached)
            changes += self.state.apply(vms: await hypervisor.machines())
            self.publish(changes)
            return (DetachResult(allocation: detached, replayed: false), nil)
          })
      })
  }

  /// At start-up: devices the agent plugged earlier (ids `alloc-…` with a `host` VF) become
  /// attached allocations again, so no VF in a VM is handed out twice. Returns what was found.
  @discardableResult
  public func recoverAttachments() async -> [PluggedDevice] {
    guard let hypervisor else { return [] }
    let plugged = await hypervisor.pluggedDevices()
    var changes: [InventoryChange] = []
    for device in plugged {
      guard let host = device.host, let vf = state.vf(host), state.view(of: vf).allocationID == nil,
        state.allocations[device.deviceID] == nil
      else { continue }
      let allocation = Allocation(
        id: device.deviceID, vf: host, pf: vf.pfAddress, owner: "recovered", vm: device.vm, idempotencyKey: nil,
        createdAt: clock.now(), numaNode: vf.numaNode, iommuGroup: vf.iommuGroup, attached: true,
        deviceID: device.deviceID, rootPort: device.rootPort)
      do {
        try await store.commit([.putAllocation(allocation)])
      } catch {
        noteDiscrepancy(
          "device \(device.deviceID) in VM \(device.vm) holds VF \(host) but could not be recorded: \(error.message)")
      }
      noteDiscrepancy(
        "VM \(device.vm) holds VF \(host) as device \(device.deviceID), which no allocation recorded: adopted as allocation \(device.deviceID) (owner \"recovered\")"
      )
      changes += state.insert(allocation)
    }
    publish(changes)
    return plugged
  }

  public var virtualMachines: [VirtualMachineInfo] { state.vms.values.sorted { $0.name < $1.name } }

  private func requireHypervisor() throws(AgentError) -> any Hypervisor {
    guard let hypervisor else {
      throw AgentError(
        .failedPrecondition,
        "no VMs are configured on this agent: start it with --qmp-socket NAME=PATH (repeatable) or --qmp-dir DIR")
    }
    return hypervisor
  }

  private func existingAllocation(_ id: String) throws(AgentError) -> Allocation {
    guard let allocation = state.allocations[id] else {
      throw AgentError(.notFound, "allocation \(id) does not exist; `fpgactl inventory` lists the allocations")
    }
    return allocation
  }
}

public struct AttachRequest: Hashable, Sendable {
  public var meta: RequestMeta
  public var allocationID: String
  public var vm: String

  public init(meta: RequestMeta = .init(), allocationID: String, vm: String) {
    self.meta = meta
    self.allocationID = allocationID
    self.vm = vm
  }
}

public struct AttachResult: Hashable, Sendable, Codable {
  public var allocation: Allocation
  public var deviceID: String
  public var rootPort: String
  public var replayed: Bool
}

public struct DetachRequest: Hashable, Sendable {
  public var meta: RequestMeta
  public var allocationID: String
  public var timeout: Duration

  public init(meta: RequestMeta = .init(), allocationID: String, timeout: Duration = .seconds(10)) {
    self.meta = meta
    self.allocationID = allocationID
    self.timeout = timeout
  }
}

public struct DetachResult: Hashable, Sendable {
  public var allocation: Allocation
  public var replayed: Bool
}
