import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
@testable import FPGAAgentRuntime
import FPGACore
import FPGATestSupport
import Testing
import SwiftProtobuf
import Logging

/// The link's own rules; the whole link runs against the example orchestrator in
/// tests/interop/test_orchestrator.py.
@Suite struct OrchestratorLinkTests {
  @Test func backoffGrowsWithJitterAndStaysBounded() {
    for attempt in 1...20 {
      let delay = OrchestratorLink.backoff(attempt: attempt)
      let expected = min(10.0, 0.2 * Double(1 << min(attempt - 1, 10)))
      let seconds = Double(delay.components.seconds) + Double(delay.components.attoseconds) / 1e18
      #expect(
        seconds >= expected * 0.75 - 0.001 && seconds <= expected * 1.25 + 0.001, "attempt \(attempt): \(seconds)")
    }
  }

  /// The connection's rules, event by event, without a network (like `ReconfigureMachine`).
  @Test func theLinkMachineReportsEachStateAndBacksOffOnlyWhileFailing() {
    var machine = OrchestratorLinkMachine(address: "orch:7443")
    let t = { (seconds: Int64) in WallTime(seconds: 1_800_000_000 + seconds) }
    #expect(machine.status.state == .off && machine.status.address == "orch:7443")
    // Three streams that end before a welcome: 0.2, 0.4, 0.8 s (jitter 1).
    var waits: [Duration] = []
    for second in 0..<3 {
      machine.dialing(at: t(Int64(second)))
      #expect(machine.status.state == .connecting && machine.status.since == t(Int64(second)))
      guard case .redial(let after) = machine.ended("refused", at: t(Int64(second)), jitter: 1) else { return }
      waits.append(after)
      #expect(machine.status.state == .disconnected && machine.status.error == "refused")
    }
    #expect(waits == [.milliseconds(200), .milliseconds(400), .milliseconds(800)])
    #expect(machine.failures == 3 && machine.status.connections == 0)
    // Welcomed: connected, counted once (a second welcome on the same stream changes nothing),
    // the resume point taken as acknowledged, the error cleared, the failures forgotten.
    machine.dialing(at: t(10))
    machine.welcomed(resumeFrom: 42, at: t(11))
    machine.welcomed(resumeFrom: 50, at: t(12))
    #expect(machine.status.state == .connected && machine.status.connections == 1 && machine.status.since == t(11))
    #expect(machine.status.acknowledgedRevision == 42 && machine.status.error == nil && machine.failures == 0)
    machine.acknowledged(60)
    machine.acknowledged(55)  // acknowledgements never go back
    #expect(machine.status.acknowledgedRevision == 60)
    // A welcomed stream that ends redials at the first step again.
    guard case .redial(let after) = machine.ended("the orchestrator ended the stream", at: t(20), jitter: 1) else {
      return
    }
    #expect(after == .milliseconds(200) && machine.status.connections == 1)
    // Failing for long: bounded at 10 s; jitter is clamped to ±25%.
    for _ in 0..<20 {
      machine.dialing(at: t(30))
      _ = machine.ended("refused", at: t(30), jitter: 1)
    }
    #expect(machine.ended("refused", at: t(31), jitter: 9) == .redial(after: .milliseconds(12_500)))
    #expect(OrchestratorLinkMachine.backoff(attempt: 40, jitter: 0) == .milliseconds(7_500))
    machine.stopped(at: t(40))
    #expect(machine.status.state == .off && machine.status.connections == 1)
  }

  @Test func commandsRunThroughTheNodeAPIWithTheirIdAndEpoch() async throws {
    try await TestAgent.with { agent in
      try await withDoor(agent.engine) { door in
        let link = OrchestratorLink(
          engine: agent.engine, door: door, address: ListenAddress("127.0.0.1:1")!, hostname: "h",
          logger: .init(label: "t"))
        let allocate = Fpga_Orchestrator_V1_Command.with {
          $0.commandID = "cmd-1"
          $0.epoch = 3
          $0.allocate = .with { $0.owner = "guest" }
        }
        let first = await link.execute(allocate)
        #expect(first.code == 0 && !first.allocated.replayed)
        let repeated = await link.execute(allocate)
        #expect(repeated.allocated.replayed && repeated.allocated.allocation.id == first.allocated.allocation.id)
        var stale = allocate
        stale.commandID = "cmd-2"
        stale.epoch = 2
        let refused = await link.execute(stale)
        #expect(refused.code == Int32(RPCErrorCodeValue.failedPrecondition) && refused.message.contains("stale"))
        let anonymous = await link.execute(
          .with {
            $0.epoch = 3; $0.allocate = .with { $0.owner = "g" }
          })
        #expect(anonymous.code == Int32(RPCErrorCodeValue.invalidArgument))
        let empty = await link.execute(
          .with {
            $0.commandID = "cmd-3"; $0.epoch = 3
          })
        #expect(empty.code == Int32(RPCErrorCodeValue.invalidArgument) && empty.message.contains("nothing to do"))
      }
    }
  }

  @Test func commandIdsAreKeysWholeAndShareTheirScopeWithLocalCalls() async throws {
    try await TestAgent.with { agent in
      try await withDoor(agent.engine) { door in
        let link = OrchestratorLink(
          engine: agent.engine, door: door, address: ListenAddress("127.0.0.1:1")!, hostname: "h",
          logger: .init(label: "t"))
        // Two ids that agree on their first 128 characters are two commands, never one.
        let long = String(repeating: "c", count: 128)
        let tooLong = await link.execute(
          .with {
            $0.commandID = long + "-a"
            $0.epoch = 1
            $0.allocate = .with { $0.owner = "a" }
          })
        #expect(tooLong.code == Int32(RPCErrorCodeValue.invalidArgument) && tooLong.message.contains("at most 128"))
        // A command and a local call with the same key: one allocation, the second a replay.
        let viaLink = await link.execute(
          .with {
            $0.commandID = "shared-key"
            $0.epoch = 1
            $0.allocate = .with { $0.owner = "a" }
          })
        #expect(viaLink.code == 0)
        let local = try await agent.engine.allocate(
          AllocateRequest(meta: .init(idempotencyKey: "shared-key", orchestratorEpoch: 1), owner: "a"))
        #expect(local.replayed && local.allocation.id == viaLink.allocated.allocation.id)
        #expect(try await agent.engine.snapshot().allocations.count == 1)
      }
    }
  }

  /// The node API's door for the link to call through, as the agent builds it, while `body` runs.
  func withDoor(_ engine: NodeEngine, _ body: (NodeDoor) async throws -> Void) async throws {
    let door = NodeDoor(
      services: [NodeAgentService(engine: engine, hostname: "h", agentVersion: "t", logger: .init(label: "t"))],
      interceptors: [
        AuthorizationInterceptor(
          resolver: CallerResolver(auth: AgentConfig.Auth(), listener: .door), audit: nil, engine: engine)
      ])
    try await withThrowingTaskGroup { group in
      group.addTask { try await NodeDoorService(door: door).run() }
      try await body(door)
      group.cancelAll()
    }
  }
}

/// gRPC status code numbers.
enum RPCErrorCodeValue {
  static let invalidArgument = 3
  static let failedPrecondition = 9
}
