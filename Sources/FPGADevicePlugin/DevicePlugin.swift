import Synchronization
import FPGAAgentAPI
public import FPGACore
import Foundation
public import GRPCCore
import GRPCNIOTransportHTTP2
public import Logging
import SwiftProtobuf

/// A pool of VFs offered to Kubernetes as one extended resource.
public struct DevicePluginPool: Hashable, Sendable {
  /// `vendor-domain/type`, e.g. `xilinx.com/qdma-vf`.
  public var resourceName: String
  /// Only VFs of these PFs; empty: every VF of the node.
  public var pfs: Set<PCIAddress>

  public init(resourceName: String = "xilinx.com/qdma-vf", pfs: Set<PCIAddress> = []) {
    self.resourceName = resourceName
    self.pfs = pfs
  }

  /// The KubeVirt variable: `PCI_RESOURCE_` + the name upper-cased, `/` and `.` as `_`
  /// (KubeVirt's own rule, which keeps a `-`), and the same with `-` as `_` when that differs
  /// (the spelling shells accept): both are set, so either reader finds the BDFs.
  public var environmentVariables: [String] {
    let kubevirt =
      "PCI_RESOURCE_" + resourceName.uppercased().map { $0 == "/" || $0 == "." ? "_" : $0 }.map(String.init).joined()
    let shell = kubevirt.replacingOccurrences(of: "-", with: "_")
    return shell == kubevirt ? [kubevirt] : [shell, kubevirt]
  }

  /// The plugin's socket file name in the kubelet's directory.
  public var socketName: String {
    "fpga-agent-" + resourceName.map { $0.isLetter || $0.isNumber || $0 == "-" ? $0 : "_" }.map(String.init).joined()
      + ".sock"
  }

  /// A resource name as the kubelet accepts it: `domain/name`, a DNS-like domain.
  public static func validate(_ name: String) -> Bool {
    let parts = name.split(separator: "/", omittingEmptySubsequences: false)
    guard parts.count == 2, parts[0].contains("."), (1...63).contains(parts[1].count), name.count <= 253 else {
      return false
    }
    return name.allSatisfy {
      $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "." || $0 == "-" || $0 == "/" || $0 == "_")
    }
  }
}

/// The kubelet device plugin v1beta1 for one pool: serves `DevicePlugin` on a socket in the
/// kubelet's directory, registers with the kubelet's `Registration` service, and starts over
/// (serve, register) whenever its socket disappears, as it does when the kubelet restarts.
public struct DevicePlugin: Sendable {
  public let engine: NodeEngine
  public let pool: DevicePluginPool
  public let directory: String
  public let logger: Logger
  /// How often the socket is checked for removal.
  public var checkInterval: Duration = .seconds(1)
  /// Run around every call from the kubelet (the agent's audit trail).
  public var interceptors: [any ServerInterceptor]
  /// Whether the kubelet has accepted the current registration (for `/metrics`).
  public let registered = RegistrationState()

  public init(
    engine: NodeEngine, pool: DevicePluginPool, directory: String, logger: Logger,
    interceptors: [any ServerInterceptor] = []
  ) {
    self.engine = engine
    self.pool = pool
    self.directory = directory
    self.logger = logger
    self.interceptors = interceptors
  }

  var socketPath: String { directory + "/" + pool.socketName }
  var kubeletSocket: String { directory + "/kubelet.sock" }

  /// Serves and keeps registered until cancelled.
  public func run() async {
    defer { registered.set(false) }
    while !Task.isCancelled {
      registered.set(false)
      unlink(socketPath)
      let server = GRPCServer(
        transport: .http2NIOPosix(address: .unixDomainSocket(path: socketPath), transportSecurity: .plaintext),
        services: [DevicePluginService(engine: engine, pool: pool, logger: logger)], interceptors: interceptors)
      await withTaskGroup(of: Void.self) { group in
        group.addTask {
          do {
            try await server.serve()
          } catch {
            logger.error("device plugin server failed", metadata: ["fpga.error": "\(error)"])
          }
        }
        _ = try? await server.listeningAddress
        await registerUntilDone()
        // The kubelet deletes every socket of the directory when it restarts: then serve anew.
        while !Task.isCancelled, FileManager.default.fileExists(atPath: socketPath) {
          try? await Task.sleep(for: checkInterval)
        }
        if !Task.isCancelled {
          logger.warning(
            "device plugin socket removed (kubelet restart?): serving and registering again",
            metadata: ["fpga.resource": "\(pool.resourceName)"])
        }
        server.beginGracefulShutdown()
        await group.waitForAll()
      }
    }
    unlink(socketPath)
  }

  /// Registers with the kubelet, retrying with backoff while it is not there.
  func registerUntilDone() async {
    var delay = Duration.milliseconds(200)
    while !Task.isCancelled, FileManager.default.fileExists(atPath: socketPath) {
      do {
        try await register()
        registered.set(true)
        logger.info(
          "registered with the kubelet",
          metadata: ["fpga.resource": "\(pool.resourceName)", "fpga.endpoint": "\(pool.socketName)"])
        return
      } catch {
        logger.warning(
          "kubelet registration failed; retrying", metadata: ["fpga.error": "\(error)", "fpga.retry_in": "\(delay)"])
        try? await Task.sleep(for: delay)
        delay = min(delay * 2, .seconds(10))
      }
    }
  }

  func register() async throws {
    let transport = try HTTP2ClientTransport.Posix(
      target: .unixDomainSocket(path: kubeletSocket), transportSecurity: .plaintext)
    try await withGRPCClient(transport: transport) { client in
      var options = CallOptions.defaults
      options.timeout = .seconds(5)
      _ = try await V1beta1_Registration.Client(wrapping: client).register(
        .with {
          $0.version = "v1beta1"
          $0.endpoint = pool.socketName
          $0.resourceName = pool.resourceName
          $0.options = DevicePluginService.options
        }, options: options)
    }
  }
}

/// The `DevicePlugin` service for one pool.
struct DevicePluginService: V1beta1_DevicePlugin.ServiceProtocol {
  let engine: NodeEngine
  let pool: DevicePluginPool
  let logger: Logger

  static let options = V1beta1_DevicePluginOptions.with {
    $0.preStartRequired = false
    $0.getPreferredAllocationAvailable = true
  }

  func getDevicePluginOptions(
    request: ServerRequest<V1beta1_Empty>, context: ServerContext
  ) async throws -> ServerResponse<V1beta1_DevicePluginOptions> {
    ServerResponse(message: Self.options)
  }

  /// The pool's VFs: healthy when they can be passed through, their PF and card take
  /// allocations, and nobody but the kubelet holds them.
  static func devices(_ snapshot: InventorySnapshot, pool: DevicePluginPool) -> [V1beta1_Device] {
    var devices: [V1beta1_Device] = []
    for card in snapshot.cards {
      for pf in card.pfs where pool.pfs.isEmpty || pool.pfs.contains(pf.function.address) {
        for view in pf.vfs {
          let vf = view.function
          let owner = snapshot.allocations.first { $0.id == view.allocationID }?.owner
          let healthy =
            vf.isPassthroughCapable && !pf.draining && !card.card.draining && view.state != .unhealthy
            && (owner == nil || owner == "kubelet")
          devices.append(
            .with {
              $0.id = vf.address.description
              $0.health = healthy ? "Healthy" : "Unhealthy"
              if vf.numaNode >= 0 { $0.topology.nodes = [.with { $0.id = Int64(vf.numaNode) }] }
            })
        }
      }
    }
    return devices
  }

  func listAndWatch(
    request: ServerRequest<V1beta1_Empty>, context: ServerContext
  ) async throws -> StreamingServerResponse<V1beta1_ListAndWatchResponse> {
    StreamingServerResponse { writer in
      let subscription = await engine.watch(from: 0)
      var last: [V1beta1_Device]?
      try await withRPCCancellationHandler {
        for await event in subscription.events {
          // VM and accelerator changes do not change what the kubelet sees.
          if case .delta(_, let changes) = event, !changes.contains(where: Self.touchesDevices) { continue }
          let devices = Self.devices(try await engine.snapshot(), pool: pool)
          if devices != last {
            try await writer.write(.with { $0.devices = devices })
            last = devices
          }
        }
      } onCancelRPC: {
        subscription.cancel()
      }
      return [:]
    }
  }

  static func touchesDevices(_ change: InventoryChange) -> Bool {
    switch change {
    case .vmUpdated, .vmRemoved, .acceleratorUpdated, .acceleratorRemoved: false
    default: true
    }
  }

  func getPreferredAllocation(
    request: ServerRequest<V1beta1_PreferredAllocationRequest>, context: ServerContext
  ) async throws -> ServerResponse<V1beta1_PreferredAllocationResponse> {
    let snapshot = try await engine.snapshot()
    var numa: [String: Int] = [:]
    var pfOf: [String: String] = [:]
    for card in snapshot.cards {
      for pf in card.pfs {
        for vf in pf.vfs {
          numa[vf.function.address.description] = vf.function.numaNode
          pfOf[vf.function.address.description] = pf.function.address.description
        }
      }
    }
    let responses = request.message.containerRequests.map { container in
      V1beta1_ContainerPreferredAllocationResponse.with {
        $0.deviceIds = Self.prefer(
          available: container.availableDeviceIds, mustInclude: container.mustIncludeDeviceIds,
          size: Int(container.allocationSize), numa: numa, pf: pfOf)
      }
    }
    return ServerResponse(message: .with { $0.containerResponses = responses })
  }

  /// Packs by NUMA node, then by PF: the must-include devices first, then the NUMA node and PF
  /// they use (or the fullest ones), so a pod's VFs share as few PFs and NUMA nodes as possible.
  static func prefer(
    available: [String], mustInclude: [String], size: Int, numa: [String: Int], pf: [String: String]
  ) -> [String] {
    var chosen = mustInclude
    var rest = available.filter { !chosen.contains($0) }
    let byNUMA = Dictionary(grouping: rest, by: { numa[$0] ?? -1 })
    let byPF = Dictionary(grouping: rest, by: { pf[$0] ?? "" })
    let wantedNUMA =
      chosen.first.flatMap { numa[$0] }
      ?? byNUMA.max { ($0.value.count, -$0.key) < ($1.value.count, -$1.key) }?.key
    let wantedPFs = Set(chosen.compactMap { pf[$0] })
    rest.sort { a, b in
      let keyA = (
        numa[a] == wantedNUMA ? 0 : 1, wantedPFs.contains(pf[a] ?? "") ? 0 : 1, -(byPF[pf[a] ?? ""]?.count ?? 0),
        pf[a] ?? "", a
      )
      let keyB = (
        numa[b] == wantedNUMA ? 0 : 1, wantedPFs.contains(pf[b] ?? "") ? 0 : 1, -(byPF[pf[b] ?? ""]?.count ?? 0),
        pf[b] ?? "", b
      )
      return keyA < keyB
    }
    while chosen.count < size, !rest.isEmpty { chosen.append(rest.removeFirst()) }
    return chosen
  }

  func allocate(
    request: ServerRequest<V1beta1_AllocateRequest>, context: ServerContext
  ) async throws -> ServerResponse<V1beta1_AllocateResponse> {
    var responses: [V1beta1_ContainerAllocateResponse] = []
    let snapshot = try await engine.snapshot()
    let pool = Set(
      snapshot.cards.flatMap(\.pfs).filter { self.pool.pfs.isEmpty || self.pool.pfs.contains($0.function.address) }
        .flatMap(\.vfs).map(\.function.address))
    for container in request.message.containerRequests {
      var specs: [V1beta1_DeviceSpec] = [
        .with {
          $0.containerPath = "/dev/vfio/vfio"
          $0.hostPath = "/dev/vfio/vfio"
          $0.permissions = "mrw"
        }
      ]
      var addresses: [String] = []
      for id in container.devicesIds {
        let vf = try PCIAddress.parse(id, field: "devices_ids")
        guard pool.contains(vf) else {
          throw AgentError(.notFound, "device \(id) is not a VF of pool \(self.pool.resourceName)")
        }
        let (_, device) = try await engine.allocateForKubelet(vf: vf)
        specs.append(
          .with {
            $0.containerPath = device
            $0.hostPath = device
            $0.permissions = "mrw"
          })
        addresses.append(vf.description)
      }
      logger.info("kubelet allocated VFs", metadata: ["fpga.vfs": "\(addresses.joined(separator: ","))"])
      responses.append(
        .with {
          $0.devices = specs
          let value = addresses.joined(separator: ",")
          $0.envs = Dictionary(uniqueKeysWithValues: self.pool.environmentVariables.map { ($0, value) })
        })
    }
    return ServerResponse(message: .with { $0.containerResponses = responses })
  }

  func preStartContainer(
    request: ServerRequest<V1beta1_PreStartContainerRequest>, context: ServerContext
  ) async throws -> ServerResponse<V1beta1_PreStartContainerResponse> {
    ServerResponse(message: .init())
  }
}

/// A registration's state, shared with whoever reports it.
public final class RegistrationState: Sendable {
  private let state = Mutex(false)
  public init() {}
  public var isRegistered: Bool { state.withLock { $0 } }
  func set(_ value: Bool) { state.withLock { $0 = value } }
}
