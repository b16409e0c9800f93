import FPGAAgentConfig
import FPGAAgentAPI
package import FPGACore
package import FPGADevicePlugin
package import FPGADRA
package import FPGALibvirt
package import GRPCCore
package import Prometheus
import Synchronization
import Foundation

/// The agent's metrics, in one catalog (swift-prometheus crashes when one name is registered
/// twice with another type, help text or label set: every name is made here, nowhere else).
///
/// Two kinds:
/// - **events** (RPCs handled and their latency) accumulate in a registry that lives as long as
///   the agent;
/// - **state** (VFs by state, PFs, allocations, accelerators, the link, the kubelet, health) is
///   read from the engine at each scrape into a fresh registry, so series of VFs, guests and
///   accelerators that are gone disappear with them instead of going stale.
package final class AgentMetrics: Sendable {
  package let events = PrometheusCollectorRegistry()
  package let version: String
  /// The device plugins' registrations, by resource name.
  private let kubelet = Mutex<[String: RegistrationState]>([:])
  /// The DRA driver and its slice publisher, when DRA is on.
  private let dra = Mutex<(driver: DRADriver, publisher: SlicePublisher?)?>(nil)
  /// The libvirt backend, when `hypervisor: libvirt`.
  private let libvirt = Mutex<LibvirtHypervisor?>(nil)

  /// RPC latency buckets: 1 ms to 60 s (a detach waits on a guest; a switch on a slice).
  package static let latencyBuckets: [Duration] = [
    .milliseconds(1), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
    .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5),
    .seconds(10), .seconds(30), .seconds(60),
  ]

  package init(version: String, storeStatistics: (@Sendable () -> (transactions: Int, commits: Int))? = nil) {
    self.version = version
    self.storeStatistics = storeStatistics
  }

  /// Reports a device plugin's registration as `fpga_kubelet_registered{resource}`.
  package func track(resource: String, _ registration: RegistrationState) {
    kubelet.withLock { $0[resource] = registration }
  }

  /// Reports the DRA driver's claims and the pool's publishing as `fpga_dra_*`.
  /// Grow on demand's figures when the DRA driver grows PFs (the link's heartbeat).
  package func draGrowth() async -> GrowthFigures? {
    guard let driver = dra.withLock({ $0?.driver }), await driver.settings.growth != nil else { return nil }
    return await driver.growth
  }

  package func track(dra driver: DRADriver, publisher: SlicePublisher?) {
    dra.withLock { $0 = (driver, publisher) }
  }

  /// Reports the libvirt connection as `fpga_hypervisor_connected` and `…_reconnects_total`.
  package func track(libvirt hypervisor: LibvirtHypervisor) {
    libvirt.withLock { $0 = hypervisor }
  }

  /// One RPC answered (gRPC or the dashboard's JSON endpoints), go-grpc-prometheus style.
  package func handled(service: String, method: String, code: String, after duration: Duration) {
    events.counter(
      name: "grpc_server_handled_total",
      labels: [("grpc_service", service), ("grpc_method", method), ("grpc_code", code)],
      help: "RPCs completed on the server, by status code."
    ).increment()
    events.histogram(
      name: "grpc_server_handling_seconds", labels: [("grpc_service", service), ("grpc_method", method)],
      buckets: Self.latencyBuckets, help: "Time from a call's arrival to its answer."
    ).record(duration)
  }

  /// Step buckets: 1 ms to 10 min (a detach waits on a guest, a count write on the kernel).
  package static let stepBuckets: [Duration] = [
    .milliseconds(1), .milliseconds(10), .milliseconds(100), .milliseconds(500), .seconds(1), .seconds(5),
    .seconds(15), .seconds(60), .seconds(300), .seconds(600),
  ]

  /// An operation ended: its duration and each step's, by kind and step (the step's first word:
  /// pause, detach, write-zero, write-count, verify, bind, resume, reattach, commit, ...).
  package func operationEnded(_ record: OperationRecord) {
    if let finished = record.finishedAt {
      events.histogram(
        name: "fpga_agent_operation_duration_seconds",
        labels: [("kind", record.kind), ("result", record.state.rawValue)],
        buckets: Self.stepBuckets, help: "Operations from start to end, by kind and result."
      ).record(finished.since(record.createdAt))
    }
    for step in record.steps {
      guard let started = step.startedAt, let finished = step.finishedAt else { continue }
      let name = step.description.split(separator: " ").first.map(String.init) ?? "step"
      events.histogram(
        name: "fpga_agent_operation_step_duration_seconds", labels: [("kind", record.kind), ("step", name)],
        buckets: Self.stepBuckets, help: "Steps of operations (reconfigure: pause, detach, write, verify, bind, ...)."
      ).record(finished.since(started))
    }
  }

  /// Switch and wait buckets: 10 µs to 10 s.
  package static let acceleratorBuckets: [Duration] = [
    .microseconds(10), .microseconds(50), .microseconds(100), .microseconds(500), .milliseconds(1), .milliseconds(5),
    .milliseconds(10), .milliseconds(50), .milliseconds(100), .milliseconds(500), .seconds(1), .seconds(10),
  ]

  /// A context switch or a wait on an accelerator.
  package func accelerator(_ event: AcceleratorEvent) {
    switch event {
    case .switched(let id, let cost):
      events.counter(
        name: "fpga_accelerator_context_switches_total", labels: [("accelerator", id)],
        help: "Context switches (save and load) on the accelerator since the start."
      ).increment()
      events.histogram(
        name: "fpga_accelerator_context_switch_duration_seconds", labels: [("accelerator", id)],
        buckets: Self.acceleratorBuckets, help: "Context switch time (save the old context, load the new)."
      ).record(cost)
    case .waited(let id, let wait):
      events.histogram(
        name: "fpga_accelerator_wait_duration_seconds", labels: [("accelerator", id)],
        buckets: Self.acceleratorBuckets, help: "How long guests' work waited for the accelerator."
      ).record(wait)
    }
  }

  /// The state store's group commits (commits, and the transactions that carried them).
  package let storeStatistics: (@Sendable () -> (transactions: Int, commits: Int))?

  /// The whole exposition: events, then the node's state now.
  package func scrape(_ engine: NodeEngine) async -> String {
    let status = await engine.status()
    let snapshot = try? await engine.snapshot()
    let ended = await engine.endedOperations
    let state = PrometheusCollectorRegistry()
    state.gauge(name: "fpga_agent_build_info", labels: [("version", version)], help: "The agent's version (always 1).")
      .set(1.0)
    state.gauge(name: "fpga_agent_inventory_revision", help: "The inventory's revision.").set(Double(status.revision))
    for health in [NodeStatusValue.Health.serving, .degraded, .notServing] {
      state.gauge(
        name: "fpga_node_health", labels: [("state", health.rawValue.replacingOccurrences(of: "-", with: "_"))],
        help: "1 for the node's health now (serving, degraded, not_serving), 0 for the others."
      ).set(status.health == health ? 1.0 : 0.0)
    }
    state.gauge(name: "fpga_node_problems", help: "Problems the node reports (unreadable devices, missing IOMMU, ...).")
      .set(Double(status.capabilities.problems.count))
    if let restore = status.layoutRestore {
      state.gauge(
        name: "fpga_host_rebooted_at_start",
        help: "1 when the host had rebooted since the agent's previous run (its boot id changed), else 0."
      ).set(restore.rebooted ? 1.0 : 0.0)
      for result in [LayoutRestoreReport.Result.restored, .failed, .skipped, .running] {
        state.gauge(
          name: "fpga_layout_restore_pfs", labels: [("result", result.rawValue)],
          help: "PFs whose recorded VF layout the agent restored (or failed to, or skipped) after the last reboot."
        ).set(Double(restore.pfs.filter { $0.result == result }.count))
      }
    }
    state.gauge(name: "fpga_agent_watchers", help: "Open inventory watch streams.").set(Double(status.watchers))
    state.counter(
      name: "fpga_agent_watcher_cutoffs_total",
      help: "Watch streams ended for falling behind (they resume from their last revision)."
    ).increment(by: Int64(await engine.watcherCutOffs))
    if let storeStatistics {
      let figures = storeStatistics()
      state.counter(name: "fpga_store_commits_total", help: "Changes committed durably to the state store.")
        .increment(by: Int64(figures.commits))
      state.counter(
        name: "fpga_store_transactions_total",
        help: "Transactions that carried them (group commit: commits / transactions is the group size)."
      ).increment(by: Int64(figures.transactions))
    }
    if !status.link.address.isEmpty {
      // Only with a link configured: a node without an orchestrator has no link to be down.
      state.gauge(name: "fpga_orchestrator_link_up", help: "1 while the orchestrator link is connected.")
        .set(status.link.state == .connected ? 1.0 : 0.0)
      state.counter(
        name: "fpga_orchestrator_link_connections_total",
        help: "Connections the orchestrator link has made since the start."
      ).increment(by: Int64(status.link.connections))
    }
    if let connection = libvirt.withLock({ $0 })?.connectionStatus {
      // Only with `hypervisor: libvirt`: QMP VMs are reached each by its own socket (their
      // VMs' state says which cannot be reached).
      let labels = [("backend", "libvirt"), ("uri", connection.uri)]
      state.gauge(
        name: "fpga_hypervisor_connected", labels: labels,
        help: "1 while the agent's connection to the hypervisor (libvirtd) is open, 0 while it reconnects."
      ).set(connection.connected ? 1.0 : 0.0)
      state.counter(
        name: "fpga_hypervisor_reconnects_total", labels: labels,
        help: "Connections to the hypervisor reopened since the start (libvirtd restarted, keepalive expired)."
      ).increment(by: Int64(connection.reconnects))
      state.gauge(
        name: "fpga_hypervisor_qemu_monitor_pause", labels: labels,
        help:
          "1 when VFIO devices are paused through libvirt's QEMU monitor passthrough (libvirt.qemu_monitor_pause; "
          + "libvirt marks each running domain tainted: custom-monitor), 0 otherwise."
      ).set(connection.monitorPause ? 1.0 : 0.0)
    }
    for (resource, registration) in kubelet.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
      state.gauge(
        name: "fpga_kubelet_registered", labels: [("resource", resource)],
        help: "1 while the kubelet has accepted the device plugin's registration."
      ).set(registration.isRegistered ? 1.0 : 0.0)
    }
    if let tracked = dra.withLock({ $0 }) {
      let figures = await tracked.driver.figures
      state.gauge(name: "fpga_dra_prepared_claims", help: "ResourceClaims prepared on the node now.")
        .set(Double(figures.preparedNow))
      for (call, result, count) in [
        ("prepare", "ok", figures.prepared), ("prepare", "failed", figures.prepareFailures),
        ("unprepare", "ok", figures.unprepared), ("unprepare", "failed", figures.unprepareFailures),
      ] {
        state.counter(
          name: "fpga_dra_claims_total", labels: [("call", call), ("result", result)],
          help:
            "Claims the kubelet asked to prepare or unprepare since the start, by answer (a batch counts each claim)."
        ).increment(by: Int64(count))
      }
      let growth = await tracked.driver.growth
      for (result, count) in [("grown", growth.grown), ("failed", growth.failed), ("refused", growth.refused)] {
        state.counter(
          name: "fpga_dra_growths_total", labels: [("result", result)],
          help:
            "PF growths for claims at Prepare (grow on demand): grown, failed (the PF left as it was), refused (the PF could not grow then)."
        ).increment(by: Int64(count))
      }
      state.counter(
        name: "fpga_dra_growth_seconds_total", help: "Time spent growing PFs for claims (successful growths)."
      ).increment(by: Int64(growth.seconds.rounded()))
      state.counter(
        name: "fpga_dra_claim_status_failures_total",
        help: "Reports of prepared devices to a claim's status.devices the API server refused (RBAC, a deleted claim)."
      ).increment(by: Int64(figures.statusFailures))
      if let publisher = tracked.publisher {
        let published = await publisher.figures
        state.gauge(name: "fpga_dra_pool_generation", help: "The generation of the node's pool of ResourceSlices.")
          .set(Double(published.generation))
        if let synced = published.lastSyncSucceeded {  // absent until the first sync ends
          state.gauge(
            name: "fpga_dra_slices_synced",
            help: "1 when the last sync brought the ResourceSlices in line with the node, 0 when it failed."
          ).set(synced ? 1.0 : 0.0)
        }
        state.counter(
          name: "fpga_dra_slice_sync_failures_total", help: "ResourceSlice syncs that failed since the start."
        ).increment(by: Int64(published.syncFailures))
      }
    }
    for (tally, count) in ended.sorted(by: { ($0.key.kind, $0.key.result) < ($1.key.kind, $1.key.result) })
    where tally.result != "planned" {
      state.counter(
        name: "fpga_agent_operations_total", labels: [("kind", tally.kind), ("result", tally.result)],
        help: "Operations (reconfigure, drain) ended since the start, by result."
      ).increment(by: Int64(count))
    }
    let gone = await engine.gonePFs
    for (pf, _) in gone.sorted(by: { $0.key < $1.key }) {
      state.gauge(
        name: "fpga_pf_health", labels: [("card", Card.id(for: pf)), ("pf", pf.description), ("state", "gone")],
        help: "1 for the PF's health now (healthy, degraded, unhealthy, gone), 0 for the others."
      ).set(1.0)
    }
    guard let snapshot else { return events.emitToString() + state.emitToString() }
    for card in snapshot.cards {
      for pf in card.pfs {
        let labels = [("card", card.card.id), ("pf", pf.function.address.description)]
        state.gauge(name: "fpga_pf_sriov_vfs", labels: labels, help: "VFs enabled on the PF (sriov_numvfs).")
          .set(Double(pf.function.numVFs))
        state.gauge(name: "fpga_pf_sriov_total_vfs", labels: labels, help: "VFs the PF supports (sriov_totalvfs).")
          .set(Double(pf.function.totalVFs))
        state.gauge(
          name: "fpga_pf_draining", labels: labels, help: "1 while the PF (or its card) takes no allocations."
        )
        .set(pf.draining || card.card.draining ? 1.0 : 0.0)
        for health in DeviceHealth.State.allCases {
          state.gauge(
            name: "fpga_pf_health", labels: labels + [("state", health.rawValue)],
            help: "1 for the PF's health now (healthy, degraded, unhealthy, gone), 0 for the others."
          ).set(pf.function.health.state == health ? 1.0 : 0.0)
        }
        if let readings = pf.function.readings {
          for (severity, count) in [
            ("correctable", readings.correctableErrors), ("nonfatal", readings.nonfatalErrors),
            ("fatal", readings.fatalErrors),
          ] {
            guard let count else { continue }
            state.counter(
              name: "fpga_pcie_aer_errors_total", labels: labels + [("aer_severity", severity)],
              help: "PCIe AER errors the kernel counted for the PF (aer_dev_*), since the device was enumerated."
            ).increment(by: Int64(clamping: count))
          }
        }
        var vfHealth: [String: Int] = [:]
        for vf in pf.vfs { vfHealth[vf.function.health.state.rawValue, default: 0] += 1 }
        for health in DeviceHealth.State.allCases {
          state.gauge(
            name: "fpga_vfs_by_health", labels: labels + [("health", health.rawValue)],
            help: "VFs of the PF by health (a VF of an unhealthy PF is unhealthy)."
          ).set(Double(vfHealth[health.rawValue] ?? 0))
        }
        var byState: [String: Int] = ["free": 0, "allocated": 0, "attached": 0, "unallocatable": 0]
        for vf in pf.vfs {
          switch vf.state {
          case .free: byState["free", default: 0] += 1
          case .allocated: byState["allocated", default: 0] += 1
          case .attached, .detaching: byState["attached", default: 0] += 1
          case .unhealthy: byState["unallocatable", default: 0] += 1
          }
        }
        for (name, count) in byState.sorted(by: { $0.key < $1.key }) {
          state.gauge(
            name: "fpga_vfs", labels: labels + [("state", name)],
            help:
              "VFs of the PF by state: free, allocated, attached (in a VM), unallocatable (unreadable or no IOMMU group)."
          ).set(Double(count))
        }
      }
    }
    var allocations = ["unattached": 0, "attached": 0, "detaching": 0]
    for allocation in snapshot.allocations {
      allocations[allocation.detaching ? "detaching" : allocation.attached ? "attached" : "unattached", default: 0] += 1
    }
    for (name, count) in allocations.sorted(by: { $0.key < $1.key }) {
      state.gauge(name: "fpga_allocations", labels: [("state", name)], help: "Allocations by state.")
        .set(Double(count))
    }
    var relaid: [Relayout.How: Int] = [:]
    for allocation in snapshot.allocations {
      if let how = allocation.lastRelayout?.how { relaid[how, default: 0] += 1 }
    }
    for how in Relayout.How.allCases {
      state.gauge(
        name: "fpga_allocations_by_last_relayout", labels: [("how", how.rawValue)],
        help:
          "Live allocations by how their device went through its PF's last re-layout: paused (the guest kept it), replugged, replugged-after-refused-resume."
      ).set(Double(relaid[how] ?? 0))
    }
    for vm in snapshot.vms {
      state.gauge(
        name: "fpga_vm_vfio_pause", labels: [("vm", vm.name)],
        help:
          "1 when the VM's QEMU can pause a VFIO device (x-vfio-pause), so a re-layout keeps its devices in the guest."
      ).set(vm.vfioPause ? 1.0 : 0.0)
    }
    for accelerator in snapshot.accelerators {
      let labels = [("accelerator", accelerator.id)]
      let metrics = accelerator.metrics
      state.gauge(
        name: "fpga_accelerator_utilization_ratio", labels: labels,
        help: "Share of the last window the accelerator ran guests' work (0-1)."
      ).set(metrics.utilization)
      state.gauge(
        name: "fpga_accelerator_switch_overhead_ratio", labels: labels,
        help: "Share of the last window spent switching contexts (0-1)."
      ).set(metrics.switchOverhead)
      state.gauge(
        name: "fpga_accelerator_switches_per_second", labels: labels,
        help: "Context switches per second over the last window."
      ).set(metrics.switchesPerSecond)
      state.gauge(
        name: "fpga_accelerator_switch_mean_seconds", labels: labels,
        help: "Mean context switch time over the last window."
      ).set(metrics.meanSwitchTime.seconds)
      state.gauge(
        name: "fpga_accelerator_wait_p50_seconds", labels: labels, help: "Median wait of a job for the accelerator."
      ).set(metrics.waitP50.seconds)
      state.gauge(
        name: "fpga_accelerator_wait_p99_seconds", labels: labels,
        help: "99th percentile wait of a job for the accelerator."
      ).set(metrics.waitP99.seconds)
      state.gauge(name: "fpga_accelerator_guests", labels: labels, help: "Guests bound to the accelerator.")
        .set(Double(accelerator.guests.count))
      state.gauge(
        name: "fpga_accelerator_overcommit_ratio", labels: labels,
        help: "Guests with work over what the accelerator serves at once."
      ).set(metrics.overcommitRatio)
      for guest in accelerator.guests {
        let guestLabels = labels + [("guest", guest.guest)]
        state.gauge(
          name: "fpga_accelerator_guest_share_ratio", labels: guestLabels,
          help: "The guest's share of the accelerator's busy time over the last window (0-1)."
        ).set(guest.share)
        state.gauge(
          name: "fpga_accelerator_guest_pending_seconds", labels: guestLabels, help: "Work the guest has queued."
        ).set(guest.pending.seconds)
      }
    }
    return events.emitToString() + state.emitToString()
  }
}

extension PrometheusCollectorRegistry {
  /// The catalog's one way to make each kind: a name (units in it), labels and help text.
  fileprivate func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
    MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
  }

  fileprivate func gauge(name: String, labels: [(String, String)] = [], help: String) -> Gauge {
    makeGauge(descriptor: descriptor(name, help), labels: labels)
  }

  fileprivate func counter(name: String, labels: [(String, String)] = [], help: String) -> Counter {
    makeCounter(descriptor: descriptor(name, help), labels: labels)
  }

  fileprivate func histogram(
    name: String, labels: [(String, String)], buckets: [Duration], help: String
  ) -> DurationHistogram {
    makeDurationHistogram(descriptor: descriptor(name, help), labels: labels, buckets: buckets)
  }
}

extension Duration {
  /// The duration in seconds, as a Double.
  package var seconds: Double {
    let (seconds, attoseconds) = components
    return Double(seconds) + Double(attoseconds) / 1e18
  }
}

/// Counts and times every RPC of a server (gRPC's status code names as the label).
package struct MetricsInterceptor: ServerInterceptor {
  package let metrics: AgentMetrics

  package func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>, context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let started = ContinuousClock.now
    let service = context.descriptor.service.fullyQualifiedService
    let method = context.descriptor.method
    do {
      let response = try await next(request, context)
      let code: String = if case .failure(let error) = response.accepted { Self.name(error.code) } else { "OK" }
      metrics.handled(service: service, method: method, code: code, after: ContinuousClock.now - started)
      return response
    } catch {
      let code = (error as? any RPCErrorConvertible)?.rpcErrorCode ?? (error as? RPCError)?.code ?? .unknown
      metrics.handled(service: service, method: method, code: Self.name(code), after: ContinuousClock.now - started)
      throw error
    }
  }

  /// `INVALID_ARGUMENT` style, as gRPC spells its codes.
  package static func name(_ code: RPCError.Code) -> String {
    var name = ""
    for character in "\(code)" {
      if character.isUppercase, !name.isEmpty { name.append("_") }
      name.append(character.uppercased())
    }
    return name
  }

  package init(metrics: AgentMetrics) {
    self.metrics = metrics
  }
}
