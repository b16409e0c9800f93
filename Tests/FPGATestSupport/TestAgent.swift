public import FPGAAgentConfig
public import FPGAAgentAPI
public import FPGAAgentRuntime
public import FPGACore
public import FPGALinux
public import FPGASimulator
import Foundation
public import GRPCCore
public import GRPCInProcessTransport
public import GRPCNIOTransportHTTP2
import Logging
import Synchronization

/// A wall clock that stands still unless a test moves it.
public final class FixedClock: WallClock {
  private let time: Mutex<WallTime>

  public init(_ time: WallTime = WallTime(seconds: 1_800_000_000)) { self.time = Mutex(time) }

  public func now() -> WallTime { time.withLock { $0 } }

  public func advance(seconds: Int64) { time.withLock { $0.seconds += seconds } }
}

/// A real agent (runtime, servers, simulated node) on a free loopback port and a Unix socket
/// in a temporary directory.
public struct TestAgent: Sendable {
  public let runtime: AgentRuntime
  public let port: Int
  public let socketPath: String
  public let directory: String
  public let clock: FixedClock
  /// Set when the agent serves in-process too (`with(inProcess: true)`).
  public let inProcess: InProcessTransport?

  public var node: SimulatedNode { runtime.simulatedNode! }
  public var engine: NodeEngine { runtime.engine }

  /// Starts an agent, runs `body` against it, then shuts it down gracefully.
  public static func with<Result: Sendable>(
    cards: [SimulatorConfig.Card] = SimulatorConfig.default.cards,
    nodeID: String = "node-test",
    configure: (inout AgentConfig) -> Void = { _ in },
    uevents: (any UeventSource)? = nil,
    inProcess: Bool = false,
    _ body: (TestAgent) async throws -> Result
  ) async throws -> Result {
    let directory = NSTemporaryDirectory() + "fpga-agent-test-" + UUID().uuidString.prefix(8)
    var config = AgentConfig()
    config.server.listen = "127.0.0.1:0"
    config.http.listen = "127.0.0.1:0"
    config.server.unixSocket = directory + "/agent.sock"
    config.stateDir = directory + "/state"
    config.nodeID = nodeID
    config.rescanIntervalSeconds = 0
    // These tests drive the API over loopback TCP without certificates.
    config.auth.plaintextRole = .admin
    config.simulator.cards = cards
    // No accelerators unless a test asks: their figures would add revisions to every test.
    config.simulator.acceleratorsPerCard = 0
    config.simulator.workloads = []
    configure(&config)
    // In-process: no Unix socket and no HTTP listener to set up and tear down (the TCP listener
    // stays, on an ephemeral port, for what needs one).
    let transport = inProcess ? InProcessTransport() : nil
    if inProcess {
      config.server.unixSocket = ""
      config.http.listen = ""
    }
    var logger = Logger(label: "fpga-agent-test")
    logger.logLevel = .critical
    let clock = FixedClock()
    let runtime = try AgentRuntime(
      config: config, logger: logger, clock: clock, uevents: uevents, inProcess: transport)
    return try await withThrowingTaskGroup(of: Void.self) { group in
      group.addTask { try await runtime.run() }
      defer { try? FileManager.default.removeItem(atPath: directory) }
      do {
        let port = try await runtime.tcpPort() ?? 0
        try await runtime.unixSocketReady()
        let agent = TestAgent(
          runtime: runtime, port: port, socketPath: config.server.unixSocket, directory: directory, clock: clock,
          inProcess: transport)
        let result = try await body(agent)
        await runtime.shutdown()
        try await group.waitForAll()
        return result
      } catch {
        await runtime.shutdown()
        try? await group.waitForAll()
        throw error
      }
    }
  }

  /// Runs `body` with a client of the node API over TCP (or the Unix socket).
  public func withClient<Result: Sendable>(
    unixSocket: Bool = false,
    _ body: (Fpga_Agent_V1_NodeAgent.Client<HTTP2ClientTransport.Posix>, GRPCClient<HTTP2ClientTransport.Posix>)
      async throws -> Result
  ) async throws -> Result {
    let target: any ResolvableTarget =
      unixSocket ? .unixDomainSocket(path: socketPath) : .ipv4(address: "127.0.0.1", port: port)
    return try await withGRPCClient(
      transport: try .http2NIOPosix(target: target, transportSecurity: .plaintext)
    ) { client in
      try await body(Fpga_Agent_V1_NodeAgent.Client(wrapping: client), client)
    }
  }
}

extension TestAgent {
  /// Runs `body` with a client of the node API over the in-process transport (no socket, no
  /// HTTP/2 framing): the agent must have been started with `inProcess: true`.
  public func withInProcessClient<Result: Sendable>(
    _ body: (Fpga_Agent_V1_NodeAgent.Client<InProcessTransport.Client>, GRPCClient<InProcessTransport.Client>)
      async throws -> Result
  ) async throws -> Result {
    guard let inProcess else { fatalError("withInProcessClient: start the agent with TestAgent.with(inProcess: true)") }
    return try await withGRPCClient(transport: inProcess.client) { client in
      try await body(Fpga_Agent_V1_NodeAgent.Client(wrapping: client), client)
    }
  }
}

/// The status code and message of a call that failed, nil when it succeeded.
public func rpcFailure(_ body: () async throws -> Void) async -> (RPCError.Code, String)? {
  do {
    try await body()
    return nil
  } catch let error as RPCError {
    return (error.code, error.message)
  } catch {
    return (.unknown, "\(error)")
  }
}

/// Uevents a test sends, through the same seam as the kernel's netlink socket.
public final class FakeUevents: UeventSource, Sendable {
  private let consumers = Mutex<[AsyncStream<Uevent>.Continuation]>([])

  public init() {}

  public func events() -> AsyncStream<Uevent> {
    let (stream, continuation) = AsyncStream.makeStream(of: Uevent.self)
    consumers.withLock { $0.append(continuation) }
    return stream
  }

  /// Whether the agent listens yet.
  public var isListening: Bool { consumers.withLock { !$0.isEmpty } }

  public func send(_ event: Uevent) {
    for consumer in consumers.withLock({ $0 }) { consumer.yield(event) }
  }
}
