import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
import FPGAAgentRuntime
import FPGACore
import FPGATestSupport
import Foundation
import GRPCCore
import Testing
import SwiftProtobuf

/// Contexts and time sharing through the gRPC API, on simulated accelerators.
@Suite struct ContextEndToEndTests {
  static let accelerator = "card-0000:3b/acc0"

  @Test func registerSwitchPolicyListDelete() async throws {
    try await TestAgent.with(configure: { $0.simulator.acceleratorsPerCard = 1 }, inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        var ids: [String: String] = [:]
        for (guest, weight) in [("vm-a", 1), ("vm-b", 2)] {
          let response = try await nodeAgent.registerContext(
            .with {
              $0.context.acceleratorID = Self.accelerator
              $0.context.guest = guest
              $0.context.function = "aes256-gcm"
              $0.context.parameters = ["key-bits": "256"]
              $0.context.savedStateBytes = 1 << 20
              $0.context.weight = UInt32(weight)
            })
          #expect(!response.replayed && response.context.id.hasPrefix("ctx-"))
          ids[guest] = response.context.id
        }
        // The same registration again is the same context.
        let again = try await nodeAgent.registerContext(
          .with {
            $0.context.acceleratorID = Self.accelerator; $0.context.guest = "vm-a"; $0.context.function = "aes256-gcm"
            $0.context.parameters = ["key-bits": "256"]; $0.context.savedStateBytes = 1 << 20; $0.context.weight = 1
          })
        #expect(again.replayed && again.context.id == ids["vm-a"])

        let switched = try await nodeAgent.switchContext(
          .with {
            $0.contextID = ids["vm-b"]!; $0.timing = .now
          })
        #expect(switched.switched)
        // Loading a 1 MiB state over 4 GB/s plus the fixed 200 µs: at least the fixed part.
        #expect(switched.switchTime.nanos >= 200_000 || switched.switchTime.seconds > 0)
        let later = try await nodeAgent.switchContext(
          .with {
            $0.contextID = ids["vm-a"]!; $0.timing = .nextSlice
          })
        #expect(!later.switched)

        let policy = try await nodeAgent.setSharingPolicy(
          .with {
            $0.policy.acceleratorID = Self.accelerator
            $0.policy.timeSlice = .with { $0.nanos = 5_000_000 }
            $0.policy.overcommitLimit = 2
            $0.policy.weights = ["vm-a": 3]
          })
        #expect(policy.policy.weights == ["vm-a": 3, "vm-b": 2] && policy.policy.overcommitLimit == 2)
        let full = await rpcFailure {
          _ = try await nodeAgent.registerContext(
            .with {
              $0.context.acceleratorID = Self.accelerator; $0.context.guest = "vm-c"; $0.context.function = "sha3"
            })
        }
        #expect(full?.0 == .resourceExhausted)
        #expect(full?.1.contains("overcommit limit") == true)
        let tooLow = await rpcFailure {
          _ = try await nodeAgent.setSharingPolicy(
            .with {
              $0.policy.acceleratorID = Self.accelerator; $0.policy.timeSlice = .with { $0.nanos = 5_000_000 }
              $0.policy.overcommitLimit = 1
            })
        }
        #expect(tooLow?.0 == .resourceExhausted)

        let listed = try await nodeAgent.listContexts(.with { $0.guest = "vm-b" }).contexts
        #expect(listed.map(\.id) == [ids["vm-b"]!])
        let inventory = try await nodeAgent.getInventory(.init())
        let accelerator = inventory.accelerators.first { $0.id == Self.accelerator }
        #expect(accelerator?.guests.map(\.guest) == ["vm-a", "vm-b"])
        #expect(accelerator?.metrics.overcommitRatio == 1.0)
        #expect(accelerator?.control == "simulated")

        _ = try await nodeAgent.deleteContext(.with { $0.contextID = ids["vm-a"]! })
        #expect(try await nodeAgent.listContexts(.init()).contexts.map(\.guest) == ["vm-b"])
        let refreshed = try await nodeAgent.getInventory(.init()).accelerators.first { $0.id == Self.accelerator }
        #expect(refreshed?.guests.map(\.guest) == ["vm-b"])
      }
    }
  }

  @Test func badInputIsRefusedPrecisely() async throws {
    try await TestAgent.with(configure: { $0.simulator.acceleratorsPerCard = 1 }, inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        let unknown = await rpcFailure {
          _ = try await nodeAgent.registerContext(
            .with {
              $0.context.acceleratorID = "card-0000:99/acc7"; $0.context.guest = "g"; $0.context.function = "f"
            })
        }
        #expect(unknown?.0 == .notFound && unknown?.1.contains("it has: card-0000:3b/acc0, card-0000:d8/acc0") == true)
        let guest = await rpcFailure {
          _ = try await nodeAgent.registerContext(
            .with {
              $0.context.acceleratorID = Self.accelerator; $0.context.guest = "../x"; $0.context.function = "f"
            })
        }
        #expect(guest?.0 == .invalidArgument)
        let function = await rpcFailure {
          _ = try await nodeAgent.registerContext(
            .with {
              $0.context.acceleratorID = Self.accelerator; $0.context.guest = "g"; $0.context.function = ""
            })
        }
        #expect(function?.0 == .invalidArgument)
        let id = await rpcFailure { _ = try await nodeAgent.switchContext(.with { $0.contextID = "../ctx" }) }
        #expect(id?.0 == .invalidArgument)
        let missing = await rpcFailure {
          _ = try await nodeAgent.deleteContext(.with { $0.contextID = "ctx-000000000000" })
        }
        #expect(missing?.0 == .notFound)
        let slice = await rpcFailure {
          _ = try await nodeAgent.setSharingPolicy(
            .with {
              $0.policy.acceleratorID = Self.accelerator; $0.policy.overcommitLimit = 2
            })
        }
        #expect(slice?.0 == .invalidArgument)
      }
    }
  }

  /// The workload generator's two guests (weights 1 and 2) overcommit one accelerator; the
  /// figures reach the inventory. Waits for figures, asserts no timing.
  @Test func theWorkloadGeneratorSharesAnAcceleratorLive() async throws {
    try await TestAgent.with(configure: {
      $0.simulator.acceleratorsPerCard = 1
      $0.simulator.workloads = AgentConfig.Workload.defaults
      $0.sharing.metricsIntervalSeconds = 1
    }) { agent in
      try await agent.withClient { nodeAgent, _ in
        var accelerator: Fpga_Agent_V1_Accelerator?
        for _ in 0..<200 {
          accelerator = try await nodeAgent.getInventory(.init()).accelerators.first { $0.id == Self.accelerator }
          if let accelerator, accelerator.guests.count == 2, accelerator.guests.allSatisfy({ $0.share > 0 }),
            accelerator.metrics.switchesPerSecond > 0
          {
            break
          }
          try await Task.sleep(for: .milliseconds(100))
        }
        #expect(accelerator?.guests.map(\.guest) == ["tenant-a", "tenant-b"])
        #expect(accelerator?.guests.allSatisfy { $0.share > 0 } == true)
        #expect((accelerator?.metrics.utilization ?? 0) > 0)
        #expect((accelerator?.metrics.switchesPerSecond ?? 0) > 0)
        #expect(try await nodeAgent.listContexts(.init()).contexts.count == 2)
      }
    }
  }
}

/// On the Linux platform, accelerators are BAR windows from `linux.accelerators`: here the
/// fake sysfs tree's PF has a `resource2` file that a simulated firmware answers.
@Suite struct BARAcceleratorEndToEndTests {
  @Test func aBARAcceleratorIsSharedThroughTheAPI() async throws {
    let tree = try LinuxPlatformEndToEndTests.tree()
    let bar = tree.sysRoot + "/devices/pci0000:00/0000:3b:00.0/resource2"
    let card = try SimulatedFirmware(path: bar, slots: 2)
    defer { card.stop() }
    try await TestAgent.with(configure: {
      LinuxPlatformEndToEndTests.onTree(tree)(&$0)
      $0.linux.accelerators = [.init(pf: "0000:3b:00.0", bar: 2, slot: 1)]
    }) { agent in
      try await agent.withClient { nodeAgent, _ in
        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.accelerators.map { "\($0.id) \($0.control)" } == ["card-0000:3b/acc1 bar"])
        let context = try await nodeAgent.registerContext(
          .with {
            $0.context.acceleratorID = "card-0000:3b/acc1"; $0.context.guest = "vm-1"; $0.context.function = "fft"
            $0.context.savedStateBytes = 4096
          }
        ).context
        let switched = try await nodeAgent.switchContext(
          .with {
            $0.contextID = context.id; $0.timing = .now
          })
        #expect(switched.switched)
        #expect(card.commands.contains("1:load:1:4096"))
      }
    }
    // A planted link that leads out of the tree is refused at start.
    let outside = NSTemporaryDirectory() + "outside-" + UUID().uuidString.prefix(6)
    _ = FileManager.default.createFile(atPath: outside, contents: Data(count: 8192))
    try? FileManager.default.removeItem(atPath: tree.sysRoot + "/devices/pci0000:00/0000:3b:00.1/resource2")
    try FileManager.default.createSymbolicLink(
      atPath: tree.sysRoot + "/devices/pci0000:00/0000:3b:00.1/resource2", withDestinationPath: outside)
    await #expect {
      try await TestAgent.with(configure: {
        LinuxPlatformEndToEndTests.onTree(tree)(&$0)
        $0.linux.accelerators = [.init(pf: "0000:3b:00.1", bar: 2, slot: 0)]
      }) { _ in }
    } throws: { error in
      "\(error)".contains("leads outside")
    }
  }
}
