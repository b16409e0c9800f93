import FPGAAgentConfig
import FPGAAgentRuntime
import FPGACore
import FPGACtlCommands
import FPGATestSupport
import Foundation
import Synchronization
import Testing
import FPGASimulator
import FPGALinux

/// Runs fpgactl in-process and captures what it prints.
func fpgactl(_ arguments: [String]) async -> (code: Int32, out: String, err: String) {
  let out = Mutex<[String]>([])
  let err = Mutex<[String]>([])
  let console = Console(
    out: { line in out.withLock { $0.append(line) } }, err: { line in err.withLock { $0.append(line) } })
  let code = await Console.$current.withValue(console) { await FPGACtl.execute(arguments) }
  return (code, out.withLock { $0.joined(separator: "\n") }, err.withLock { $0.joined(separator: "\n") })
}

@Suite struct FPGACtlTests {
  @Test func inventoryTable() async throws {
    try await TestAgent.with { agent in
      let result = await fpgactl(["inventory", "--server", "127.0.0.1:\(agent.port)"])
      #expect(result.code == 0)
      #expect(
        result.out == """
          CARD          MODEL                 NUMA  PFS  VFS     DRAINING
          card-0000:3b  Xilinx QDMA Gen3 x16  0     4    28/252  no
          card-0000:d8  Xilinx QDMA Gen3 x16  1     4    24/252  no

          PF            CARD          DEVICE     DRIVER   VFS    FREE  ALLOCATED  NUMA  QMAX  DRAINING  HEALTH
          0000:3b:00.0  card-0000:3b  10ee:903f  qdma-pf  16/64  16    0          0     0     no        healthy
          0000:3b:00.1  card-0000:3b  10ee:913f  qdma-pf  8/60   8     0          0     0     no        healthy
          0000:3b:00.2  card-0000:3b  10ee:923f  qdma-pf  0/60   0     0          0     0     no        healthy
          0000:3b:00.3  card-0000:3b  10ee:933f  qdma-pf  4/68   4     0          0     0     no        healthy
          0000:d8:00.0  card-0000:d8  10ee:903f  qdma-pf  16/64  16    0          1     0     no        healthy
          0000:d8:00.1  card-0000:d8  10ee:913f  qdma-pf  8/60   8     0          1     0     no        healthy
          0000:d8:00.2  card-0000:d8  10ee:923f  qdma-pf  0/60   0     0          1     0     no        healthy
          0000:d8:00.3  card-0000:d8  10ee:933f  qdma-pf  0/68   0     0          1     0     no        healthy

          no allocations (revision 1)
          """)
      #expect(result.err.isEmpty)
    }
  }

  @Test func allocateReleaseAndTheAllocationTable() async throws {
    try await TestAgent.with { agent in
      let server = "unix:\(agent.socketPath)"
      let allocated = await fpgactl([
        "--server", server, "allocate", "--pf", "0000:d8:00.1", "--owner", "tenant-a", "--vm", "vm-7", "--key", "k1",
      ])
      #expect(allocated.code == 0)
      let id = try #require(allocated.out.split(separator: " ").dropFirst().first.map { String($0.dropLast()) })
      #expect(
        allocated.out == "allocated \(id): VF 0000:d8:08.4 (PF 0000:d8:00.1, NUMA 1, IOMMU group 144) for tenant-a")
      let replay = await fpgactl([
        "--server", server, "allocate", "--pf", "0000:d8:00.1", "--owner", "tenant-a", "--vm", "vm-7", "--key", "k1",
      ])
      #expect(
        replay.out == "already allocated \(id): VF 0000:d8:08.4 (PF 0000:d8:00.1, NUMA 1, IOMMU group 144) for tenant-a"
      )

      let inventory = await fpgactl(["inventory", "--server", server])
      let tail = inventory.out.split(separator: "\n", omittingEmptySubsequences: false).suffix(3).joined(
        separator: "\n")
      #expect(
        tail == """
          ALLOCATION          VF            PF            OWNER     VM    NUMA  IOMMU  ATTACHED  LAST RE-LAYOUT
          \(id)  0000:d8:08.4  0000:d8:00.1  tenant-a  vm-7  1     144    no        -
          1 allocations (revision 2)
          """)

      let released = await fpgactl(["release", id, "--server", server])
      #expect(released == (0, "released \(id): VF 0000:d8:08.4 is free", ""))
      let twice = await fpgactl(["release", id, "--server", server])
      #expect(twice.code == 1)
      #expect(
        twice.err
          == "error: NOT_FOUND: allocation \(id) does not exist (already released, or never made); `fpgactl inventory` lists the allocations"
      )
    }
  }

  @Test func statusAndErrors() async throws {
    try await TestAgent.with { agent in
      let status = await fpgactl(["status", "--server", "127.0.0.1:\(agent.port)"])
      #expect(
        status.out == """
          node      node-test on \(SystemCalls.hostname())
          health    SERVING
          platform  simulated (IOMMU yes, vfio-pci yes, QDMA driver qdma-pf, VFIO pause no)
          version   0.1.0, up 0s
          revision  1
          devices   2 cards, 8 PFs, 52/504 VFs enabled, 0 allocated, 52 free
          epoch     0
          problems  none
          """)
      let exhausted = await fpgactl(["allocate", "--pf", "0000:3b:00.2", "--server", "127.0.0.1:\(agent.port)"])
      #expect(exhausted.code == 1)
      #expect(
        exhausted.err
          == "error: RESOURCE_EXHAUSTED: no enabled VF matching PF 0000:3b:00.2: enable VFs with `fpgactl reconfigure PF N` or relax the constraints"
      )
      let malformed = await fpgactl(["allocate", "--pf", "3b:00.2", "--server", "127.0.0.1:\(agent.port)"])
      #expect(
        malformed.err
          == "error: INVALID_ARGUMENT: constraints.pf_bdf \"3b:00.2\" is not a PCI address: expected DDDD:BB:DD.F in lower-case hex, e.g. 0000:3b:00.4"
      )
    }
  }

  @Test func watchPrintsASnapshotThenChanges() async throws {
    try await TestAgent.with { agent in
      async let watched = fpgactl(["watch", "--count", "2", "--server", "127.0.0.1:\(agent.port)"])
      while await agent.engine.status().watchers == 0 { await Task.yield() }
      let allocation = await fpgactl(["allocate", "--owner", "w", "--server", "127.0.0.1:\(agent.port)"])
      let id = allocation.out.split(separator: " ")[1].dropLast()
      let result = await watched
      #expect(result.code == 0)
      #expect(
        result.out == """
          revision 1: snapshot of 2 cards, 8 PFs, 52 VFs, 0 allocations
          revision 2: allocation \(id) holds VF 0000:3b:00.4 for w
          revision 2: VF 0000:3b:00.4 allocated by \(id)
          """)
    }
  }

  @Test func drainAndOperation() async throws {
    try await TestAgent.with { agent in
      let server = "127.0.0.1:\(agent.port)"
      let drained = await fpgactl(["drain", "0000:3b:00.3", "--server", server])
      #expect(drained.code == 0)
      let opID = drained.out.split(separator: " ")[1]
      #expect(
        drained.out == """
          operation \(opID) (drain 0000:3b:00.3): succeeded
            1. [succeeded] stop new allocations on PF 0000:3b:00.3
          """)
      let shown = await fpgactl(["operation", String(opID), "--server", server])
      #expect(shown.out == drained.out)
      let undrained = await fpgactl(["undrain", "0000:3b:00.3", "--server", server])
      #expect(undrained.out == "0000:3b:00.3 accepts allocations (revision 3)")
      let quiet = await fpgactl(["rescan", "--server", server])
      #expect(quiet == (0, "rescanned: no changes (revision 3)", ""))
      try await agent.node.writeNumVFs(pf: PCIAddress("0000:3b:00.3")!, "0")
      let changed = await fpgactl(["rescan", "--server", server])
      #expect(changed == (0, "rescanned: changes found (revision 4)", ""))
    }
  }

  @Test func reconfigureShowsThePlanThenALinePerStep() async throws {
    try await TestAgent.with { agent in
      let server = "127.0.0.1:\(agent.port)"
      let allocated = await fpgactl(["allocate", "--owner", "w", "--pf", "0000:3b:00.3", "--server", server])
      let id = String(allocated.out.split(separator: " ")[1].dropLast())
      #expect(await fpgactl(["attach", id, "vm-2", "--server", server]).code == 0)
      let plan = await fpgactl(["reconfigure", "0000:3b:00.3", "2", "--dry-run", "--server", server])
      let planID = plan.out.split(separator: " ")[1]
      #expect(plan.code == 0)
      #expect(
        plan.out == """
          operation \(planID) (reconfigure 0000:3b:00.3): planned
            1. [succeeded] plan the new layout of PF 0000:3b:00.3
            2. [planned] detach \(id) (VF 0000:3b:17.4) from VM vm-2: the guest sees an unplug
            3. [planned] write 0 to sriov_numvfs of 0000:3b:00.3: its VFs are removed
            4. [planned] write 2 to sriov_numvfs of 0000:3b:00.3 (autoprobe off)
            5. [planned] verify that 0000:3b:00.3 has 2 VFs and record the new layout
            6. [planned] bind VF 0000:3b:17.4 to vfio-pci
            7. [planned] re-attach \(id) (VF 0000:3b:17.4) to VM vm-2
            8. [planned] commit
            allocation \(id) (VF 0000:3b:17.4 in VM vm-2): kept-reattached, guest sees unplug and replug
          """)
      let refused = await fpgactl([
        "reconfigure", "0000:3b:00.3", "2", "--strategy", "refuse-if-disruptive", "--server", server,
      ])
      #expect(refused.code == 1)
      #expect(
        refused.err.hasPrefix(
          "error: FAILED_PRECONDITION: strategy refuse-if-disruptive refuses this reconfiguration of PF 0000:3b:00.3: VM vm-2 holds \(id)"
        ))
      let bad = await fpgactl(["reconfigure", "0000:3b:00.3", "2", "--strategy", "gentle", "--server", server])
      #expect(bad.code == 2)
      let run = await fpgactl(["reconfigure", "0000:3b:00.3", "2", "--server", server])
      #expect(run.code == 0)
      let lines = run.out.split(separator: "\n").map(String.init)
      #expect(lines.first?.hasSuffix(": reconfiguring 0000:3b:00.3 to 2 VFs (strategy auto)") == true)
      for step in 2...8 { #expect(lines.contains { $0.hasPrefix("  \(step)/8 [succeeded] ") }, "step \(step)") }
      #expect(
        lines.suffix(2) == [
          "operation \(lines[0].split(separator: " ")[1].dropLast()) succeeded",
          "  allocation \(id) (VF 0000:3b:17.4 in VM vm-2): kept-reattached, guest sees unplug and replug",
        ])
    }
  }

  @Test func contextsAndSharingFromTheCommandLine() async throws {
    try await TestAgent.with(configure: { $0.simulator.acceleratorsPerCard = 1 }) { agent in
      let server = "127.0.0.1:\(agent.port)"
      let registered = await fpgactl([
        "context", "register", "card-0000:3b/acc0", "vm-1", "sha3", "--param", "rounds=24", "--weight", "2",
        "--state-bytes", "4096", "--server", server,
      ])
      #expect(registered.code == 0)
      let id = String(registered.out.split(separator: " ")[1].dropLast())
      #expect(registered.out == "registered \(id): guest vm-1 on card-0000:3b/acc0 (sha3, weight 2)")
      let listed = await fpgactl(["contexts", "--server", server])
      #expect(
        listed.out.split(separator: "\n").first
          == "CONTEXT           ACCELERATOR        GUEST  FUNCTION  WEIGHT  STATE   ACTIVE")
      #expect(listed.out.contains("\(id)  card-0000:3b/acc0  vm-1   sha3      2       4096 B"))
      let switched = await fpgactl(["context", "switch", id, "--now", "--server", server])
      #expect(switched.code == 0 && switched.out.hasPrefix("switched to \(id) in "))
      let policy = await fpgactl([
        "policy", "card-0000:3b/acc0", "--slice-ms", "5", "--limit", "2", "--weight", "vm-1=3", "--server", server,
      ])
      #expect(policy.out == "card-0000:3b/acc0: slice 5.0 ms, at most 2 guests, weights vm-1=3")
      let badWeight = await fpgactl(["policy", "card-0000:3b/acc0", "--weight", "vm-1", "--server", server])
      #expect(badWeight.code == 2 && badWeight.err == "error: --weight vm-1: expected GUEST=WEIGHT")
      let moved = await fpgactl(["context", "move", id, "card-0000:d8/acc0", "--server", server])
      #expect(moved.code == 0 && moved.out.hasPrefix("moved \(id) to card-0000:d8/acc0 with "))
      let accelerators = await fpgactl(["accelerators", "--server", server])
      let lines = accelerators.out.split(separator: "\n").map(String.init)
      #expect(lines.first?.hasPrefix("ACCELERATOR        CONTROL    GUESTS  LOADED") == true)
      #expect(lines.contains { $0.hasPrefix("card-0000:d8/acc0  simulated  1/4") })
      #expect(lines.contains { $0.hasPrefix("card-0000:d8/acc0  vm-1   2") })
      let deleted = await fpgactl(["context", "delete", id, "--server", server])
      #expect(deleted.out == "deleted \(id)")
      #expect(await fpgactl(["contexts", "--server", server]).out == "no contexts")
      let unknown = await fpgactl(["context", "register", "card-0000:77/acc0", "vm-1", "sha3", "--server", server])
      #expect(
        unknown.code == 1
          && unknown.err.hasPrefix("error: NOT_FOUND: accelerator \"card-0000:77/acc0\" is not on this node"))
    }
  }

  @Test func anUnreachableAgentIsSaidPlainly() async throws {
    let result = await fpgactl(["status", "--server", "unix:/nonexistent/fpga-agent.sock"])
    #expect(result.code == 3)
    #expect(
      result.err.hasPrefix(
        "error: cannot reach the agent at unix:/nonexistent/fpga-agent.sock: is fpga-agent running there?"))
    let usage = await fpgactl(["status", "--server", "host:notaport"])
    #expect(usage.code == 2)
    #expect(usage.err == "error: --server host:notaport: expected HOST:PORT or unix:PATH")
  }
}

@Suite(.enabled(if: QEMUProcess.isAvailable, "qemu-system-x86_64 is not installed: real-QEMU tests NOT RUN"))
struct FPGACtlQEMUTests {
  @Test func vmsAttachDetach() async throws {
    let qemu = try QEMUProcess(rootPorts: 2)
    try await TestAgent.with(configure: { config in
      config.qemu.sockets = ["vm1": qemu.socketPath]
      config.qemu.deviceModel = "edu"
    }) { agent in
      let server = "127.0.0.1:\(agent.port)"
      #expect(
        await fpgactl(["vms", "--server", server]).out == """
          VM   STATE      FREE PORTS  VFIO PAUSE  VFS  QMP SOCKET / ERROR
          vm1  prelaunch  2/2         no          -    \(qemu.socketPath)
          """)
      let allocated = await fpgactl(["allocate", "--server", server])
      let id = String(allocated.out.split(separator: " ")[1].dropLast())
      let attached = await fpgactl(["attach", id, "vm1", "--server", server])
      #expect(attached == (0, "attached \(id): VF 0000:3b:00.4 is device \(id) in VM vm1, root port rp1", ""))
      #expect(
        await fpgactl(["vms", "--server", server]).out == """
          VM   STATE      FREE PORTS  VFIO PAUSE  VFS           QMP SOCKET / ERROR
          vm1  prelaunch  1/2         no          0000:3b:00.4  \(qemu.socketPath)
          """)
      let detached = await fpgactl(["detach", id, "--server", server])
      #expect(detached == (0, "detached \(id): VF 0000:3b:00.4 left its VM", ""))
      let notAttached = await fpgactl(["detach", id, "--server", server])
      #expect(notAttached.err == "error: FAILED_PRECONDITION: allocation \(id) is not attached to a VM")
    }
  }
}

/// The embedded default: simulated VMs that hold their VFs like QEMU does.
@Suite struct SimulatedVMTests {
  @Test func attachAndDetachOnTheDefaultNode() async throws {
    try await TestAgent.with { agent in
      let server = "127.0.0.1:\(agent.port)"
      #expect(
        await fpgactl(["vms", "--server", server]).out == """
          VM    STATE    FREE PORTS  VFIO PAUSE  VFS  QMP SOCKET / ERROR
          vm-1  running  4/4         yes         -    (simulated)
          vm-2  running  2/2         no          -    (simulated)
          """)
      let allocated = await fpgactl(["allocate", "--pf", "0000:3b:00.3", "--server", server])
      let id = String(allocated.out.split(separator: " ")[1].dropLast())
      let attached = await fpgactl(["attach", id, "vm-2", "--server", server])
      #expect(attached.out == "attached \(id): VF 0000:3b:17.4 is device \(id) in VM vm-2, root port rp1")
      // PF 0000:3b:00.3's VFs came up on qdma-vf; attach bound this one to vfio-pci first.
      let vf = agent.node.scan().pfs.first { $0.function.address.description == "0000:3b:00.3" }!.vfs[0]
      #expect(vf.driver == "vfio-pci")
      // The VM holds the VF: the kernel's write of 0 blocks until the detach lets it go.
      let write = Task { try await agent.node.writeNumVFs(pf: PCIAddress("0000:3b:00.3")!, "0") }
      for _ in 0..<50 { await Task.yield() }
      #expect(agent.node.scan().pfs.first { $0.function.address.description == "0000:3b:00.3" }!.vfs.count == 4)
      let detached = await fpgactl(["detach", id, "--server", server])
      #expect(detached.out == "detached \(id): VF 0000:3b:17.4 left its VM")
      try await write.value
      #expect(agent.node.scan().pfs.first { $0.function.address.description == "0000:3b:00.3" }!.vfs.isEmpty)
    }
  }
}

/// The agent on a fake sysfs tree with several malformed devices: the healthy PF is served, and
/// `fpgactl status` names each odd device with its reason.
@Suite struct OddDevicesThroughFPGACtlTests {
  @Test func eachOddDeviceIsNamedAndTheRestIsServed() async throws {
    let tree = try FakeKernelSysfs(pfs: [
      .init("0000:3b:00.0", totalVFs: 8, offset: 4),
      .init("0000:3b:00.1", device: 0x913f, vfDevice: 0xa13f, totalVFs: 8, offset: 67),
      .init("0000:3b:00.2", device: 0x923f, vfDevice: 0xa23f, totalVFs: 8, offset: 130),
      .init("0000:3b:00.3", device: 0x933f, vfDevice: 0xa33f, totalVFs: 8, offset: 193),
    ])
    for pf in ["0000:3b:00.0", "0000:3b:00.2", "0000:3b:00.3"] {
      try tree.write(.device(PCIAddress(pf)!, "sriov_drivers_autoprobe"), "0")
      try tree.write(.device(PCIAddress(pf)!, "sriov_numvfs"), "2")
    }
    let devices = tree.sysRoot + "/devices/pci0000:00/"
    // A PF without sriov_vf_device; a VF whose IOMMU group link leaves the root; a PF whose
    // sriov_totalvfs is garbage.
    try FileManager.default.removeItem(atPath: devices + "0000:3b:00.1/sriov_vf_device")
    let oddVF = "0000:3b:00.2"
    let vfs = try FileManager.default.contentsOfDirectory(atPath: devices).filter { $0.hasPrefix("0000:3b:") }.sorted()
    let firstVFOfPF2 = try #require(
      vfs.first { name in
        (try? FileManager.default.destinationOfSymbolicLink(atPath: devices + name + "/physfn"))?.hasSuffix(oddVF)
          ?? false
      })
    try FileManager.default.removeItem(atPath: devices + firstVFOfPF2 + "/iommu_group")
    try FileManager.default.createSymbolicLink(
      atPath: devices + firstVFOfPF2 + "/iommu_group", withDestinationPath: "/tmp")
    try "lots\n".write(toFile: devices + "0000:3b:00.3/sriov_totalvfs", atomically: true, encoding: .utf8)

    try await TestAgent.with(configure: { config in
      config.platform = .linux
      config.linux.sysfsRoot = tree.sysRoot
      config.linux.devRoot = tree.devRoot
    }) { agent in
      let status = await fpgactl(["status", "--server", "127.0.0.1:\(agent.port)"])
      #expect(status.code == 0)
      #expect(status.out.contains("DEGRADED"), "\(status.out)")
      for (device, reason) in [
        ("0000:3b:00.1", "sriov_vf_device"), (firstVFOfPF2, "not allocated"), ("0000:3b:00.3", "sriov_totalvfs"),
      ] {
        #expect(
          status.out.split(separator: "\n").contains { $0.contains(device) && $0.contains(reason) },
          "fpgactl status names \(device) (\(reason)):\n\(status.out)")
      }
      // The healthy PF's VFs, and PF2's other VF, are handed out.
      var taken: [String] = []
      for index in 0..<8 {
        let result = await fpgactl(["allocate", "--owner", "o\(index)", "--server", "127.0.0.1:\(agent.port)"])
        guard result.code == 0 else { break }
        taken.append(result.out)
      }
      #expect(taken.count == 3, "\(taken)")
      #expect(!taken.contains { $0.contains("VF \(firstVFOfPF2) ") })
    }
  }
}

@Suite struct HealthCommandTests {
  @Test func healthListsAndClearIsAuditedWithItsReason() async throws {
    try await TestAgent.with { agent in
      let server = "unix:\(agent.socketPath)"
      let listed = await fpgactl(["--server", server, "health"])
      #expect(listed.code == 0 && listed.out == "every device is healthy")
      let cleared = await fpgactl([
        "--server", server, "health", "clear", "0000:3b:00.4", "--reason", "card reseated, ticket 4711", "--key", "h1",
      ])
      #expect(cleared.code == 0)
      #expect(cleared.out.hasPrefix("cleared 0000:3b:00.4: healthy (revision "))
      let again = await fpgactl([
        "--server", server, "health", "clear", "0000:3b:00.4", "--reason", "card reseated, ticket 4711", "--key", "h1",
      ])
      #expect(again.out.hasPrefix("already cleared 0000:3b:00.4"))
      let missing = await fpgactl(["--server", server, "health", "clear", "0000:3b:0f.0", "--reason", "x"])
      #expect(missing.code == 1 && missing.err.contains("not managed by this node"))
      let noReason = await fpgactl(["--server", server, "health", "clear", "0000:3b:00.4", "--reason", ""])
      #expect(noReason.code == 1 && noReason.err.contains("reason is required"))
      let audit = await fpgactl(["--server", server, "audit", "--json"])
      #expect(audit.out.contains("ClearDeviceHealth") && audit.out.contains("card reseated, ticket 4711"))
    }
  }
}
