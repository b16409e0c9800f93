import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
import FPGAAgentRuntime
import FPGACore
import FPGATestSupport
import GRPCCore
import SwiftProtobuf
import Testing

/// Every number of the node API is checked at the door against its range (docs/api.md,
/// "Ranges"): INVALID_ARGUMENT naming the field and the range, and no state change.
@Suite struct InputBoundsTests {
  static let accelerator = "card-0000:3b/acc0"

  /// The regression: a time slice of 2^62 s trapped in the idempotency fingerprint and killed
  /// the agent. Refused now, with or without a key and an epoch, and nothing changes.
  @Test func aTimeSliceNearTwoToTheSixtyTwoIsRefusedNotACrash() async throws {
    try await TestAgent.with(configure: { $0.simulator.acceleratorsPerCard = 1 }, inProcess: true) { agent in
      try await agent.withInProcessClient { node, _ in
        let before = try await node.getNodeStatus(.init())
        for (seconds, nanos) in [(Int64(1) << 62, Int32(0)), (.max, 999_999_999), (.min, 0), (0, -1), (10, 1)] {
          for key in ["", "slice-\(seconds)-\(nanos)"] {
            let failure = await rpcFailure {
              _ = try await node.setSharingPolicy(
                .with {
                  $0.meta.idempotencyKey = key
                  $0.meta.orchestratorEpoch = 1 << 63
                  $0.policy.acceleratorID = Self.accelerator
                  $0.policy.timeSlice = .with {
                    $0.seconds = seconds
                    $0.nanos = nanos
                  }
                  $0.policy.overcommitLimit = 4
                })
            }
            #expect(failure?.0 == .invalidArgument)
            #expect(failure?.1.contains("policy.time_slice") == true)
          }
        }
        let after = try await node.getNodeStatus(.init())
        #expect(after.revision == before.revision && after.orchestratorEpoch == before.orchestratorEpoch)
      }
    }
  }

  @Test func everyNumberOutsideItsRangeNamesItsField() async throws {
    try await TestAgent.with(configure: { $0.simulator.acceleratorsPerCard = 1 }, inProcess: true) { agent in
      try await agent.withInProcessClient { node, _ in
        let before = try await node.getNodeStatus(.init())
        func policy(_ edit: (inout Fpga_Agent_V1_SharingPolicy) -> Void) -> Fpga_Agent_V1_SetSharingPolicyRequest {
          .with {
            $0.meta.orchestratorEpoch = 5
            $0.policy.acceleratorID = Self.accelerator
            $0.policy.timeSlice = .with { $0.nanos = 10_000_000 }
            $0.policy.overcommitLimit = 4
            edit(&$0.policy)
          }
        }
        let cases: [(String, () async throws -> Void)] = [
          (
            "policy.overcommit_limit 0 is out of range: 1-64",
            { _ = try await node.setSharingPolicy(policy { $0.overcommitLimit = 0 }) }
          ),
          (
            "policy.overcommit_limit 4294967295",
            { _ = try await node.setSharingPolicy(policy { $0.overcommitLimit = .max }) }
          ),
          (
            "policy.weights[vm-1] 0 is out of range: 1-1000",
            { _ = try await node.setSharingPolicy(policy { $0.weights = ["vm-1": 0] }) }
          ),
          (
            "policy.weights[vm-1] 1001", { _ = try await node.setSharingPolicy(policy { $0.weights = ["vm-1": 1001] }) }
          ),
          ("policy.time_slice is required", { _ = try await node.setSharingPolicy(policy { $0.clearTimeSlice() }) }),
          (
            "timeout -1 s is out of range",
            {
              _ = try await node.detachVF(
                .with {
                  $0.allocationID = "alloc-000000000000"; $0.timeout = .with { $0.seconds = -1 }
                })
            }
          ),
          (
            "timeout 601 s is out of range",
            {
              _ = try await node.detachVF(
                .with {
                  $0.allocationID = "alloc-000000000000"; $0.timeout = .with { $0.seconds = 601 }
                })
            }
          ),
          (
            "timeout 0 s is out of range",
            {
              _ = try await node.detachVF(
                .with {
                  $0.allocationID = "alloc-000000000000"; $0.timeout = .init()
                })
            }
          ),
          (
            "timeout {seconds: 1, nanos: -5} is not a valid duration",
            {
              _ = try await node.detachVF(
                .with {
                  $0.allocationID = "alloc-000000000000";
                  $0.timeout = .with {
                    $0.seconds = 1; $0.nanos = -5
                  }
                })
            }
          ),
          (
            "context.weight 1001 is out of range: 0-1000",
            {
              _ = try await node.registerContext(
                .with {
                  $0.context.acceleratorID = Self.accelerator; $0.context.guest = "vm-1"; $0.context.function = "fft"
                  $0.context.weight = 1001
                })
            }
          ),
          (
            "context.saved_state_bytes 18446744073709551615 is out of range",
            {
              _ = try await node.registerContext(
                .with {
                  $0.context.acceleratorID = Self.accelerator; $0.context.guest = "vm-1"; $0.context.function = "fft"
                  $0.context.savedStateBytes = .max
                })
            }
          ),
          (
            "vf_count 4097 is out of range: 0-4096",
            {
              _ = try await node.reconfigure(
                .with {
                  $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 4097
                })
            }
          ),
          (
            "constraints.numa_node 1024 is out of range",
            {
              _ = try await node.allocateVF(
                .with {
                  $0.owner = "o"; $0.constraints.numaNode = 1024
                })
            }
          ),
          ("limit 10001 is out of range: 0-10000", { _ = try await node.getAuditTrail(.with { $0.limit = 10_001 }) }),
        ]
        for (expected, call) in cases {
          let failure = await rpcFailure(call)
          #expect(failure?.0 == .invalidArgument, "\(expected)")
          #expect(failure?.1.contains(expected) == true, "\(failure?.1 ?? "no failure") should say \(expected)")
        }
        let after = try await node.getNodeStatus(.init())
        #expect(after.revision == before.revision && after.orchestratorEpoch == before.orchestratorEpoch)
        // The edges are accepted.
        let edge = try await node.setSharingPolicy(
          policy {
            $0.timeSlice = .with { $0.seconds = 10 }
            $0.overcommitLimit = 64
          })
        #expect(edge.policy.timeSlice.seconds == 10 && edge.policy.overcommitLimit == 64)
      }
    }
  }
}
