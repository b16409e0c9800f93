// An EXAMPLE orchestrator for fpga-agent's orchestrator link, used by the tests and the demo.
// It accepts any number of agents on `Orchestrator.Connect`, keeps what they report, and places
// guests cluster-wide through `ExampleOrchestrator`: a VF on the node with the most free VFs; a
// context on the least utilized accelerator that is under the cluster-wide overcommit limit.
// Not a production orchestrator: its state lives in memory.
//
//   fpga-orchestrator-example [--listen 127.0.0.1:50060] [--epoch 1] [--overcommit-limit 3]
//                             [--tls-cert CRT --tls-key KEY --tls-client-ca CA]
//
// With the TLS options it serves mTLS only: agents (and admin clients) must present a
// certificate from the client CA, as the agent verifies the orchestrator's.

import FPGAAgentAPI
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Synchronization
import SwiftProtobuf

struct Options {
  var host = "127.0.0.1"
  var port = 50060
  var epoch: UInt64 = 1
  var overcommitLimit: UInt32 = 3
  var tlsCert = ""
  var tlsKey = ""
  var tlsClientCA = ""

  init(_ arguments: [String]) {
    var iterator = arguments.makeIterator()
    while let argument = iterator.next() {
      switch argument {
      case "--listen":
        let value = iterator.next() ?? ""
        if let colon = value.lastIndex(of: ":"), let port = Int(value[value.index(after: colon)...]) {
          host = String(value[..<colon])
          self.port = port
        }
      case "--epoch": epoch = iterator.next().flatMap(UInt64.init) ?? epoch
      case "--overcommit-limit": overcommitLimit = iterator.next().flatMap(UInt32.init) ?? overcommitLimit
      case "--tls-cert": tlsCert = iterator.next() ?? ""
      case "--tls-key": tlsKey = iterator.next() ?? ""
      case "--tls-client-ca": tlsClientCA = iterator.next() ?? ""
      default:
        FileHandle.standardError.write(Data("unknown argument \(argument)\n".utf8))
        exit(2)
      }
    }
  }
}

/// What the orchestrator knows of one node.
struct Node {
  var connected = false
  var revision: UInt64 = 0
  var heartbeat = Fpga_Orchestrator_V1_Heartbeat()
  var snapshots: UInt64 = 0
  var deltas: UInt64 = 0
  var connections: UInt64 = 0
  var platform = ""
  /// The open stream's outbox.
  var outbox: AsyncStream<Fpga_Orchestrator_V1_OrchestratorMessage>.Continuation?
  /// Commands sent and not yet answered: resent on reconnect (the command id makes a repeat
  /// harmless on the agent).
  var unanswered: [String: Fpga_Orchestrator_V1_Command] = [:]
}

final class Cluster: Sendable {
  let epoch: UInt64
  let overcommitLimit: UInt32
  private let nodes = Mutex<[String: Node]>([:])
  private let waiters = Mutex<[String: CheckedContinuation<Fpga_Orchestrator_V1_CommandResult, Never>]>([:])
  private let placements = Mutex<[String: Fpga_Orchestrator_V1_Placement]>([:])
  /// Bumped to cut every open link.
  let generation = Atomic<Int>(0)

  init(epoch: UInt64, overcommitLimit: UInt32) {
    self.epoch = epoch
    self.overcommitLimit = overcommitLimit
  }

  // MARK: The link

  /// The last revision held for a node (0: unknown, the agent sends a snapshot).
  func revision(of nodeID: String) -> UInt64 { nodes.withLock { $0[nodeID]?.revision ?? 0 } }

  func connected(
    _ nodeID: String, platform: String, outbox: AsyncStream<Fpga_Orchestrator_V1_OrchestratorMessage>.Continuation
  ) {
    nodes.withLock { nodes in
      var node = nodes[nodeID] ?? Node()
      node.platform = platform
      node.connected = true
      node.connections += 1
      node.outbox = outbox
      nodes[nodeID] = node
      for command in node.unanswered.values.sorted(by: { $0.commandID < $1.commandID }) {
        outbox.yield(.with { $0.command = command })
      }
    }
  }

  func disconnected(_ nodeID: String) {
    nodes.withLock { nodes in
      nodes[nodeID]?.connected = false
      nodes[nodeID]?.outbox = nil
    }
  }

  /// Applies an inventory event; false when it does not follow what is held (the stream is then
  /// restarted, and the agent sends a snapshot).
  func inventory(_ nodeID: String, _ event: Fpga_Agent_V1_InventoryEvent) -> Bool {
    nodes.withLock { nodes in
      guard var node = nodes[nodeID] else { return false }
      switch event.event {
      case .snapshot:
        node.snapshots += 1
      case .delta:
        guard event.revision == node.revision + 1 else {
          node.revision = 0
          nodes[nodeID] = node
          return false
        }
        node.deltas += 1
      case nil:
        return true
      }
      node.revision = event.revision
      nodes[nodeID] = node
      node.outbox?.yield(.with { $0.ack = .with { $0.revision = event.revision } })
      return true
    }
  }

  func heartbeat(_ nodeID: String, _ heartbeat: Fpga_Orchestrator_V1_Heartbeat) {
    nodes.withLock { $0[nodeID]?.heartbeat = heartbeat }
  }

  func result(_ nodeID: String, _ result: Fpga_Orchestrator_V1_CommandResult) {
    nodes.withLock { _ = $0[nodeID]?.unanswered.removeValue(forKey: result.commandID) }
    waiters.withLock { $0.removeValue(forKey: result.commandID) }?.resume(returning: result)
  }

  /// Sends a command (now, or when the node reconnects) and waits for its result.
  func send(_ nodeID: String, _ command: Fpga_Orchestrator_V1_Command) async -> Fpga_Orchestrator_V1_CommandResult {
    await withCheckedContinuation { continuation in
      waiters.withLock { $0[command.commandID] = continuation }
      nodes.withLock { nodes in
        nodes[nodeID, default: Node()].unanswered[command.commandID] = command
        nodes[nodeID]?.outbox?.yield(.with { $0.command = command })
      }
    }
  }

  // MARK: Placement

  func placeVF(_ request: Fpga_Orchestrator_V1_PlaceVFRequest) async throws -> Fpga_Orchestrator_V1_Placement {
    if let known = placements.withLock({ $0[request.requestID] }) { return known }
    let chosen = nodes.withLock { nodes -> (String, UInt32)? in
      let candidate = nodes.filter { $0.value.connected && $0.value.heartbeat.vfsFree > 0 }
        .max { ($0.value.heartbeat.vfsFree, $1.key) < ($1.value.heartbeat.vfsFree, $0.key) }
      guard let candidate else { return nil }
      nodes[candidate.key]?.heartbeat.vfsFree -= 1  // until the next heartbeat says otherwise
      return (candidate.key, candidate.value.heartbeat.vfsFree)
    }
    guard let (nodeID, free) = chosen else {
      throw RPCError(code: .resourceExhausted, message: "no connected node has a free VF")
    }
    let result = await send(
      nodeID,
      .with {
        $0.commandID = "place-vf-" + request.requestID
        $0.epoch = epoch
        $0.allocate = .with { $0.owner = request.guest }
      })
    guard result.code == 0 else { throw Self.failure(result) }
    let placement = Fpga_Orchestrator_V1_Placement.with {
      $0.nodeID = nodeID
      $0.allocationID = result.allocated.allocation.id
      $0.vfBdf = result.allocated.allocation.vfBdf
      $0.reason = "most free VFs (\(free))"
    }
    placements.withLock { $0[request.requestID] = placement }
    return placement
  }

  func placeContext(_ request: Fpga_Orchestrator_V1_PlaceContextRequest) async throws -> Fpga_Orchestrator_V1_Placement
  {
    if let known = placements.withLock({ $0[request.requestID] }) { return known }
    let limit = overcommitLimit
    let chosen = nodes.withLock { nodes -> (String, String, Double)? in
      // Fewest guests first, then the least utilized, then the least switch overhead.
      var best: (nodeID: String, id: String, guests: Int, utilization: Double, overhead: Double)?
      for (nodeID, node) in nodes.sorted(by: { $0.key < $1.key }) where node.connected {
        for accelerator in node.heartbeat.accelerators
        where UInt32(accelerator.guests.count) < limit
          && UInt32(accelerator.guests.count) < accelerator.policy.overcommitLimit
        {
          let candidate = (
            nodeID: nodeID, id: accelerator.id, guests: accelerator.guests.count,
            utilization: accelerator.metrics.utilization, overhead: accelerator.metrics.switchOverhead
          )
          if let current = best,
            (current.guests, current.utilization, current.overhead) <= (
              candidate.guests, candidate.utilization, candidate.overhead
            )
          {
            continue
          }
          best = candidate
        }
      }
      guard let best = best.map({ ($0.nodeID, $0.id, $0.utilization, $0.overhead) }) else { return nil }
      // Count the guest at once so concurrent placements spread.
      if let index = nodes[best.0]?.heartbeat.accelerators.firstIndex(where: { $0.id == best.1 }) {
        nodes[best.0]?.heartbeat.accelerators[index].guests.append(.with { $0.guest = request.guest })
      }
      return (best.0, best.1, best.2)
    }
    guard let (nodeID, acceleratorID, utilization) = chosen else {
      throw RPCError(
        code: .resourceExhausted,
        message: "every accelerator of the cluster is at the overcommit limit (\(limit) guests)")
    }
    let result = await send(
      nodeID,
      .with {
        $0.commandID = "place-context-" + request.requestID
        $0.epoch = epoch
        $0.registerContext = .with {
          $0.context.acceleratorID = acceleratorID
          $0.context.guest = request.guest
          $0.context.function = request.function
          $0.context.weight = max(1, request.weight)
        }
      })
    guard result.code == 0 else { throw Self.failure(result) }
    let placement = Fpga_Orchestrator_V1_Placement.with {
      $0.nodeID = nodeID
      $0.contextID = result.context.context.id
      $0.acceleratorID = acceleratorID
      $0.reason = "least utilized accelerator under the overcommit limit (utilization \(utilization))"
    }
    placements.withLock { $0[request.requestID] = placement }
    return placement
  }

  func release(_ request: Fpga_Orchestrator_V1_ReleaseRequest) async throws -> Fpga_Orchestrator_V1_Placement {
    let result = await send(
      request.nodeID,
      .with {
        $0.commandID = "release-" + request.requestID
        $0.epoch = epoch
        $0.release = .with { $0.allocationID = request.allocationID }
      })
    guard result.code == 0 else { throw Self.failure(result) }
    return .with {
      $0.nodeID = request.nodeID
      $0.allocationID = request.allocationID
      $0.reason = "released"
    }
  }

  /// A node's refusal, passed on with its status code.
  static func failure(_ result: Fpga_Orchestrator_V1_CommandResult) -> RPCError {
    let code = Status.Code(rawValue: Int(result.code)).flatMap(RPCError.Code.init) ?? .unknown
    return RPCError(code: code, message: result.message)
  }

  func view() -> Fpga_Orchestrator_V1_ClusterView {
    nodes.withLock { nodes in
      .with {
        $0.epoch = epoch
        $0.overcommitLimit = overcommitLimit
        $0.nodes = nodes.keys.sorted().map { id in
          let node = nodes[id]!
          return .with {
            $0.nodeID = id
            $0.connected = node.connected
            $0.revision = node.revision
            $0.vfsFree = node.heartbeat.vfsFree
            $0.vfsAllocated = node.heartbeat.vfsAllocated
            $0.accelerators = node.heartbeat.accelerators
            $0.snapshots = node.snapshots
            $0.deltas = node.deltas
            $0.connections = node.connections
            $0.platform = node.platform
          }
        }
      }
    }
  }
}

/// The node a stream belongs to, once it said hello.
final class StreamNode: Sendable {
  let id = Mutex<String?>(nil)
}

/// The link's server side.
struct LinkService: Fpga_Orchestrator_V1_Orchestrator.ServiceProtocol {
  let cluster: Cluster

  func connect(
    request: StreamingServerRequest<Fpga_Orchestrator_V1_AgentMessage>, context: ServerContext
  ) async throws -> StreamingServerResponse<Fpga_Orchestrator_V1_OrchestratorMessage> {
    StreamingServerResponse { writer in
      let (outbox, send) = AsyncStream.makeStream(of: Fpga_Orchestrator_V1_OrchestratorMessage.self)
      let node = StreamNode()
      defer {
        if let nodeID = node.id.withLock({ $0 }) { cluster.disconnected(nodeID) }
        send.finish()
      }
      do {
        try await withThrowingDiscardingTaskGroup { group in
          group.addTask {
            for await message in outbox { try await writer.write(message) }
          }
          let generation = cluster.generation.load(ordering: .relaxed)
          group.addTask {
            while cluster.generation.load(ordering: .relaxed) == generation {
              try await Task.sleep(for: .milliseconds(50))
            }
            throw RPCError(code: .unavailable, message: "link cut by the orchestrator")
          }
          group.addTask {
            for try await message in request.messages {
              try handle(message, node: node, send: send)
            }
            throw CancellationError()  // the agent ended its side: end ours
          }
        }
      } catch is CancellationError {
      }
      return [:]
    }
  }

  private func handle(
    _ message: Fpga_Orchestrator_V1_AgentMessage, node: StreamNode,
    send: AsyncStream<Fpga_Orchestrator_V1_OrchestratorMessage>.Continuation
  ) throws {
    let nodeID = node.id.withLock { $0 }
    switch message.message {
    case .hello(let hello):
      guard nodeID == nil, !hello.nodeID.isEmpty else { return }
      node.id.withLock { $0 = hello.nodeID }
      // Welcome first (resume after what is held), then any command that waited.
      let held = cluster.revision(of: hello.nodeID)
      send.yield(
        .with {
          $0.welcome = .with {
            $0.epoch = cluster.epoch; $0.resumeFrom = held
          }
        })
      cluster.connected(hello.nodeID, platform: hello.capabilities.platform, outbox: send)
    case .inventory(let event):
      guard let nodeID else { return }
      if !cluster.inventory(nodeID, event) {
        throw RPCError(code: .dataLoss, message: "inventory gap: reconnect and send a snapshot")
      }
    case .heartbeat(let heartbeat):
      if let nodeID { cluster.heartbeat(nodeID, heartbeat) }
    case .result(let result):
      if let nodeID { cluster.result(nodeID, result) }
    case nil:
      return
    }
  }
}

/// How tests and the demo ask for placements.
struct AdminService: Fpga_Orchestrator_V1_ExampleOrchestrator.SimpleServiceProtocol {
  let cluster: Cluster

  func placeVF(request: Fpga_Orchestrator_V1_PlaceVFRequest, context: ServerContext) async throws
    -> Fpga_Orchestrator_V1_Placement
  {
    try await cluster.placeVF(request)
  }

  func placeContext(request: Fpga_Orchestrator_V1_PlaceContextRequest, context: ServerContext) async throws
    -> Fpga_Orchestrator_V1_Placement
  {
    try await cluster.placeContext(request)
  }

  func release(request: Fpga_Orchestrator_V1_ReleaseRequest, context: ServerContext) async throws
    -> Fpga_Orchestrator_V1_Placement
  {
    try await cluster.release(request)
  }

  func cluster(request: Fpga_Orchestrator_V1_ClusterRequest, context: ServerContext) async throws
    -> Fpga_Orchestrator_V1_ClusterView
  {
    if request.cutLinks { cluster.generation.add(1, ordering: .relaxed) }
    return cluster.view()
  }
}

let options = Options(Array(CommandLine.arguments.dropFirst()))
let cluster = Cluster(epoch: options.epoch, overcommitLimit: options.overcommitLimit)
let security: HTTP2ServerTransport.Posix.TransportSecurity =
  options.tlsCert.isEmpty
  ? .plaintext
  : .mTLS(
    certificateChain: [.file(path: options.tlsCert, format: .pem)],
    privateKey: .file(path: options.tlsKey, format: .pem)
  ) { $0.trustRoots = .certificates([.file(path: options.tlsClientCA, format: .pem)]) }
let server = GRPCServer(
  transport: .http2NIOPosix(address: .ipv4(host: options.host, port: options.port), transportSecurity: security),
  services: [LinkService(cluster: cluster), AdminService(cluster: cluster)])
signal(SIGTERM, SIG_IGN)
let termination = DispatchSource.makeSignalSource(signal: SIGTERM)
termination.setEventHandler { server.beginGracefulShutdown() }
termination.resume()
try await withThrowingDiscardingTaskGroup { group in
  group.addTask { try await server.serve() }
  if let address = try await server.listeningAddress?.ipv4 {
    FileHandle.standardOutput.write(
      Data("fpga-orchestrator-example: serving on \(address.host):\(address.port), epoch \(options.epoch)\n".utf8))
  }
}
