import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import FPGACore
import FPGADRA
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import ServiceLifecycle

/// The DRA driver as a service of the agent: restores its journal (and CDI specs), serves the
/// registration socket and the plugin socket to the kubelet, and keeps the node's ResourceSlices
/// in line with the inventory (at every change, and every 10 s to bring back slices someone
/// deleted). On shutdown both sockets go, so the kubelet sees the driver gone.
struct DRAService: Service {
  let settings: DRASettings
  let driver: DRADriver
  let engine: NodeEngine
  let publisher: SlicePublisher?
  let api: KubernetesAPI?
  /// The kubelet's calls are counted and timed like the node API's (`grpc_server_*`).
  let metrics: AgentMetrics?
  /// Where its Prepare and Unprepare calls are audited (transport `dra`).
  let audit: AuditLog?
  let logger: Logger
  var fenceLimit: Duration = .seconds(10)
  var resync: Duration = .seconds(10)

  func run() async throws {
    try await driver.restore()
    try SystemCalls.makeDirectories(settings.registryDir)
    try SystemCalls.makeDirectories(settings.pluginDirectory)
    for socket in [settings.registrationSocket, settings.pluginSocket] { try SystemCalls.prepareUnixSocketPath(socket) }
    let plugin = GRPCServer(
      transport: .http2NIOPosix(address: .unixDomainSocket(path: settings.pluginSocket), transportSecurity: .plaintext),
      services: [
        DRAPlugins.v1(driver), DRAPlugins.v1beta1(driver), DRAPlugins.healthV1(engine, pool: settings.nodeName),
        DRAPlugins.healthV1alpha1(engine, pool: settings.nodeName),
      ],
      interceptors: (metrics.map { [MetricsInterceptor(metrics: $0)] } ?? [])
        + (audit.map { [KubeletAuditInterceptor.dra(audit: $0, engine: engine)] } ?? []))
    let registration = GRPCServer(
      transport: .http2NIOPosix(
        address: .unixDomainSocket(path: settings.registrationSocket), transportSecurity: .plaintext),
      services: [DRAPlugins.registration(settings, logger: logger)])
    defer {
      SystemCalls.removeSocket(settings.registrationSocket)
      SystemCalls.removeSocket(settings.pluginSocket)
    }
    logger.info(
      "DRA driver serving",
      metadata: [
        "fpga.driver": "\(settings.driverName)", "fpga.registration": "\(settings.registrationSocket)",
        "fpga.endpoint": "\(settings.pluginSocket)", "fpga.slices": "\(publisher != nil)",
      ])
    try await withGracefulShutdownHandler {
      try await withThrowingDiscardingTaskGroup { group in
        group.addTask { try await plugin.serve() }
        group.addTask {
          // Registration last: the kubelet dials the endpoint as soon as it sees this socket.
          _ = try await plugin.listeningAddress
          try await registration.serve()
        }
        if let publisher, fenceLimit > .zero {
          // A reconfiguration first publishes its PF's VFs tainted (for at most `fenceLimit`),
          // so the scheduler stops choosing them before any of them goes.
          await engine.fenceReconfigurations { [logger, fenceLimit] pf in
            let published = await Self.within(fenceLimit) { (try? await publisher.sync()) != nil }
            if !published {
              logger.warning(
                "reconfiguration goes on before its VFs' taints were published",
                metadata: ["fpga.pf": "\(pf)", "fpga.limit": "\(fenceLimit)"])
            }
          }
        }
        if let publisher, settings.growth != nil {
          await publisher.offerGrowth { [driver] snapshot in await driver.growablePFs(snapshot) }
          await driver.observeGrowths { _ = try? await publisher.sync() }
        }
        if let publisher { group.addTask { await self.publish(publisher) } }
      }
    } onGracefulShutdown: {
      registration.beginGracefulShutdown()
      plugin.beginGracefulShutdown()
    }
    await api?.shutdown()
  }

  /// `work`'s answer if it comes within `limit`, else false at `limit`; late work goes on on its
  /// own. (A task group would wait for it: a sync queued behind one stuck on the API server
  /// would hold the reconfiguration far past its limit.)
  static func within(_ limit: Duration, _ work: @escaping @Sendable () async -> Bool) async -> Bool {
    let (answers, answer) = AsyncStream.makeStream(of: Bool.self, bufferingPolicy: .bufferingOldest(1))
    Task { answer.yield(await work()) }
    let timer = Task {
      try? await Task.sleep(for: limit)
      answer.yield(false)
    }
    var first = answers.makeAsyncIterator()
    let result = await first.next() ?? false
    timer.cancel()
    answer.finish()
    return result
  }

  /// Syncs the slices now, after every inventory change (coalesced), and every `resync`.
  private func publish(_ publisher: SlicePublisher) async {
    let (wakeups, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    await withDiscardingTaskGroup { group in
      group.addTask {
        let subscription = await engine.watch(from: await engine.revision)
        for await _ in subscription.events.cancelOnGracefulShutdown() { wake.yield() }
        subscription.cancel()
        wake.finish()
      }
      group.addTask {
        for await _ in PeriodicTicks(interval: resync).cancelOnGracefulShutdown() { wake.yield() }
      }
      wake.yield()
      var failures = 0
      for await _ in wakeups.cancelOnGracefulShutdown() {
        do {
          try await publisher.sync()
          failures = 0
        } catch {
          failures += 1
          if failures == 1 || failures % 30 == 0 {
            logger.error(
              "cannot publish ResourceSlices", metadata: ["fpga.error": "\(error)", "fpga.attempts": "\(failures)"])
          }
        }
      }
      group.cancelAll()
    }
  }
}

/// Claims cannot be read: no API configured.
struct NoKubernetesAPI: ClaimSource {
  func resourceClaim(namespace: String, name: String) async throws -> Kube.ResourceClaim {
    throw DRAFailure(
      "no Kubernetes API is configured: give a kubeconfig (--kubeconfig, KUBECONFIG) or kubernetes.api.server (--kube-api-server), or run in a pod (KUBERNETES_SERVICE_HOST)"
    )
  }

  /// Nothing to report to: a claim prepared before the API was unset is unprepared all the same.
  func reportDevices(_ devices: [Kube.AllocatedDeviceStatus], of claim: ClaimReference, driver: String) async throws {}
}
