package import FPGAAgentDoors
package import FPGAAgentConfig
package import FPGAAgentAPI
package import FPGACore
package import FPGADRA
import GRPCCore
package import GRPCNIOTransportHTTP2
package import Logging
import ServiceLifecycle
import SwiftProtobuf
package import Synchronization

/// The agent's side of the orchestrator link: dials out, says hello, sends its inventory
/// (resuming from what the orchestrator already has, or a snapshot), heartbeats, and carries
/// out commands through the node API's door (`NodeDoor`): the same interceptors as every other
/// caller authorize (the link's role), audit (transport `link`, the command id) and map errors. Reconnects with jittered exponential
/// backoff; the node keeps serving local requests while the orchestrator is away.
package struct OrchestratorLink: Service {
  package let engine: NodeEngine
  /// The node API, as the link reaches it.
  package let door: NodeDoor
  package let address: ListenAddress
  package let hostname: String
  package let logger: Logger
  package var heartbeat: Duration = .seconds(2)
  /// Most messages queued for the orchestrator; past it the stream is restarted (and the
  /// inventory resent as a snapshot) rather than buffering without bound.
  package var outboxLimit = 4096
  /// mTLS (the orchestrator's certificate verified against the link's CA and name) or
  /// plaintext (loopback, or `orchestrator.insecure`).
  package var security: HTTP2ClientTransport.Posix.TransportSecurity = .plaintext
  /// The name the orchestrator's certificate must carry; nil: the address's host.
  package var serverName: String? = nil
  /// What the orchestrator's commands may do: checked against the node API's role table.
  package var role: Role = .operator
  /// Commands refused before they reach the node API (no id, no epoch) are audited here; the
  /// others by the node API's own interceptor.
  package var audit: AuditLog? = nil
  /// DRA grow on demand's figures, reported with each heartbeat (nil: DRA is off).
  package var growthFigures: (@Sendable () async -> GrowthFigures?)? = nil

  /// The orchestrator as the audit trail names it.
  package var identity: String { "orchestrator:\(serverName ?? address.host)" }

  package func run() async throws {
    await cancelWhenGracefulShutdown {
      await self.loop()
    }
  }

  private func loop() async {
    let clock = SystemWallClock()
    let machine = LinkMachineBox(OrchestratorLinkMachine(address: "\(address.host):\(address.port)"))
    while !Task.isCancelled {
      await engine.setLink(
        machine.state.withLock {
          $0.dialing(at: clock.now()); return $0.status
        })
      let outcome: String
      do {
        try await connect(machine: machine)
        outcome = "the orchestrator ended the stream"
      } catch {
        outcome = "\(error)"
      }
      if Task.isCancelled { break }
      let (next, status) = machine.state.withLock {
        ($0.ended(outcome, at: clock.now(), jitter: Double.random(in: 0.75...1.25)), $0.status)
      }
      await engine.setLink(status)
      guard case .redial(let delay) = next else { break }
      logger.warning(
        "orchestrator link down; reconnecting",
        metadata: ["fpga.orchestrator": "\(status.address)", "fpga.error": "\(outcome)", "fpga.retry_in": "\(delay)"])
      try? await Task.sleep(for: delay)
    }
    await engine.setLink(
      machine.state.withLock {
        $0.stopped(at: clock.now()); return $0.status
      })
  }

  /// 0.2 s doubling to 10 s, with ±25% jitter so a fleet does not reconnect in step.
  package static func backoff(attempt: Int) -> Duration {
    OrchestratorLinkMachine.backoff(attempt: attempt, jitter: Double.random(in: 0.75...1.25))
  }

  /// One stream, until it ends.
  private func connect(machine: LinkMachineBox) async throws {
    let target: any ResolvableTarget =
      address.isIPv6 ? .ipv6(address: address.host, port: address.port) : .dns(host: address.host, port: address.port)
    var config = HTTP2ClientTransport.Posix.Config.defaults
    if let serverName { config.http2.authority = serverName }
    let transport = try HTTP2ClientTransport.Posix(target: target, transportSecurity: security, config: config)
    try await withGRPCClient(transport: transport) { client in
      let orchestrator = Fpga_Orchestrator_V1_Orchestrator.Client(wrapping: client)
      let (outbox, send) = AsyncStream.makeStream(
        of: Fpga_Orchestrator_V1_AgentMessage.self, bufferingPolicy: .bufferingOldest(outboxLimit))
      let hello = Fpga_Orchestrator_V1_AgentMessage.with {
        $0.hello = .with {
          $0.nodeID = engine.nodeID
          $0.hostname = hostname
          $0.agentVersion = AgentVersion.current
        }
      }
      var first = hello
      first.hello.revision = await engine.revision
      first.hello.epochSeen = await engine.highestEpoch
      let node = Fpga_Agent_V1_NodeStatus(await engine.status(), hostname: hostname, agentVersion: AgentVersion.current)
      first.hello.capabilities = node.capabilities
      first.hello.problems = node.problems
      send.yield(first)
      try await orchestrator.connect(
        requestProducer: { writer in
          for await message in outbox { try await writer.write(message) }
        },
        onResponse: { response in
          try await withThrowingDiscardingTaskGroup { group in
            var started = false
            for try await message in response.messages {
              switch message.message {
              case .welcome(let welcome):
                guard !started else { continue }
                started = true
                let status = machine.state.withLock {
                  $0.welcomed(resumeFrom: welcome.resumeFrom, at: SystemWallClock().now())
                  return $0.status
                }
                await engine.setLink(status)
                logger.info(
                  "orchestrator link up",
                  metadata: ["fpga.orchestrator": "\(status.address)", "fpga.epoch": "\(welcome.epoch)"])
                group.addTask { try await self.report(from: welcome.resumeFrom, send: send) }
                group.addTask { await self.beat(send: send) }
              case .command(let command):
                group.addTask {
                  let result = await self.execute(command)
                  if case .dropped = send.yield(.with { $0.result = result }) {
                    throw RPCError(code: .resourceExhausted, message: "outbox full")
                  }
                }
              case .ack(let ack):
                await engine.setLink(
                  machine.state.withLock {
                    $0.acknowledged(ack.revision); return $0.status
                  })
              case nil:
                continue
              }
            }
            send.finish()
            group.cancelAll()
          }
        })
    }
  }

  /// The inventory: the deltas after `from` when the engine still has them, else a snapshot;
  /// then every change. A lagging link is cut by the engine and resumes with a snapshot.
  private func report(
    from: UInt64, send: AsyncStream<Fpga_Orchestrator_V1_AgentMessage>.Continuation
  ) async throws {
    var resumeFrom = from
    while !Task.isCancelled {
      let subscription = await engine.watch(from: resumeFrom)
      defer { subscription.cancel() }
      for await event in subscription.events {
        resumeFrom = event.revision
        if case .dropped = send.yield(.with { $0.inventory = .init(event) }) {
          throw RPCError(code: .resourceExhausted, message: "outbox full: restarting the link with a snapshot")
        }
      }
      if Task.isCancelled { return }
    }
  }

  private func beat(send: AsyncStream<Fpga_Orchestrator_V1_AgentMessage>.Continuation) async {
    while !Task.isCancelled {
      let status = await engine.status()
      let snapshot = try? await engine.snapshot()
      let accelerators = snapshot?.accelerators
      let node = Fpga_Agent_V1_NodeStatus(status, hostname: hostname, agentVersion: AgentVersion.current)
      let unhealthy = (snapshot?.cards ?? []).flatMap(\.pfs).flatMap(\.vfs).filter { $0.state == .unhealthy }.count
      let growth = await growthFigures?().map { figures in
        Fpga_Orchestrator_V1_DRAGrowth.with {
          $0.grown = UInt64(figures.grown)
          $0.failed = UInt64(figures.failed)
          $0.refused = UInt64(figures.refused)
          $0.seconds = figures.seconds
        }
      }
      send.yield(
        .with {
          $0.heartbeat = .with {
            $0.at = .init(SystemWallClock().now())
            $0.vfsFree = UInt32(status.counts.vfsFree)
            $0.vfsAllocated = UInt32(status.counts.vfsAllocated)
            $0.accelerators = (accelerators ?? []).map(Fpga_Agent_V1_Accelerator.init)
            $0.revision = status.revision
            $0.health = node.health
            $0.problems = node.problems
            $0.vfsUnhealthy = UInt32(unhealthy)
            if node.hasLayoutRestore { $0.layoutRestore = node.layoutRestore }
            if let growth { $0.draGrowth = growth }
          }
        })
      try? await Task.sleep(for: heartbeat)
    }
  }

  /// Runs a command through the node API's door, with the command id as the idempotency key
  /// and the command's epoch for fencing, as the link's identity and role.
  package func execute(_ command: Fpga_Orchestrator_V1_Command) async -> Fpga_Orchestrator_V1_CommandResult {
    var result = Fpga_Orchestrator_V1_CommandResult()
    result.commandID = command.commandID
    func meta(_ given: Fpga_Agent_V1_RequestMeta) -> Fpga_Agent_V1_RequestMeta {
      var meta = given
      if meta.idempotencyKey.isEmpty { meta.idempotencyKey = command.commandID }
      meta.orchestratorEpoch = command.epoch
      return meta
    }
    let node = door.node
    let metadata = NodeDoor.metadata(identity: identity, transport: "link", role: role, commandID: command.commandID)
    do {
      guard !command.commandID.isEmpty else {
        throw AgentError(.invalidArgument, "command_id is required (it is the command's idempotency key)")
      }
      guard command.commandID.utf8.count <= 128 else {
        // The id is the command's idempotency key, kept whole: two commands must never share one.
        throw AgentError(
          .invalidArgument,
          "command_id is \(command.commandID.utf8.count) bytes long: at most 128 (it is the command's idempotency key)")
      }
      guard command.epoch > 0 else {
        throw AgentError(.invalidArgument, "command \(command.commandID) carries no epoch")
      }
      /// The request with the command's id and epoch, through the door.
      func send<Request: CommandRequest, Response>(
        _ request: Request, _ call: (Request, Metadata) async throws -> Response
      ) async throws -> Response {
        var request = request
        request.meta = meta(request.meta)
        return try await call(request, metadata)
      }
      switch command.command {
      case .allocate(let request):
        result.allocated = try await send(request) { try await node.allocateVF($0, metadata: $1) }
      case .release(let request):
        result.released = try await send(request) { try await node.releaseVF($0, metadata: $1) }
      case .attach(let request): result.attached = try await send(request) { try await node.attachVF($0, metadata: $1) }
      case .detach(let request): result.detached = try await send(request) { try await node.detachVF($0, metadata: $1) }
      case .reconfigure(let request):
        result.operation = try await send(request) { try await node.reconfigure($0, metadata: $1) }
      case .switchContext(let request):
        result.switched = try await send(request) { try await node.switchContext($0, metadata: $1) }
      case .drain(let request):
        result.operation = try await send(request) { try await node.drainDevice($0, metadata: $1) }
      case .sharingPolicy(let request):
        result.policy = try await send(request) { try await node.setSharingPolicy($0, metadata: $1) }
      case .registerContext(let request):
        result.context = try await send(request) { try await node.registerContext($0, metadata: $1) }
      case nil:
        throw AgentError(.invalidArgument, "command \(command.commandID) carries nothing to do")
      }
    } catch let error as AgentError {
      // Refused before the node API: audited here, in the node API's shape.
      result.code = Int32(error.rpcErrorCode.rawValue)
      result.message = error.rpcErrorMessage
      audit?.append(
        AuditEntry(
          identity: identity, transport: "link", rpc: "Command", request: try? command.jsonString(),
          status: "\(error.rpcErrorCode)", revision: await engine.revision, commandID: command.commandID))
    } catch let error as RPCError {
      result.code = Int32(error.code.rawValue)
      result.message = error.message
    } catch {
      result.code = Int32(RPCError.Code.internalError.rawValue)
      result.message = "\(error)"
    }
    if result.code != 0 {
      logger.info(
        "orchestrator command refused",
        metadata: ["fpga.command": "\(command.commandID)", "fpga.error": "\(result.message)"])
    }
    return result
  }

  package init(
    engine: NodeEngine, door: NodeDoor, address: ListenAddress, hostname: String, logger: Logger,
    heartbeat: Duration = .seconds(2), security: HTTP2ClientTransport.Posix.TransportSecurity = .plaintext,
    serverName: String? = nil, role: Role = .operator, audit: AuditLog? = nil,
    growthFigures: (@Sendable () async -> GrowthFigures?)? = nil
  ) {
    self.engine = engine
    self.door = door
    self.address = address
    self.hostname = hostname
    self.logger = logger
    self.heartbeat = heartbeat
    self.security = security
    self.serverName = serverName
    self.role = role
    self.audit = audit
    self.growthFigures = growthFigures
  }
}

/// The link's machine, shared by the loop and the stream's handlers.
package final class LinkMachineBox: Sendable {
  package let state: Mutex<OrchestratorLinkMachine>
  package init(_ machine: OrchestratorLinkMachine) { state = Mutex(machine) }
}

/// A node API request an orchestrator command carries: the link sets its idempotency key (the
/// command id) and its epoch.
protocol CommandRequest: Sendable {
  var meta: Fpga_Agent_V1_RequestMeta { get set }
}

extension Fpga_Agent_V1_AllocateVFRequest: CommandRequest {}
extension Fpga_Agent_V1_ReleaseVFRequest: CommandRequest {}
extension Fpga_Agent_V1_AttachVFRequest: CommandRequest {}
extension Fpga_Agent_V1_DetachVFRequest: CommandRequest {}
extension Fpga_Agent_V1_ReconfigureRequest: CommandRequest {}
extension Fpga_Agent_V1_SwitchContextRequest: CommandRequest {}
extension Fpga_Agent_V1_DrainDeviceRequest: CommandRequest {}
extension Fpga_Agent_V1_SetSharingPolicyRequest: CommandRequest {}
extension Fpga_Agent_V1_RegisterContextRequest: CommandRequest {}
