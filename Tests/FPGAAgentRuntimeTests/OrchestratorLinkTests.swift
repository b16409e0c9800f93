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

  @Test func commandsRunThroughTheNodeAPIWithTheirIdAndEpoch() async throws {
    try await TestAgent.with { agent in
      let link = OrchestratorLink(
        engine: agent.engine,
        service: NodeAgentService(engine: agent.engine, hostname: "h", agentVersion: "t", logger: .init(label: "t")),
        address: ListenAddress("127.0.0.1:1")!, hostname: "h", logger: .init(label: "t"))
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

  @Test func commandIdsAreKeysWholeAndShareTheirScopeWithLocalCalls() async throws {
    try await TestAgent.with { agent in
      let service = NodeAgentService(engine: agent.engine, hostname: "h", agentVersion: "t", logger: .init(label: "t"))
      let link = OrchestratorLink(
        engine: agent.engine, service: service, address: ListenAddress("127.0.0.1:1")!, hostname: "h",
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

/// gRPC status code numbers.
enum RPCErrorCodeValue {
  static let invalidArgument = 3
  static let failedPrecondition = 9
}
