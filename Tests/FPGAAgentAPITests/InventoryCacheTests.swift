@testable import FPGAAgentAPI
import FPGACore
import FPGATestSupport
import GRPCCore
import Testing
import SwiftProtobuf
import FPGASimulator

/// GetInventory keeps its wire-form inventory current by applying deltas; it must always equal a
/// fresh conversion of the engine's snapshot.
@Suite struct InventoryCacheTests {
  @Test func incrementalInventoryEqualsAFreshConversion() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        func check() async throws {
          let served = try await nodeAgent.getInventory(.init())
          let fresh = Fpga_Agent_V1_Inventory(try await agent.engine.snapshot())
          #expect(served == fresh)
        }
        try await check()
        var ids: [String] = []
        for index in 0..<6 {
          ids.append(try await nodeAgent.allocateVF(.with { $0.owner = "o\(index)" }).allocation.id)
          try await check()
        }
        _ = try await nodeAgent.releaseVF(.with { $0.allocationID = ids[2] })
        try await check()
        _ = try await nodeAgent.drainDevice(.with { $0.device = "card-0000:d8" })
        _ = try await nodeAgent.drainDevice(.with { $0.device = "0000:3b:00.1" })
        try await check()
        // Several changes between two reads.
        _ = try await nodeAgent.undrainDevice(.with { $0.device = "card-0000:d8" })
        _ = try await nodeAgent.releaseVF(.with { $0.allocationID = ids[0] })
        _ = try await nodeAgent.allocateVF(
          .with {
            $0.owner = "late"; $0.constraints.numaNode = 1
          })
        try await check()
        // A reshaping change (VFs vanish): a full conversion.
        try await agent.node.writeNumVFs(pf: PCIAddress("0000:3b:00.3")!, "0")
        try await agent.engine.rescan()
        try await check()
        _ = try await nodeAgent.allocateVF(.with { $0.owner = "after" })
        try await check()
      }
    }
  }
}
