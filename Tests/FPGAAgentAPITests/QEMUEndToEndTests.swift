import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentAPI
import FPGAAgentRuntime
import FPGACore
import FPGAQMP
import FPGATestSupport
import Foundation
import GRPCCore
import Synchronization
import Testing
import SwiftProtobuf

/// allocate → attach → detach → release through the gRPC API against a real QEMU (q35, TCG,
/// native PCIe hot-plug, empty root ports), with QEMU's `edu` device standing in for a VF.
@Suite(.enabled(if: QEMUProcess.isAvailable, "qemu-system-x86_64 is not installed: real-QEMU tests NOT RUN"))
struct QEMUEndToEndTests {
  static func withVM(_ qemu: QEMUProcess, name: String = "vm1") -> (inout AgentConfig) -> Void {
    { config in
      config.qemu.sockets = [name: qemu.socketPath]
      config.qemu.deviceModel = "edu"
      config.qemu.detachTimeoutSeconds = 5
    }
  }

  @Test func allocateAttachDetachRelease() async throws {
    let qemu = try QEMUProcess(rootPorts: 2)
    try await TestAgent.with(configure: Self.withVM(qemu)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let vms = try await nodeAgent.getInventory(.init()).vms
        #expect(vms.map(\.name) == ["vm1"])
        #expect(vms.first?.state == "prelaunch" && vms.first?.rootPorts == 2 && vms.first?.freeRootPorts == 2)

        let allocation = try await nodeAgent.allocateVF(
          .with {
            $0.owner = "t"; $0.vm = "vm1"
          }
        ).allocation
        let attached = try await nodeAgent.attachVF(
          .with {
            $0.allocationID = allocation.id; $0.vm = "vm1"
          })
        #expect(attached.rootPort == "rp1" && attached.deviceID == allocation.id)
        #expect(attached.allocation.attached && attached.allocation.rootPort == "rp1")

        // QEMU really has it, on rp1.
        let client = try await QMPClient.connect(path: qemu.inspectionSocketPath)
        let bus = try await client.execute(
          "qom-get", ["path": .string("/machine/peripheral/\(allocation.id)"), "property": "parent_bus"])
        #expect(bus.stringValue == "/machine/peripheral/rp1/rp1")

        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.vms.first?.freeRootPorts == 1)
        let vf = inventory.cards.flatMap(\.pfs).flatMap(\.vfs).first { $0.bdf == allocation.vfBdf }
        #expect(vf?.state == .attached && vf?.vm == "vm1")

        let releaseAttached = await rpcFailure {
          _ = try await nodeAgent.releaseVF(.with { $0.allocationID = allocation.id })
        }
        #expect(releaseAttached?.0 == .failedPrecondition)

        let detached = try await nodeAgent.detachVF(.with { $0.allocationID = allocation.id })
        #expect(!detached.allocation.attached && detached.allocation.rootPort.isEmpty)
        let peripherals = try await client.execute("qom-list", ["path": "/machine/peripheral"])
        #expect(peripherals.arrayValue?.contains { $0["name"]?.stringValue == allocation.id } == false)
        _ = try await nodeAgent.releaseVF(.with { $0.allocationID = allocation.id })
      }
    }
  }

  /// A reconfiguration under a real QEMU that cannot pause: auto unplugs (DEVICE_DELETED) and
  /// replugs the kept VF, ends the lost one (unplugged too), and refuse-if-disruptive refuses.
  @Test func reconfigureUnplugsAndReplugsInARealQEMU() async throws {
    let qemu = try QEMUProcess(rootPorts: 2)
    try await TestAgent.with(configure: Self.withVM(qemu)) { agent in
      try await agent.withClient { nodeAgent, _ in
        var ids: [String] = []
        for _ in 0..<2 {
          let allocation = try await nodeAgent.allocateVF(
            .with {
              $0.owner = "t"; $0.constraints.pfBdf = "0000:3b:00.0"
            }
          ).allocation
          _ = try await nodeAgent.attachVF(
            .with {
              $0.allocationID = allocation.id; $0.vm = "vm1"
            })
          ids.append(allocation.id)
        }
        let refused = await rpcFailure {
          _ = try await nodeAgent.reconfigure(
            .with {
              $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 1; $0.strategy = .refuseIfDisruptive
            })
        }
        #expect(refused?.0 == .failedPrecondition)
        let started = try await nodeAgent.reconfigure(
          .with {
            $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 1
          })
        #expect(
          started.impacts.map { "\($0.outcome)/\($0.guestSees)" } == [
            "kept-reattached/unplug and replug", "lost/unplug",
          ])
        await agent.engine.waitForOperation(started.id)
        let done = try await nodeAgent.getOperation(.with { $0.id = started.id })
        #expect(done.state == .succeeded, "\(done)")
        let client = try await QMPClient.connect(path: qemu.inspectionSocketPath)
        let peripherals = try await client.execute("qom-list", ["path": "/machine/peripheral"])
        let names = Set(peripherals.arrayValue?.compactMap { $0["name"]?.stringValue } ?? [])
        #expect(names.contains(ids[0]) && !names.contains(ids[1]))
        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.allocations.map(\.id) == [ids[0]] && inventory.allocations[0].attached)
        #expect(inventory.cards[0].pfs[0].numVfs == 1)
      }
    }
  }

  @Test func aVMWithoutAFreeRootPort() async throws {
    let qemu = try QEMUProcess(rootPorts: 1)
    try await TestAgent.with(configure: Self.withVM(qemu)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let first = try await nodeAgent.allocateVF(.with { $0.owner = "t" }).allocation
        let second = try await nodeAgent.allocateVF(.with { $0.owner = "t" }).allocation
        _ = try await nodeAgent.attachVF(
          .with {
            $0.allocationID = first.id; $0.vm = "vm1"
          })
        let full = await rpcFailure {
          _ = try await nodeAgent.attachVF(
            .with {
              $0.allocationID = second.id; $0.vm = "vm1"
            })
        }
        #expect(full?.0 == .resourceExhausted)
        #expect(
          full?.1
            == "VM vm1 has no free hot-pluggable root port (1 ports, all occupied): start it with more empty pcie-root-port devices"
        )
        let unknownVM = await rpcFailure {
          _ = try await nodeAgent.attachVF(
            .with {
              $0.allocationID = second.id; $0.vm = "vm9"
            })
        }
        #expect(unknownVM?.0 == .notFound)
        #expect(
          unknownVM?.1
            == "VM vm9 is not known to this agent, which serves the VMs configured with --qmp-socket NAME=PATH or --qmp-dir DIR; "
            + "`fpgactl vms` lists them")
        let twice = await rpcFailure {
          _ = try await nodeAgent.attachVF(
            .with {
              $0.allocationID = first.id; $0.vm = "vm1"
            })
        }
        #expect(twice == nil, "attaching again where it already is answers with the attachment")
      }
    }
  }

  @Test func anUnplugTheGuestNeverAcknowledgesStaysVisiblyDetaching() async throws {
    let qemu = try QEMUProcess(rootPorts: 2, nativeHotplug: false)
    try await TestAgent.with(configure: Self.withVM(qemu)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let allocation = try await nodeAgent.allocateVF(.with { $0.owner = "t" }).allocation
        _ = try await nodeAgent.attachVF(
          .with {
            $0.allocationID = allocation.id; $0.vm = "vm1"
          })
        let stuck = await rpcFailure {
          _ = try await nodeAgent.detachVF(
            .with {
              $0.allocationID = allocation.id; $0.timeout = .with { $0.nanos = 500_000_000 }
            })
        }
        #expect(stuck?.0 == .unavailable)
        #expect(
          stuck?.1
            == "VM vm1 has not acknowledged the unplug of \(allocation.id) within 0.5 seconds: the device stays in the guest, state detaching; the guest OS must handle PCIe hot-unplug (retry DetachVF to keep waiting)"
        )
        let inventory = try await nodeAgent.getInventory(.init())
        let held = inventory.allocations.first { $0.id == allocation.id }
        #expect(held?.attached == true && held?.detaching == true)
        #expect(inventory.cards.flatMap(\.pfs).flatMap(\.vfs).first { $0.bdf == allocation.vfBdf }?.state == .detaching)
        // A retry keeps waiting instead of failing on QEMU's "already in the process of unplug".
        let retry = await rpcFailure {
          _ = try await nodeAgent.detachVF(
            .with {
              $0.allocationID = allocation.id; $0.timeout = .with { $0.nanos = 300_000_000 }
            })
        }
        #expect(retry?.0 == .unavailable)
      }
    }
  }

  @Test func qemuKilledMidOperation() async throws {
    let qemu = try QEMUProcess(rootPorts: 2, nativeHotplug: false)
    try await TestAgent.with(configure: Self.withVM(qemu)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let allocation = try await nodeAgent.allocateVF(.with { $0.owner = "t" }).allocation
        _ = try await nodeAgent.attachVF(
          .with {
            $0.allocationID = allocation.id; $0.vm = "vm1"
          })
        async let detach = rpcFailure {
          _ = try await nodeAgent.detachVF(
            .with {
              $0.allocationID = allocation.id; $0.timeout = .with { $0.seconds = 30 }
            })
        }
        try await Task.sleep(for: .milliseconds(300))
        qemu.kill()
        let error = await detach
        #expect(error?.0 == .unavailable)
        #expect(error?.1.hasPrefix("the QEMU of VM vm1 went away during device_del of \(allocation.id)") == true)
        let vm = try await nodeAgent.getInventory(.init()).vms.first
        #expect(vm?.state == "unreachable")
        // Killed while the agent still connected to it (a loaded machine) or after: either way
        // the VM is unreachable and says why.
        let why = vm?.error ?? "no VM"
        #expect(why.hasPrefix("VM vm1 is unreachable: ") || why.contains("went away"), "\(why)")
        let other = try await nodeAgent.allocateVF(.with { $0.owner = "t" }).allocation
        let unreachable = await rpcFailure {
          _ = try await nodeAgent.attachVF(
            .with {
              $0.allocationID = other.id; $0.vm = "vm1"
            })
        }
        #expect(unreachable?.0 == .unavailable)
      }
    }
  }
}

extension QEMUEndToEndTests {
  @Test func theAgentReconnectsWhenQEMURestarts() async throws {
    let first = try QEMUProcess(rootPorts: 2)
    first.keepDirectory = true
    let directory = first.directory
    try await TestAgent.with(configure: Self.withVM(first)) { agent in
      try await agent.withClient { nodeAgent, _ in
        let allocation = try await nodeAgent.allocateVF(.with { $0.owner = "t" }).allocation
        _ = try await nodeAgent.attachVF(
          .with {
            $0.allocationID = allocation.id; $0.vm = "vm1"
          })
        _ = try await nodeAgent.detachVF(.with { $0.allocationID = allocation.id })
        first.kill()
        _ = try await nodeAgent.rescan(.init())
        #expect(try await nodeAgent.getInventory(.init()).vms.first?.state == "unreachable")
        // The same VM comes back on the same socket path.
        try? FileManager.default.removeItem(atPath: first.socketPath)
        try? FileManager.default.removeItem(atPath: first.inspectionSocketPath)
        let second = try QEMUProcess(rootPorts: 2, directory: directory)
        _ = try await nodeAgent.rescan(.init())
        #expect(try await nodeAgent.getInventory(.init()).vms.first?.state == "prelaunch")
        let attached = try await nodeAgent.attachVF(
          .with {
            $0.allocationID = allocation.id; $0.vm = "vm1"
          })
        #expect(attached.rootPort == "rp1")
        second.kill()
      }
    }
  }
}

/// Paths a stock QEMU cannot show, against an in-process fake QMP server.
@Suite struct FakeQMPEndToEndTests {
  @Test func aPauseCapableQEMUAndAttachmentsRecoveredAtStartUp() async throws {
    let directory = NSTemporaryDirectory() + "fake-qmp-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let server = try FakeQMPServer(path: directory + "/vm7.sock") { command, arguments in
      switch command {
      case "query-status": .success(["status": "running", "running": true])
      case "query-commands":
        .success(
          .array(
            ["device_add", "device_del", "qom-list", "x-vfio-pause", "x-vfio-resume"].map { ["name": .string($0)] }))
      case "qom-list":
        .success([
          ["name": "rp1", "type": "child<pcie-root-port>"], ["name": "alloc-00000000beef", "type": "child<vfio-pci>"],
        ])
      case "qom-get":
        arguments?["property"]?.stringValue == "host"
          ? .success("0000:3b:00.5") : .success("/machine/peripheral/rp1/rp1")
      default:
        .failure(QMPError(.commandFailed, "The command \(command) has not been found", errorClass: "CommandNotFound"))
      }
    }
    defer { server.stop() }
    try await TestAgent.with(configure: { $0.qemu.socketDir = directory }) { agent in
      try await agent.withClient { nodeAgent, _ in
        let status = try await nodeAgent.getNodeStatus(.init())
        #expect(status.capabilities.vfioPause)
        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.vms.map(\.name) == ["vm7"])
        #expect(inventory.vms.first?.vfioPause == true && inventory.vms.first?.freeRootPorts == 0)
        let recovered = inventory.allocations.first { $0.id == "alloc-00000000beef" }
        #expect(recovered?.vfBdf == "0000:3b:00.5" && recovered?.vm == "vm7" && recovered?.attached == true)
        #expect(recovered?.rootPort == "rp1" && recovered?.owner == "recovered")
        // The recovered VF is not handed out again.
        var handedOut: [String] = []
        for _ in 0..<15 {
          handedOut.append(
            try await nodeAgent.allocateVF(
              .with {
                $0.owner = "t"; $0.constraints.pfBdf = "0000:3b:00.0"
              }
            ).allocation.vfBdf)
        }
        #expect(!handedOut.contains("0000:3b:00.5"))
      }
    }
  }

  @Test func withoutVMsAttachSaysHowToConfigureThem() async throws {
    try await TestAgent.with(configure: { $0.simulator.vms = [] }) { agent in
      try await agent.withClient { nodeAgent, _ in
        let allocation = try await nodeAgent.allocateVF(.with { $0.owner = "t" }).allocation
        do {
          _ = try await nodeAgent.attachVF(
            .with {
              $0.allocationID = allocation.id; $0.vm = "vm1"
            })
          Issue.record("expected FAILED_PRECONDITION")
        } catch let error as RPCError {
          #expect(error.code == .failedPrecondition)
          #expect(
            error.message
              == "no VMs are configured on this agent: start it with --qmp-socket NAME=PATH (repeatable) or --qmp-dir DIR"
          )
        }
      }
    }
  }
}

/// The pause path of a reconfiguration, against a fake QEMU that has the VFIO pause commands:
/// the guest keeps its device (no device_del, no device_add), the host VF is closed and re-opened.
@Suite struct PauseReconfigurationTests {
  @Test func thePauseStrategyPausesAndResumesWithoutUnplug() async throws {
    let directory = NSTemporaryDirectory() + "fake-qmp-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let calls = Mutex<[String]>([])
    let server = try FakeQMPServer(path: directory + "/vm7.sock") { command, arguments in
      switch command {
      case "query-status": return .success(["status": "running", "running": true])
      case "query-commands":
        return .success(
          .array(
            ["device_add", "device_del", "qom-list", "x-vfio-pause", "x-vfio-resume"].map { ["name": .string($0)] }))
      case "qom-list":
        return .success([
          ["name": "rp1", "type": "child<pcie-root-port>"], ["name": "alloc-00000000beef", "type": "child<vfio-pci>"],
        ])
      case "qom-get":
        return arguments?["property"]?.stringValue == "host"
          ? .success("0000:3b:00.5") : .success("/machine/peripheral/rp1/rp1")
      case "x-vfio-pause", "x-vfio-resume", "device_del", "device_add":
        calls.withLock { $0.append("\(command) \(arguments?["id"]?.stringValue ?? "?")") }
        return .success([:])
      default:
        return .failure(
          QMPError(.commandFailed, "The command \(command) has not been found", errorClass: "CommandNotFound"))
      }
    }
    defer { server.stop() }
    try await TestAgent.with(configure: { $0.qemu.socketDir = directory }) { agent in
      try await agent.withClient { nodeAgent, _ in
        let plan = try await nodeAgent.reconfigure(
          .with {
            $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 4; $0.strategy = .pause; $0.dryRun = true
          })
        #expect(
          plan.impacts.map { "\($0.allocationID) \($0.outcome) \($0.guestSees)" } == [
            "alloc-00000000beef kept-paused pause"
          ])
        let started = try await nodeAgent.reconfigure(
          .with {
            $0.pfBdf = "0000:3b:00.0"; $0.vfCount = 4; $0.strategy = .pause
          })
        await agent.engine.waitForOperation(started.id)
        let done = try await nodeAgent.getOperation(.with { $0.id = started.id })
        #expect(done.state == .succeeded, "\(done)")
        #expect(calls.withLock { $0 } == ["x-vfio-pause alloc-00000000beef", "x-vfio-resume alloc-00000000beef"])
        let inventory = try await nodeAgent.getInventory(.init())
        #expect(inventory.cards[0].pfs[0].numVfs == 4)
        let kept = inventory.allocations.first { $0.id == "alloc-00000000beef" }
        #expect(kept?.attached == true && kept?.vm == "vm7")
      }
    }
  }
}
