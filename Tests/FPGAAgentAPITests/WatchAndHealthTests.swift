import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
import FPGACore
import FPGATestSupport
import GRPCCore
import Testing
import SwiftProtobuf
import FPGAAgentRuntime

@Suite struct WatchInventoryTests {
  @Test func snapshotThenDeltasThenResume() async throws {
    try await TestAgent.with { agent in
      try await agent.withClient { nodeAgent, _ in
        let events = try await nodeAgent.watchInventory(.init()) { response in
          var events: [Fpga_Agent_V1_InventoryEvent] = []
          for try await event in response.messages {
            events.append(event)
            if events.count == 1 {
              _ = try await nodeAgent.allocateVF(.with { $0.owner = "watcher-test" })
            }
            if events.count == 2 { break }
          }
          return events
        }
        #expect(events[0].snapshot.cards.count == 2 && !events[0].resync)
        #expect(events[1].revision == events[0].revision + 1)
        let changes = events[1].delta.changes
        #expect(changes.first?.allocationUpdated.owner == "watcher-test")
        #expect(changes.contains { $0.vfUpdated.state == .allocated })

        // Resume after the snapshot: only the missed delta comes.
        let resumed = try await nodeAgent.watchInventory(.with { $0.fromRevision = events[0].revision }) {
          response -> Fpga_Agent_V1_InventoryEvent? in
          for try await event in response.messages { return event }
          return nil
        }
        #expect(resumed == events[1])

        // A revision the agent never had: a fresh snapshot, flagged.
        let resync = try await nodeAgent.watchInventory(.with { $0.fromRevision = 1_000 }) {
          response -> Fpga_Agent_V1_InventoryEvent? in
          for try await event in response.messages { return event }
          return nil
        }
        #expect(resync?.resync == true && resync?.snapshot.allocations.count == 1)
      }
    }
  }

  @Test func shutdownEndsOpenWatchStreams() async throws {
    let ended = try await TestAgent.with { agent in
      try await withThrowingTaskGroup(of: Int.self) { group in
        group.addTask {
          try await agent.withClient { nodeAgent, _ in
            try await nodeAgent.watchInventory(.init()) { response in
              var count = 0
              for try await _ in response.messages { count += 1 }
              return count
            }
          }
        }
        // Wait until the watcher is registered, then shut the agent down.
        while await agent.engine.status().watchers == 0 { await Task.yield() }
        await agent.runtime.shutdown()
        return try await group.next()!
      }
    }
    #expect(ended == 1, "the snapshot, then a clean end")
  }
}

@Suite struct HealthTests {
  @Test func checkAndWatch() async throws {
    try await TestAgent.with { agent in
      try await agent.withClient { _, client in
        let health = Grpc_Health_V1_Health.Client(wrapping: client)
        #expect(try await health.check(.init()).status == .serving)
        #expect(try await health.check(.with { $0.service = "fpga.agent.v1.NodeAgent" }).status == .serving)
        do {
          _ = try await health.check(.with { $0.service = "nope" })
          Issue.record("expected NOT_FOUND")
        } catch let error as RPCError {
          #expect(error.code == .notFound)
        }
        let statuses = try await health.watch(.init()) { response in
          var statuses: [Grpc_Health_V1_HealthCheckResponse.ServingStatus] = []
          for try await message in response.messages {
            statuses.append(message.status)
            if statuses.count == 1 { agent.runtime.health.set("", .notServing) }
            if statuses.count == 2 { break }
          }
          return statuses
        }
        #expect(statuses == [.serving, .notServing])
        let unknown = try await health.watch(.with { $0.service = "nope" }) {
          response -> Grpc_Health_V1_HealthCheckResponse.ServingStatus? in
          for try await message in response.messages { return message.status }
          return nil
        }
        #expect(unknown == .serviceUnknown)
      }
    }
  }
}
