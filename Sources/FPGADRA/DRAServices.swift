import Foundation
public import FPGACore
public import GRPCCore
public import Logging
import SwiftProtobuf

/// `pluginregistration.Registration` on `<registry>/<driver>-reg.sock`: how the kubelet's plugin
/// watcher learns the driver's name, endpoint and the versions it speaks (v1 first).
struct RegistrationService: Pluginregistration_Registration.SimpleServiceProtocol {
  let settings: DRASettings
  let logger: Logger

  static let versions = ["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth"]

  func getInfo(request: Pluginregistration_InfoRequest, context: ServerContext) async throws
    -> Pluginregistration_PluginInfo
  {
    .with {
      $0.type = "DRAPlugin"
      $0.name = settings.driverName
      $0.endpoint = settings.pluginSocket
      $0.supportedVersions = Self.versions
    }
  }

  func notifyRegistrationStatus(
    request: Pluginregistration_RegistrationStatus, context: ServerContext
  ) async throws -> Pluginregistration_RegistrationStatusResponse {
    if request.pluginRegistered {
      logger.info("registered with the kubelet as a DRA driver", metadata: ["fpga.driver": "\(settings.driverName)"])
    } else {
      logger.error("the kubelet refused the DRA driver's registration", metadata: ["fpga.error": "\(request.error)"])
    }
    return .init()
  }
}

/// `k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin`.
struct DRAPluginV1: K8s_Io_Kubelet_Pkg_Apis_Dra_V1_DRAPlugin.SimpleServiceProtocol {
  let driver: DRADriver

  func nodePrepareResources(
    request: K8s_Io_Kubelet_Pkg_Apis_Dra_V1_NodePrepareResourcesRequest, context: ServerContext
  ) async throws -> K8s_Io_Kubelet_Pkg_Apis_Dra_V1_NodePrepareResourcesResponse {
    let results = await driver.prepare(
      request.claims.map { ClaimReference(namespace: $0.namespace, uid: $0.uid, name: $0.name) })
    return .with { response in
      for (uid, result) in results {
        response.claims[uid] = .with { claim in
          switch result {
          case .success(let devices):
            claim.devices = devices.map { device in
              .with {
                $0.requestNames = [device.request]
                $0.poolName = device.pool
                $0.deviceName = device.device
                $0.cdiDeviceIds = [device.cdiID]
                if let share = device.shareID { $0.shareID = share }
              }
            }
          case .failure(let error): claim.error = error.message
          }
        }
      }
    }
  }

  func nodeUnprepareResources(
    request: K8s_Io_Kubelet_Pkg_Apis_Dra_V1_NodeUnprepareResourcesRequest, context: ServerContext
  ) async throws -> K8s_Io_Kubelet_Pkg_Apis_Dra_V1_NodeUnprepareResourcesResponse {
    let results = await driver.unprepare(
      request.claims.map { ClaimReference(namespace: $0.namespace, uid: $0.uid, name: $0.name) })
    return .with { response in
      for (uid, failure) in results { response.claims[uid] = .with { $0.error = failure?.message ?? "" } }
    }
  }
}

/// `k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin` (kubelets 1.32-1.33): the v1 service, its
/// messages translated through the wire format (same names and numbers; no share ids).
struct DRAPluginV1beta1: K8s_Io_Kubelet_Pkg_Apis_Dra_V1beta1_DRAPlugin.SimpleServiceProtocol {
  let v1: DRAPluginV1

  func nodePrepareResources(
    request: K8s_Io_Kubelet_Pkg_Apis_Dra_V1beta1_NodePrepareResourcesRequest, context: ServerContext
  ) async throws -> K8s_Io_Kubelet_Pkg_Apis_Dra_V1beta1_NodePrepareResourcesResponse {
    var response = try await v1.nodePrepareResources(request: WireTranslation.convert(request), context: context)
    for (uid, var claim) in response.claims {
      for index in claim.devices.indices { claim.devices[index].clearShareID() }
      response.claims[uid] = claim
    }
    return try WireTranslation.convert(response)
  }

  func nodeUnprepareResources(
    request: K8s_Io_Kubelet_Pkg_Apis_Dra_V1beta1_NodeUnprepareResourcesRequest, context: ServerContext
  ) async throws -> K8s_Io_Kubelet_Pkg_Apis_Dra_V1beta1_NodeUnprepareResourcesResponse {
    try WireTranslation.convert(
      try await v1.nodeUnprepareResources(request: WireTranslation.convert(request), context: context))
  }
}

/// The kubelet's older API versions (DRAPlugin v1beta1, DRAResourceHealth v1alpha1) have the v1
/// messages' field names and numbers, so one implementation serves all: a message is re-read as
/// its counterpart from its bytes.
enum WireTranslation {
  static func convert<Target: SwiftProtobuf.Message>(_ message: some SwiftProtobuf.Message) throws -> Target {
    try Target(serializedBytes: message.serializedBytes() as [UInt8])
  }
}

/// The devices' health for the kubelet (`DRAResourceHealth`): the complete list at once, then
/// again after every change of a device.
enum DeviceHealthFeed {
  struct Entry: Hashable {
    var device: String
    var healthy: Bool
    var message: String
  }

  static func entries(_ snapshot: InventorySnapshot) -> [Entry] {
    snapshot.cards.flatMap(\.pfs).flatMap(\.vfs).map { view in
      let health = view.function.health
      return Entry(
        device: DeviceNames.name(of: view.function.address), healthy: view.function.isPassthroughCapable,
        message: String(
          (health.summary.isEmpty ? health.state.rawValue : "\(health.state.rawValue): \(health.summary)").prefix(1024))
      )
    }
  }

  /// Runs `write` with the list now and after each change, until the stream ends.
  static func stream(_ engine: NodeEngine, _ write: ([Entry]) async throws -> Void) async throws {
    let subscription = await engine.watch(from: await engine.revision)
    defer { subscription.cancel() }
    var last: [Entry]?
    let now = try await entries(engine.snapshot())
    try await write(now)
    last = now
    for await event in subscription.events {
      if case .delta(_, let changes) = event, !changes.contains(where: touchesDevices) { continue }
      let current = entries(try await engine.snapshot())
      if current != last {
        try await write(current)
        last = current
      }
    }
  }

  static func touchesDevices(_ change: InventoryChange) -> Bool {
    switch change {
    case .vmUpdated, .vmRemoved, .acceleratorUpdated, .acceleratorRemoved: false
    default: true
    }
  }
}

struct HealthV1: V1_DRAResourceHealth.ServiceProtocol {
  let engine: NodeEngine
  let pool: String

  func nodeWatchResources(
    request: ServerRequest<V1_NodeWatchResourcesRequest>, context: ServerContext
  ) async throws -> StreamingServerResponse<V1_NodeWatchResourcesResponse> {
    StreamingServerResponse { writer in
      try await DeviceHealthFeed.stream(engine) { try await writer.write(message($0)) }
      return [:]
    }
  }

  func message(_ entries: [DeviceHealthFeed.Entry]) -> V1_NodeWatchResourcesResponse {
    let now = Int64(Date().timeIntervalSince1970)
    return .with {
      $0.devices = entries.map { entry in
        .with {
          $0.device = .with {
            $0.poolName = pool
            $0.deviceName = entry.device
          }
          $0.health = entry.healthy ? .healthy : .unhealthy
          $0.lastUpdatedTime = now
          $0.message = entry.message
        }
      }
    }
  }
}

/// `v1alpha1.DRAResourceHealth` (kubelets 1.34-1.36): the v1 messages, translated.
struct HealthV1alpha1: V1alpha1_DRAResourceHealth.ServiceProtocol {
  let v1: HealthV1

  func nodeWatchResources(
    request: ServerRequest<V1alpha1_NodeWatchResourcesRequest>, context: ServerContext
  ) async throws -> StreamingServerResponse<V1alpha1_NodeWatchResourcesResponse> {
    StreamingServerResponse { writer in
      try await DeviceHealthFeed.stream(v1.engine) { try await writer.write(WireTranslation.convert(v1.message($0))) }
      return [:]
    }
  }
}

/// The services the DRA sockets serve, for the agent's wiring.
public enum DRAPlugins {
  public static func registration(_ settings: DRASettings, logger: Logger) -> any RegistrableRPCService {
    RegistrationService(settings: settings, logger: logger)
  }
  public static func v1(_ driver: DRADriver) -> any RegistrableRPCService { DRAPluginV1(driver: driver) }
  public static func v1beta1(_ driver: DRADriver) -> any RegistrableRPCService {
    DRAPluginV1beta1(v1: DRAPluginV1(driver: driver))
  }
  public static func healthV1(_ engine: NodeEngine, pool: String) -> any RegistrableRPCService {
    HealthV1(engine: engine, pool: pool)
  }
  public static func healthV1alpha1(_ engine: NodeEngine, pool: String) -> any RegistrableRPCService {
    HealthV1alpha1(v1: HealthV1(engine: engine, pool: pool))
  }
}
