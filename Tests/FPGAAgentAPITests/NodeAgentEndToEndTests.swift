import FPGAAgentAPI
import FPGACore
import FPGATestSupport
import GRPCCore
import Testing
import SwiftProtobuf

/// Every implemented RPC through a real server on loopback, success and error paths.
@Suite struct NodeAgentEndToEndTests {
  @Test func statusDescribesTheSimulatedNode() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        let status = try await nodeAgent.getNodeStatus(.init())
        #expect(status.nodeID == "node-test")
        #expect(status.health == .serving)
        #expect(status.capabilities.platform == "simulated")
        #expect(status.capabilities.vfioPci && status.capabilities.iommu)
        #expect(status.capabilities.qdmaDriver == "qdma-pf")
        #expect(status.cards == 2 && status.pfs == 8)
        #expect(status.vfsTotal == 504 && status.vfsEnabled == 52 && status.vfsFree == 52)
        #expect(status.agentVersion == "0.1.0")
        #expect(status.startedAt.seconds == 1_800_000_000)
        #expect(status.problems.isEmpty)
      }
    }
  }

  @Test func inventoryListsCardsPFsAndVFs() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.nodeID == "node-test")
        #expect(inventory.cards.map(\.id) == ["card-0000:3b", "card-0000:d8"])
        let pf0 = inventory.cards[0].pfs[0]
        #expect(pf0.bdf == "0000:3b:00.0" && pf0.totalVfs == 64 && pf0.numVfs == 16)
        #expect(pf0.vfOffset == 4 && pf0.vfStride == 1 && pf0.deviceID == 0x903f && pf0.vfDeviceID == 0xa03f)
        #expect(pf0.vfs.first?.bdf == "0000:3b:00.4")
        #expect(pf0.vfs.first?.state == .free)
        #expect(pf0.vfs.first?.driver == "vfio-pci")
        #expect(pf0.vfs.first?.vfioDevice.hasPrefix("/dev/vfio/") == true)
        let one = try await nodeAgent.getInventory(.with { $0.cardID = "card-0000:d8" })
        #expect(one.cards.map(\.id) == ["card-0000:d8"])

        let malformed = await rpcFailure { _ = try await nodeAgent.getInventory(.with { $0.cardID = "3b" }) }
        #expect(malformed?.0 == .invalidArgument)
        #expect(malformed?.1 == "card_id \"3b\" is not a card id: expected card-DDDD:BB, e.g. card-0000:3b")
        let unknown = await rpcFailure { _ = try await nodeAgent.getInventory(.with { $0.cardID = "card-0000:99" }) }
        #expect(unknown?.0 == .notFound)
      }
    }
  }

  @Test func allocateAndReleaseWithIdempotency() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        let request = Fpga_Agent_V1_AllocateVFRequest.with {
          $0.meta.idempotencyKey = "job-17"
          $0.owner = "tenant-a"
          $0.vm = "vm-1"
          $0.constraints.numaNode = 1
        }
        let first = try await nodeAgent.allocateVF(request)
        #expect(!first.replayed)
        #expect(first.allocation.vfBdf == "0000:d8:00.4")
        #expect(first.allocation.owner == "tenant-a" && first.allocation.vm == "vm-1")
        #expect(first.allocation.idempotencyKey == "job-17")
        #expect(first.vf.state == .allocated && first.vf.allocationID == first.allocation.id)
        let retry = try await nodeAgent.allocateVF(request)
        #expect(retry.replayed && retry.allocation == first.allocation)
        #expect(try await nodeAgent.getInventory(.init()).allocations.count == 1)

        let released = try await nodeAgent.releaseVF(.with { $0.allocationID = first.allocation.id })
        #expect(released.allocation.id == first.allocation.id && released.revision == first.revision + 1)
        let again = await rpcFailure {
          _ = try await nodeAgent.releaseVF(.with { $0.allocationID = first.allocation.id })
        }
        #expect(again?.0 == .notFound)
        #expect(again?.1.hasPrefix("allocation \(first.allocation.id) does not exist") == true)
        #expect(try await nodeAgent.getNodeStatus(.init()).vfsAllocated == 0)

        // A caller in the agent's own process is admin, and audited as such (not as plaintext TCP).
        let trail = try await nodeAgent.getAuditTrail(.init()).entries
        #expect(trail.map(\.rpc) == ["AllocateVF", "AllocateVF", "ReleaseVF", "ReleaseVF"])
        #expect(trail.map(\.status) == ["ok", "ok", "ok", "notFound"])
        #expect(trail.allSatisfy { $0.identity == "in-process" && $0.transport == "in-process" })
      }
    }
  }

  @Test func malformedRequestsAreInvalidArgumentAndChangeNothing() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        let revision = try await nodeAgent.getNodeStatus(.init()).revision
        let cases: [(Fpga_Agent_V1_AllocateVFRequest, String)] = [
          (.with { $0.owner = "" }, "owner is required: say who the VF is for (1-128 printable ASCII characters)"),
          (
            .with {
              $0.owner = "o"; $0.constraints.pfBdf = "0000:3b:00"
            },
            "constraints.pf_bdf \"0000:3b:00\" is not a PCI address: expected DDDD:BB:DD.F in lower-case hex, e.g. 0000:3b:00.4"
          ),
          (
            .with {
              $0.owner = "o"; $0.vm = "../etc"
            },
            "vm \"../etc\" is not a valid VM name: use 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -"
          ),
          (
            .with {
              $0.owner = "o"; $0.constraints.numaNode = -1
            },
            "constraints.numa_node -1 is out of range: 0-1023 (NUMA nodes)"
          ),
          (
            .with {
              $0.owner = "o"; $0.meta.idempotencyKey = "tab\tkey"
            },
            "idempotency_key \"tab?key\" has characters outside printable ASCII (0x20-0x7e)"
          ),
          (
            .with {
              $0.owner = "o"; $0.constraints.cardID = "card-zz"
            },
            "constraints.card_id \"card-zz\" is not a card id: expected card-DDDD:BB, e.g. card-0000:3b"
          ),
        ]
        for (request, message) in cases {
          let error = await rpcFailure { _ = try await nodeAgent.allocateVF(request) }
          #expect(error?.0 == .invalidArgument)
          #expect(error?.1 == message)
        }
        let badID = await rpcFailure { _ = try await nodeAgent.releaseVF(.with { $0.allocationID = "alloc-../../x" }) }
        #expect(badID?.0 == .invalidArgument)
        #expect(try await nodeAgent.getNodeStatus(.init()).revision == revision)
      }
    }
  }

  @Test func statesAndResourcesMapToTheirCodes() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        let unknownPF = await rpcFailure {
          _ = try await nodeAgent.allocateVF(
            .with {
              $0.owner = "o"; $0.constraints.pfBdf = "0000:99:00.0"
            })
        }
        #expect(unknownPF?.0 == .notFound)
        let empty = await rpcFailure {
          _ = try await nodeAgent.allocateVF(
            .with {
              $0.owner = "o"; $0.constraints.pfBdf = "0000:3b:00.2"
            })
        }
        #expect(empty?.0 == .resourceExhausted)
        #expect(
          empty?.1
            == "no enabled VF matching PF 0000:3b:00.2: enable VFs with `fpgactl reconfigure PF N` or relax the constraints"
        )

        _ = try await nodeAgent.drainDevice(.with { $0.device = "0000:3b:00.0" })
        let draining = await rpcFailure {
          _ = try await nodeAgent.allocateVF(
            .with {
              $0.owner = "o"; $0.constraints.pfBdf = "0000:3b:00.0"
            })
        }
        #expect(draining?.0 == .failedPrecondition)
        #expect(draining?.1 == "PF 0000:3b:00.0 is draining; undrain it (`fpgactl undrain 0000:3b:00.0`) first")

        _ = try await nodeAgent.allocateVF(
          .with {
            $0.owner = "o"; $0.meta.orchestratorEpoch = 9
          })
        let stale = await rpcFailure {
          _ = try await nodeAgent.allocateVF(
            .with {
              $0.owner = "o"; $0.meta.orchestratorEpoch = 8
            })
        }
        #expect(stale?.0 == .failedPrecondition)
        #expect(stale?.1.hasPrefix("orchestrator epoch 8 is stale") == true)
      }
    }
  }

  @Test func drainUndrainAndOperations() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        let allocation = try await nodeAgent.allocateVF(
          .with {
            $0.owner = "o"; $0.constraints.cardID = "card-0000:d8"
          })
        let operation = try await nodeAgent.drainDevice(
          .with {
            $0.device = "card-0000:d8"
            $0.releaseUnattached = true
            $0.meta.idempotencyKey = "drain-1"
          })
        #expect(operation.kind == "drain" && operation.state == .succeeded && operation.target == "card-0000:d8")
        #expect(operation.impacts.map(\.allocationID) == [allocation.allocation.id])
        let replay = try await nodeAgent.drainDevice(
          .with {
            $0.device = "card-0000:d8"
            $0.releaseUnattached = true
            $0.meta.idempotencyKey = "drain-1"
          })
        #expect(replay.id == operation.id)
        #expect(try await nodeAgent.getOperation(.with { $0.id = operation.id }) == operation)
        let watched = try await nodeAgent.watchOperation(.with { $0.id = operation.id }) { response in
          try await response.messages.reduce(into: []) { $0.append($1) }
        }
        #expect(watched == [operation])
        #expect(try await nodeAgent.getInventory(.init()).cards[1].draining)
        _ = try await nodeAgent.undrainDevice(.with { $0.device = "card-0000:d8" })
        #expect(try await !nodeAgent.getInventory(.init()).cards[1].draining)

        let unknownOp = await rpcFailure { _ = try await nodeAgent.getOperation(.with { $0.id = "op-000000000000" }) }
        #expect(unknownOp?.0 == .notFound)
        let badDevice = await rpcFailure { _ = try await nodeAgent.drainDevice(.with { $0.device = "/sys/bus" }) }
        #expect(badDevice?.0 == .invalidArgument)
        let unknownPF = await rpcFailure { _ = try await nodeAgent.undrainDevice(.with { $0.device = "0000:01:00.0" }) }
        #expect(unknownPF?.0 == .notFound)
      }
    }
  }

  @Test func reconfigureThroughTheAPIPlansRunsAndReportsEachStep() async throws {
    try await TestAgent.with(inProcess: true) { agent in
      try await agent.withInProcessClient { nodeAgent, _ in
        var ids: [String] = []
        for vm in ["vm-1", "vm-2"] {
          let allocation = try await nodeAgent.allocateVF(
            .with {
              $0.owner = "team"
              $0.constraints.pfBdf = "0000:3b:00.0"
            }
          ).allocation
          _ = try await nodeAgent.attachVF(
            .with {
              $0.allocationID = allocation.id; $0.vm = vm
            })
          ids.append(allocation.id)
        }
        let plan = try await nodeAgent.reconfigure(
          .with {
            $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 4; $0.dryRun = true
          })
        #expect(plan.state == .planned)
        #expect(plan.impacts.map(\.guestSees) == ["pause", "unplug and replug"])
        #expect(try await nodeAgent.getInventory(.init()).cards[0].pfs[0].numVfs == 16)

        let refused = await rpcFailure {
          _ = try await nodeAgent.reconfigure(
            .with {
              $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 4; $0.strategy = .pause
            })
        }
        #expect(refused?.0 == .failedPrecondition)
        #expect(refused?.1.contains("VM vm-2 holds \(ids[1])") == true)
        let tooMany = await rpcFailure {
          _ = try await nodeAgent.reconfigure(
            .with {
              $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 65
            })
        }
        #expect(tooMany?.0 == .invalidArgument)
        let unknown = await rpcFailure {
          _ = try await nodeAgent.reconfigure(
            .with {
              $0.pfBdf = "0000:77:00.0"; $0.vfCount = 1
            })
        }
        #expect(unknown?.0 == .notFound)
        let malformed = await rpcFailure { _ = try await nodeAgent.reconfigure(.with { $0.pfBdf = "x" }) }
        #expect(malformed?.0 == .invalidArgument)

        let started = try await nodeAgent.reconfigure(
          .with {
            $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 4
          })
        let states = try await nodeAgent.watchOperation(.with { $0.id = started.id }) { response in
          var seen: [Fpga_Agent_V1_OperationState] = []
          for try await operation in response.messages { seen.append(operation.state) }
          return seen
        }
        #expect(states.last == .succeeded)
        let done = try await nodeAgent.getOperation(.with { $0.id = started.id })
        #expect(done.steps.allSatisfy { $0.state == .succeeded })
        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.cards[0].pfs[0].numVfs == 4)
        #expect(inventory.allocations.filter(\.attached).map(\.id).sorted() == ids.sorted())
      }
    }
  }

  @Test func theUnixSocketServesTheSameAPI() async throws {
    try await TestAgent.with { agent in
      let id = try await agent.withClient(unixSocket: true) { nodeAgent, _ in
        try await nodeAgent.allocateVF(.with { $0.owner = "over-unix" }).allocation.id
      }
      try await agent.withClient { nodeAgent, _ in
        let ids = try await nodeAgent.getInventory(.init()).allocations.map(\.id)
        #expect(ids == [id])
      }
    }
  }
}
