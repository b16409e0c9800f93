package import FPGAAgentConfig
package import FPGAAgentAPI
package import GRPCCore
package import GRPCInProcessTransport
import ServiceLifecycle

/// The node API as the agent's own doors reach it: the orchestrator link's commands (and, like
/// them, any caller the agent itself speaks for) go through a gRPC server with the same services
/// and the same interceptors as the sockets (metrics, authorization, audit, deadlines, error
/// mapping), over an in-process transport only the agent holds. The door says who calls in the
/// call's metadata; the server trusts it because nothing outside the process can reach it.
package struct NodeDoor: Sendable {
  package static let identityHeader = "fpga-door-identity"
  package static let transportHeader = "fpga-door-transport"
  package static let roleHeader = "fpga-door-role"
  package static let commandHeader = "fpga-door-command-id"

  package let client: GRPCClient<InProcessTransport.Client>
  package let server: GRPCServer<InProcessTransport.Server>

  package var node: Fpga_Agent_V1_NodeAgent.Client<InProcessTransport.Client> { .init(wrapping: client) }

  package init(services: [any RegistrableRPCService], interceptors: [any ServerInterceptor]) {
    let transport = InProcessTransport()
    server = GRPCServer(transport: transport.server, services: services, interceptors: interceptors)
    client = GRPCClient(transport: transport.client)
  }

  /// The metadata of a call made for `identity` (the audit trail's identity), arriving over
  /// `transport` (`link`, `http`), with `role` (nil: none, refused), and the orchestrator's
  /// command id when there is one.
  package static func metadata(identity: String, transport: String, role: Role?, commandID: String? = nil) -> Metadata {
    var metadata = Metadata()
    metadata.addString(identity, forKey: identityHeader)
    metadata.addString(transport, forKey: transportHeader)
    if let role { metadata.addString(role.rawValue, forKey: roleHeader) }
    if let commandID { metadata.addString(commandID, forKey: commandHeader) }
    return metadata
  }

  /// Who calls, as the door said; nil (unauthenticated) when it said nothing.
  package static func caller(_ metadata: Metadata) -> Caller? {
    guard let identity = metadata[stringValues: identityHeader].first(where: { _ in true }),
      let transport = metadata[stringValues: transportHeader].first(where: { _ in true })
    else { return nil }
    let role = metadata[stringValues: roleHeader].first(where: { _ in true }).flatMap(Role.init(rawValue:))
    return Caller(identity: identity, transport: transport, role: role)
  }

  package static func commandID(_ metadata: Metadata) -> String? {
    metadata[stringValues: commandHeader].first(where: { _ in true })
  }
}

/// Serves the door and keeps its client connected; both end with the agent.
package struct NodeDoorService: Service {
  package let door: NodeDoor

  package func run() async throws {
    try await withGracefulShutdownHandler {
      try await withThrowingDiscardingTaskGroup { group in
        group.addTask { try await door.server.serve() }
        group.addTask { try await door.client.runConnections() }
      }
    } onGracefulShutdown: {
      door.client.beginGracefulShutdown()
      door.server.beginGracefulShutdown()
    }
  }

  package init(door: NodeDoor) {
    self.door = door
  }
}
