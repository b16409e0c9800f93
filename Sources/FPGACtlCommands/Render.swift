import FPGACore
import FPGAAgentAPI
import SwiftProtobuf

/// Human-readable renderings of the API's messages. Stable: tests compare them exactly.
enum Render {
  static func status(_ status: Fpga_Agent_V1_NodeStatus) -> [String] {
    let capabilities = status.capabilities
    let health: String
    switch status.health {
    case .serving: health = "SERVING"
    case .degraded: health = "DEGRADED"
    case .notServing: health = "NOT_SERVING"
    default: health = "UNKNOWN"
    }
    var rows = [
      ["node", "\(status.nodeID) on \(status.hostname)"],
      ["health", health],
      [
        "platform",
        "\(capabilities.platform) (IOMMU \(yesNo(capabilities.iommu)), vfio-pci \(yesNo(capabilities.vfioPci)), "
          + "QDMA driver \(capabilities.qdmaDriver.isEmpty ? "none" : capabilities.qdmaDriver), "
          + "VFIO pause \(yesNo(capabilities.vfioPause)))",
      ],
      ["version", "\(status.agentVersion), up \(duration(seconds: status.uptime.seconds))"],
      ["revision", "\(status.revision)"],
      [
        "devices",
        "\(status.cards) cards, \(status.pfs) PFs, \(status.vfsEnabled)/\(status.vfsTotal) VFs enabled, "
          + "\(status.vfsAllocated) allocated, \(status.vfsFree) free",
      ],
      ["epoch", "\(status.orchestratorEpoch)"],
    ]
    let link = status.orchestrator
    if !link.address.isEmpty {
      rows.append([
        "link",
        "orchestrator \(link.address): \(link.state), \(link.connections) connections, acknowledged revision "
          + "\(link.acknowledgedRevision)\(link.error.isEmpty ? "" : " (last error: \(link.error))")",
      ])
    }
    let restore = status.layoutRestore
    if restore.rebooted {
      rows.append([
        "boot",
        "host rebooted before this start (boot \(restore.bootID)); layout restore \(restore.enabled ? "on" : "off")",
      ])
      for pf in restore.pfs {
        let detail =
          pf.result == "restored"
          ? "restored \(pf.recordedVfs) VFs (found \(pf.foundVfs)), \(count(Int(pf.allocationsKept), "allocation")) kept, \(pf.vfsBound) bound to vfio-pci, \(pf.operationID)"
          : "\(pf.result): \(pf.foundVfs) of \(pf.recordedVfs) VFs\(pf.error.isEmpty ? "" : " (\(pf.error))")"
        rows.append(["restore", "PF \(pf.pfBdf) \(detail)"])
      }
    }
    rows += status.findings.suffix(5).map { ["found", $0] }
    let problems = status.problems.isEmpty ? [["problems", "none"]] : status.problems.map { ["problem", $0] }
    return table(["", ""], rows + problems).dropFirst().map { $0 }
  }

  static func inventory(_ inventory: Fpga_Agent_V1_Inventory, withVFs: Bool) -> [String] {
    var lines: [String] = []
    let cards = inventory.cards.map { card in
      [
        card.id, card.model, "\(card.numaNode)", "\(card.pfs.count)",
        "\(card.pfs.reduce(0) { $0 + Int($1.numVfs) })/\(card.pfs.reduce(0) { $0 + Int($1.totalVfs) })",
        yesNo(card.draining),
      ]
    }
    lines += table(["CARD", "MODEL", "NUMA", "PFS", "VFS", "DRAINING"], cards)
    lines.append("")
    var pfRows: [[String]] = []
    for card in inventory.cards {
      for pf in card.pfs {
        let free = pf.vfs.filter { $0.state == .free }.count
        let allocated = pf.vfs.filter { $0.state == .allocated || $0.state == .attached }.count
        pfRows.append([
          pf.bdf, card.id, pciID(pf.vendorID, pf.deviceID), pf.driver.isEmpty ? "-" : pf.driver,
          "\(pf.numVfs)/\(pf.totalVfs)", "\(free)", "\(allocated)", "\(pf.numaNode)", "\(pf.qmax)",
          yesNo(pf.draining), pf.health.state.word,
        ])
      }
    }
    lines += table(
      ["PF", "CARD", "DEVICE", "DRIVER", "VFS", "FREE", "ALLOCATED", "NUMA", "QMAX", "DRAINING", "HEALTH"], pfRows)
    let unwell = inventory.cards.flatMap(\.pfs).flatMap { pf in
      [(pf.bdf, pf.health)] + pf.vfs.map { ($0.bdf, $0.health) }
    }
    .filter { $0.1.state != .healthy && $0.1.state != .unspecified && !$0.1.reasons.contains { $0.kind == "parent" } }
    for (device, health) in unwell {
      lines.append(
        "\(device) \(health.state.word): " + health.reasons.map { "\($0.kind): \($0.detail)" }.joined(separator: "; "))
    }
    if withVFs {
      lines.append("")
      var vfRows: [[String]] = []
      for card in inventory.cards {
        for pf in card.pfs {
          for vf in pf.vfs {
            vfRows.append([
              vf.bdf, vf.pfBdf, "\(vf.index)", pciID(vf.vendorID, vf.deviceID),
              vf.driver.isEmpty ? "-" : vf.driver, "\(vf.iommuGroup)", vfState(vf.state),
              vf.allocationID.isEmpty ? "-" : vf.allocationID, vf.health.state.word,
            ])
          }
        }
      }
      lines += table(["VF", "PF", "INDEX", "DEVICE", "DRIVER", "IOMMU", "STATE", "ALLOCATION", "HEALTH"], vfRows)
    }
    lines.append("")
    if inventory.allocations.isEmpty {
      lines.append("no allocations (revision \(inventory.revision))")
    } else {
      let rows = inventory.allocations.map { allocation in
        [
          allocation.id, allocation.vfBdf, allocation.pfBdf, allocation.owner,
          allocation.vm.isEmpty ? "-" : allocation.vm, "\(allocation.numaNode)",
          "\(allocation.iommuGroup)", yesNo(allocation.attached),
          allocation.hasLastRelayout
            ? "\(allocation.lastRelayout.how) (\(allocation.lastRelayout.operationID))" : "-",
        ]
      }
      lines += table(["ALLOCATION", "VF", "PF", "OWNER", "VM", "NUMA", "IOMMU", "ATTACHED", "LAST RE-LAYOUT"], rows)
      lines.append("\(inventory.allocations.count) allocations (revision \(inventory.revision))")
    }
    if !inventory.endedAllocations.isEmpty {
      lines.append("")
      lines += table(
        ["ENDED", "OWNER", "VF", "WHEN", "WHY"],
        inventory.endedAllocations.map { ended in
          [
            ended.allocation.id, ended.allocation.owner, ended.allocation.vfBdf,
            ended.endedAt.seconds == 0 ? "-" : "\(WallTime(seconds: ended.endedAt.seconds))", ended.reason,
          ]
        })
    }
    return lines
  }

  static func event(_ event: Fpga_Agent_V1_InventoryEvent) -> [String] {
    switch event.event {
    case .snapshot(let snapshot):
      let pfs = snapshot.cards.reduce(0) { $0 + $1.pfs.count }
      let vfs = snapshot.cards.reduce(0) { $0 + $1.pfs.reduce(0) { $0 + $1.vfs.count } }
      return [
        "revision \(event.revision): \(event.resync ? "resync " : "")snapshot of \(snapshot.cards.count) cards, "
          + "\(pfs) PFs, \(vfs) VFs, \(snapshot.allocations.count) allocations"
      ]
    case .delta(let delta):
      return delta.changes.map { "revision \(event.revision): " + change($0) }
    case nil:
      return ["revision \(event.revision): (empty event)"]
    }
  }

  static func change(_ change: Fpga_Agent_V1_InventoryChange) -> String {
    switch change.change {
    case .cardUpdated(let card): "card \(card.id) updated (draining \(yesNo(card.draining)))"
    case .cardRemoved(let id): "card \(id) removed"
    case .pfUpdated(let pf): "PF \(pf.bdf) updated (\(pf.numVfs)/\(pf.totalVfs) VFs, draining \(yesNo(pf.draining)))"
    case .pfRemoved(let bdf): "PF \(bdf) removed"
    case .vfUpdated(let vf):
      "VF \(vf.bdf) \(vfState(vf.state))\(vf.allocationID.isEmpty ? "" : " by \(vf.allocationID)")"
    case .vfRemoved(let bdf): "VF \(bdf) removed"
    case .allocationUpdated(let allocation):
      "allocation \(allocation.id) holds VF \(allocation.vfBdf) for \(allocation.owner)"
    case .allocationRemoved(let id): "allocation \(id) ended"
    case .vmUpdated(let vm): "VM \(vm.name) \(vm.state) (\(vm.freeRootPorts)/\(vm.rootPorts) root ports free)"
    case .vmRemoved(let name): "VM \(name) removed"
    case .acceleratorUpdated(let accelerator):
      "accelerator \(accelerator.id): \(accelerator.guests.count) guests, utilization \(percent(accelerator.metrics.utilization)), "
        + "\(decimal(accelerator.metrics.switchesPerSecond)) switches/s"
    case .acceleratorRemoved(let id): "accelerator \(id) removed"
    case nil: "(empty change)"
    }
  }

  static func operation(_ operation: Fpga_Agent_V1_Operation) -> [String] {
    let by = operation.startedBy.isEmpty ? "" : ", started by \(operation.startedBy)"
    var lines = [
      "operation \(operation.id) (\(operation.kind) \(operation.target)\(by)): \(opState(operation.state))"
    ]
    for (index, step) in operation.steps.enumerated() {
      let error = step.error.isEmpty ? "" : ": \(step.error)"
      lines.append("  \(index + 1). [\(opState(step.state))] \(step.description_p)\(error)")
    }
    for impact in operation.impacts {
      let vm = impact.vm.isEmpty ? "" : " in VM \(impact.vm)"
      lines.append(
        "  allocation \(impact.allocationID) (VF \(impact.vfBdf)\(vm)): \(impact.outcome), guest sees \(impact.guestSees)"
      )
    }
    if !operation.error.isEmpty { lines.append("  error: \(operation.error)") }
    return lines
  }

  /// A line per step each time one starts, waits, or ends.
  struct Progress {
    private var seen: [Int: (Fpga_Agent_V1_OperationState, String)] = [:]

    mutating func lines(for operation: Fpga_Agent_V1_Operation) -> [String] {
      var lines: [String] = []
      for (index, step) in operation.steps.enumerated() {
        let now = (step.state, step.error)
        if let before = seen[index], before == now { continue }
        if seen[index] == nil && step.state == .pending { continue }
        seen[index] = now
        let error = step.error.isEmpty ? "" : ": \(step.error)"
        lines.append("  \(index + 1)/\(operation.steps.count) [\(opState(step.state))] \(step.description_p)\(error)")
      }
      return lines
    }
  }

  /// How an operation ended, with what happened to each allocation.
  static func outcome(_ operation: Fpga_Agent_V1_Operation) -> [String] {
    var lines = ["operation \(operation.id) \(opState(operation.state))"]
    for impact in operation.impacts {
      let vm = impact.vm.isEmpty ? "" : " in VM \(impact.vm)"
      lines.append(
        "  allocation \(impact.allocationID) (VF \(impact.vfBdf)\(vm)): \(impact.outcome), guest sees \(impact.guestSees)"
      )
    }
    if !operation.error.isEmpty { lines.append("  error: \(operation.error)") }
    return lines
  }

  static func accelerators(_ accelerators: [Fpga_Agent_V1_Accelerator]) -> [String] {
    guard !accelerators.isEmpty else { return ["no accelerators on this node"] }
    var lines = table(
      [
        "ACCELERATOR", "CONTROL", "GUESTS", "LOADED", "UTIL", "SWITCH/S", "SWITCH", "OVERHEAD", "WAIT P50", "WAIT P99",
        "OVERCOMMIT",
      ],
      accelerators.map { accelerator in
        let metrics = accelerator.metrics
        return [
          accelerator.id, accelerator.control, "\(accelerator.guests.count)/\(accelerator.policy.overcommitLimit)",
          accelerator.loadedGuest.isEmpty ? "-" : accelerator.loadedGuest, percent(metrics.utilization),
          decimal(metrics.switchesPerSecond), millis(metrics.meanSwitchTime), percent(metrics.switchOverhead),
          millis(metrics.waitP50), millis(metrics.waitP99), decimal(metrics.overcommitRatio),
        ]
      })
    let guests = accelerators.flatMap { accelerator in
      accelerator.guests.map { [accelerator.id, $0.guest, "\($0.weight)", percent($0.share), millis($0.pending)] }
    }
    if !guests.isEmpty {
      lines.append("")
      lines += table(["ACCELERATOR", "GUEST", "WEIGHT", "SHARE", "PENDING"], guests)
    }
    return lines
  }

  static func contexts(_ contexts: [Fpga_Agent_V1_Context]) -> [String] {
    guard !contexts.isEmpty else { return ["no contexts"] }
    return table(
      ["CONTEXT", "ACCELERATOR", "GUEST", "FUNCTION", "WEIGHT", "STATE", "ACTIVE"],
      contexts.map {
        [$0.id, $0.acceleratorID, $0.guest, $0.function, "\($0.weight)", "\($0.savedStateBytes) B", yesNo($0.active)]
      })
  }

  static func vms(_ inventory: Fpga_Agent_V1_Inventory) -> [String] {
    guard !inventory.vms.isEmpty else {
      return [
        "no VMs: with QMP, start the agent with --qmp-socket NAME=PATH or --qmp-dir DIR; with libvirt, no running "
          + "or paused domain is admitted by libvirt.domains / libvirt.metadata_namespace, or libvirtd is unreachable "
          + "(`fpgactl status` lists it among the problems)"
      ]
    }
    let attached = Dictionary(grouping: inventory.allocations.filter(\.attached), by: \.vm)
    // The backend: VMs reached through libvirt carry `libvirt:URI` where QMP VMs have their socket.
    let libvirt = "libvirt:"
    let throughLibvirt = inventory.vms.allSatisfy { $0.qmpSocket.hasPrefix(libvirt) }
    let rows = inventory.vms.map { vm in
      [
        vm.name, vm.state, "\(vm.freeRootPorts)/\(vm.rootPorts)", yesNo(vm.vfioPause),
        attached[vm.name].map { $0.map { "\($0.vfBdf)\($0.detaching ? " (detaching)" : "")" }.joined(separator: ",") }
          ?? "-",
        vm.error.isEmpty ? (throughLibvirt ? String(vm.qmpSocket.dropFirst(libvirt.count)) : vm.qmpSocket) : vm.error,
      ]
    }
    let endpoint = throughLibvirt ? "LIBVIRT URI / ERROR" : "QMP SOCKET / ERROR"
    return table(["VM", "STATE", "FREE PORTS", "VFIO PAUSE", "VFS", endpoint], rows)
  }

  static func vfState(_ state: Fpga_Agent_V1_VFState) -> String {
    switch state {
    case .free: "free"
    case .allocated: "allocated"
    case .attached: "attached"
    case .detaching: "detaching"
    case .unhealthy: "unhealthy"
    default: "unknown"
    }
  }

  static func opState(_ state: Fpga_Agent_V1_OperationState) -> String {
    switch state {
    case .pending: "pending"
    case .running: "running"
    case .succeeded: "succeeded"
    case .failed: "failed"
    case .planned: "planned"
    default: "unknown"
    }
  }

  static func yesNo(_ flag: Bool) -> String { flag ? "yes" : "no" }

  static func percent(_ value: Double) -> String { "\(decimal(value * 100))%" }

  /// `value` with one decimal, without Foundation.
  static func decimal(_ value: Double) -> String {
    let tenths = Int((value * 10).rounded())
    return "\(tenths / 10).\(abs(tenths % 10))"
  }

  /// A protobuf duration in milliseconds with one decimal, e.g. "0.5 ms".
  static func millis(_ duration: Google_Protobuf_Duration) -> String {
    decimal(Double(duration.seconds) * 1000 + Double(duration.nanos) / 1e6) + " ms"
  }

  static func pciID(_ vendor: UInt32, _ device: UInt32) -> String {
    hex4(vendor) + ":" + hex4(device)
  }

  static func hex4(_ value: UInt32) -> String {
    let digits = String(value, radix: 16)
    return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
  }

  static func duration(seconds: Int64) -> String {
    if seconds < 60 { return "\(seconds)s" }
    if seconds < 3600 { return "\(seconds / 60)m\(seconds % 60)s" }
    return "\(seconds / 3600)h\(seconds % 3600 / 60)m"
  }
}

/// "1 allocation", "2 allocations".
func count(_ number: Int, _ noun: String) -> String { "\(number) \(noun)\(number == 1 ? "" : "s")" }
