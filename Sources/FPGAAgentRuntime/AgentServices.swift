import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
import Foundation
import FPGACore
import FPGADevicePlugin
import FPGADRA
import FPGALinux
import FPGALibvirt
import FPGAQEMU
import FPGASimulator
import FPGAStore
import GRPCCore
import GRPCInProcessTransport
import GRPCNIOTransportHTTP2
import NIOCertificateReloading
import NIOCore
import Synchronization
import Logging
import ServiceLifecycle
import UnixSignals

/// A gRPC server as a lifecycle service.
struct ServerService: Service {
  let server: GRPCServer<HTTP2ServerTransport.Posix>
  let name: String
  var socketPath: String? = nil
  var socketGroup = ""
  var logger: Logger? = nil

  func run() async throws {
    defer { socketPath.map(SystemCalls.removeSocket) }
    try await withGracefulShutdownHandler {
      try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await server.serve() }
        if let socketPath {
          // Created under the agent's umask (0077); opened to its group once bound.
          _ = try? await server.listeningAddress
          do {
            try SystemCalls.openSocketToGroup(socketPath, group: socketGroup)
          } catch {
            logger?.error("the Unix socket stays 0600", metadata: ["fpga.error": "\(error)"])
          }
        }
        try await group.waitForAll()
      }
    } onGracefulShutdown: {
      server.beginGracefulShutdown()
    }
  }
}

/// The node API served in-process (`InProcessTransport`), in the same ServiceGroup.
struct InProcessServerService: Service {
  let server: GRPCServer<InProcessTransport.Server>

  func run() async throws {
    try await withGracefulShutdownHandler {
      try await server.serve()
    } onGracefulShutdown: {
      server.beginGracefulShutdown()
    }
  }
}

/// Node upkeep: marks the node SERVING, rescans periodically, and on shutdown marks it
/// NOT_SERVING and ends every watch stream before the servers close.
struct NodeService: Service {
  let engine: NodeEngine
  let health: HealthService
  let logger: Logger
  let rescanInterval: Duration?

  func run() async throws {
    await updateHealth()
    if let rescanInterval {
      for await _ in PeriodicTicks(interval: rescanInterval).cancelOnGracefulShutdown() {
        do {
          let before = await engine.revision
          let after = try await engine.rescan()
          if after != before { logger.info("rescan found changes", metadata: ["fpga.revision": "\(after)"]) }
        } catch {
          logger.error("rescan failed", metadata: ["fpga.error": "\(error)"])
        }
        await updateHealth()
      }
    } else {
      try? await gracefulShutdown()
    }
    logger.info("shutting down: health NOT_SERVING, ending watch streams")
    health.setAll(.notServing)
    health.finishWatches()
    await engine.close()
  }

  private func updateHealth() async {
    let status = await engine.status()
    let serving: HealthService.Status = status.health == .notServing ? .notServing : .serving
    health.setAll(serving)
  }
}

/// Ticks every `interval` until cancelled.
struct PeriodicTicks: AsyncSequence, Sendable {
  let interval: Duration

  struct AsyncIterator: AsyncIteratorProtocol {
    let interval: Duration
    mutating func next() async -> Void? {
      do {
        try await Task.sleep(for: interval)
        return ()
      } catch {
        return nil
      }
    }
  }

  func makeAsyncIterator() -> AsyncIterator { AsyncIterator(interval: interval) }
}

/// Accelerator upkeep: the workload generator's guests (registered as contexts, then a job every
/// interval) and the figures refreshed in the inventory every interval.
struct AcceleratorService: Service {
  let engine: NodeEngine
  let logger: Logger
  let interval: Duration
  let workloads: [AgentConfig.Workload]

  func run() async throws {
    for workload in workloads {
      do {
        _ = try await engine.registerContext(
          .init(
            acceleratorID: workload.accelerator, guest: workload.guest, function: workload.function,
            savedStateBytes: UInt64(workload.stateBytes), weight: UInt32(workload.weight)))
      } catch {
        logger.warning(
          "workload guest not started", metadata: ["fpga.guest": "\(workload.guest)", "fpga.error": "\(error)"])
      }
    }
    await withDiscardingTaskGroup { group in
      // The accelerators' scheduling loops, owned by this service: they end with it.
      group.addTask { await cancelWhenGracefulShutdown { await engine.runAccelerators() } }
      for workload in workloads {
        group.addTask {
          for await _ in PeriodicTicks(interval: .milliseconds(workload.intervalMilliseconds))
            .cancelOnGracefulShutdown()
          {
            await engine.submitWork(
              guest: workload.guest, acceleratorID: workload.accelerator, work: .milliseconds(workload.jobMilliseconds))
          }
        }
      }
      group.addTask {
        for await _ in PeriodicTicks(interval: interval).cancelOnGracefulShutdown() {
          await engine.refreshAccelerators()
        }
      }
    }
  }
}

/// One device plugin pool as a lifecycle service.
struct DevicePluginLifecycle: Service {
  let plugin: DevicePlugin

  func run() async throws {
    await cancelWhenGracefulShutdown {
      await plugin.run()
    }
  }
}

/// Counts one listener's connections and closes those over the limit at once, with a warning
/// now and then.
final class ConnectionLimiter: Sendable {
  let limit: Int
  let name: String
  private let logger: Logger
  private let state = Mutex((open: 0, refused: 0))

  init(limit: Int, name: String, logger: Logger) {
    self.limit = limit
    self.name = name
    self.logger = logger
  }

  /// Counts `channel` in, or closes it when the listener is full (returns false).
  func accept(_ channel: any Channel) -> Bool {
    let (admitted, refused) = state.withLock { state -> (Bool, Int) in
      guard state.open < limit else {
        state.refused += 1
        return (false, state.refused)
      }
      state.open += 1
      return (true, state.refused)
    }
    guard admitted else {
      if refused == 1 || refused % 1000 == 0 {
        logger.warning(
          "connection closed at accept: server.max_connections reached",
          metadata: ["fpga.listener": "\(name)", "fpga.limit": "\(limit)", "fpga.refused": "\(refused)"])
      }
      channel.close(promise: nil)
      return false
    }
    channel.closeFuture.whenComplete { _ in self.state.withLock { $0.open -= 1 } }
    return true
  }

  var open: Int { state.withLock { $0.open } }
}

/// Closes a connection that sends nothing (not even the HTTP/2 preface) within `timeout`;
/// once a byte has come, it only passes data on. gRPC's own idle timer takes over from there.
final class FirstByteTimeout: ChannelInboundHandler {
  typealias InboundIn = ByteBuffer
  typealias InboundOut = ByteBuffer

  private let timeout: TimeAmount
  private var timer: Scheduled<Void>?

  init(timeout: TimeAmount) { self.timeout = timeout }

  func handlerAdded(context: ChannelHandlerContext) {
    let channel = context.channel
    timer = context.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
  }

  func handlerRemoved(context: ChannelHandlerContext) {
    timer?.cancel()
    timer = nil
  }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    if let timer {
      timer.cancel()
      self.timer = nil
    }
    context.fireChannelRead(data)
  }
}

/// A listener's port, set once it is bound.
final class BoundPort: Sendable {
  private let port = Mutex<Int?>(nil)
  var value: Int? { port.withLock { $0 } }
  func set(_ value: Int) { port.withLock { $0 = value } }
}

/// Rescans when the kernel says a PCI device came, went, or changed driver: a card that falls
/// off the bus is noticed in milliseconds, not at the next periodic rescan (which stays as the
/// safety net). Bursts (a VF count change makes one event per VF) coalesce into one rescan.
struct DeviceEventsService: Service {
  let engine: NodeEngine
  let source: any UeventSource
  let logger: Logger

  func run() async throws {
    let (wakeups, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    let logger = logger
    try await withThrowingDiscardingTaskGroup { group in
      group.addTask {
        for await event in source.events().cancelOnGracefulShutdown() where event.concernsPCIDevices {
          logger.debug(
            "uevent",
            metadata: [
              "fpga.action": "\(event.action)", "fpga.device": "\(event.pciSlot?.description ?? event.devpath)",
            ])
          wake.yield()
        }
        wake.finish()
      }
      for await _ in wakeups.cancelOnGracefulShutdown() {
        do {
          let before = await engine.revision
          let after = try await engine.rescan()
          if after != before {
            logger.info("device event: rescan found changes", metadata: ["fpga.revision": "\(after)"])
          }
        } catch {
          logger.error("rescan after a device event failed", metadata: ["fpga.error": "\(error)"])
        }
      }
      group.cancelAll()
    }
  }
}

/// Keeps the libvirt connection open (reconnecting with backoff after libvirtd restarts) and
/// rescans when libvirt reports a change: a domain destroyed, started, paused or resumed, a
/// device added or removed, the connection lost or regained. Bursts coalesce into one rescan;
/// the periodic rescan stays as the safety net.
struct HypervisorEventsService: Service {
  let engine: NodeEngine
  let hypervisor: LibvirtHypervisor
  let logger: Logger

  func run() async throws {
    let logger = logger
    await withDiscardingTaskGroup { group in
      let uri = hypervisor.connectionStatus.uri
      group.addTask {
        await hypervisor.maintainConnection { event in
          switch event {
          case .connected(let reconnects):
            if reconnects == 0 {
              logger.info("connected to libvirt", metadata: ["fpga.libvirt.uri": "\(uri)"])
            } else {
              logger.notice(
                "reconnected to libvirt: its VMs are reachable again",
                metadata: ["fpga.libvirt.uri": "\(uri)", "fpga.libvirt.reconnects": "\(reconnects)"])
            }
          case .lost(let reason):
            logger.warning(
              "lost the connection to libvirt: its VMs are unreachable until the agent reconnects",
              metadata: ["fpga.libvirt.uri": "\(uri)", "fpga.error": "\(reason)"])
          case .failed(let reason, let repeated):
            // The first failure in a row and every new reason; the rest at debug level.
            if !repeated {
              logger.warning(
                "cannot connect to libvirt; retrying with backoff",
                metadata: ["fpga.libvirt.uri": "\(uri)", "fpga.error": "\(reason)"])
            } else {
              logger.debug("still cannot connect to libvirt", metadata: ["fpga.error": "\(reason)"])
            }
          }
        }
      }
      for await _ in hypervisor.changes.cancelOnGracefulShutdown() {
        do {
          let before = await engine.revision
          let after = try await engine.rescan()
          if after != before {
            logger.info("libvirt event: rescan found changes", metadata: ["fpga.revision": "\(after)"])
          }
        } catch {
          logger.error("rescan after a libvirt event failed", metadata: ["fpga.error": "\(error)"])
        }
      }
      group.cancelAll()
    }
  }
}
