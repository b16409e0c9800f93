import FPGAAgentAPI
import FPGACore
import FPGAQEMU
import FPGAQMP
import FPGASimulator
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SwiftProtobuf

/// Agent AttachVF+DetachVF (gRPC → engine → QMP) against raw device_add+device_del (+ waiting
/// for DEVICE_DELETED) on the same QEMU, in the same run. QEMU's `edu` device stands in for a VF.
enum AttachBenchmark {
  static func run(cycles: Int, rounds: Int, logger: Logger) async throws {
    guard FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64") else {
      print("\nattach/detach: qemu-system-x86_64 not installed, skipped")
      return
    }
    let directory = NSTemporaryDirectory() + "fpga-bench-qemu-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let qemu = Process()
    qemu.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-system-x86_64")
    qemu.arguments = [
      "-machine", "q35", "-accel", "tcg", "-nodefaults", "-nographic", "-display", "none", "-m", "64", "-S",
      "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
      "-device", "pcie-root-port,id=rp1,chassis=1,slot=1", "-device", "pcie-root-port,id=rp2,chassis=2,slot=2",
      "-qmp", "unix:\(directory)/agent.sock,server=on,wait=off", "-qmp",
      "unix:\(directory)/raw.sock,server=on,wait=off",
    ]
    qemu.standardOutput = FileHandle.nullDevice
    qemu.standardError = FileHandle.nullDevice
    try qemu.run()
    defer {
      kill(qemu.processIdentifier, SIGKILL)
      for _ in 0..<500 where qemu.isRunning { usleep(10_000) }
    }
    for _ in 0..<500 where !FileManager.default.fileExists(atPath: directory + "/raw.sock") { usleep(10_000) }

    var settings = QEMUHypervisor.Settings()
    settings.sockets = ["vm1": directory + "/agent.sock"]
    settings.deviceModel = "edu"
    let node = SimulatedNode()
    let engine = NodeEngine(
      nodeID: "bench", platform: SimulatedPlatform(node: node), clock: WallClockNow(),
      hypervisor: QEMUHypervisor(settings: settings))
    try await engine.rescan()
    let server = GRPCServer(
      transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: 0), transportSecurity: .plaintext),
      services: [NodeAgentService(engine: engine, hostname: "bench", agentVersion: "bench", logger: logger)])
    let raw = try await QMPClient.connect(path: directory + "/raw.sock")

    try await withThrowingDiscardingTaskGroup { group in
      group.addTask { try await server.serve() }
      guard let port = try await server.listeningAddress?.ipv4?.port else { return }
      try await withGRPCClient(
        transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext)
      ) { client in
        let agent = Fpga_Agent_V1_NodeAgent.Client(wrapping: client)
        let allocation = try await agent.allocateVF(.with { $0.owner = "bench" }).allocation
        let clock = ContinuousClock()
        var rawTimes: [Double] = []
        var agentTimes: [Double] = []
        for round in 0..<rounds {
          for cycle in 0..<cycles {
            let id = "raw\(round)x\(cycle)"
            let began = clock.now
            _ = try await raw.execute("device_add", ["driver": "edu", "id": .string(id), "bus": "rp2"])
            let deleted = raw.expectEvent("DEVICE_DELETED") { $0["device"]?.stringValue == id }
            _ = try await raw.execute("device_del", ["id": .string(id)])
            _ = try await deleted.wait(timeout: .seconds(10))
            rawTimes.append(seconds(clock.now - began) * 1000)
          }
          for _ in 0..<cycles {
            let began = clock.now
            _ = try await agent.attachVF(
              .with {
                $0.allocationID = allocation.id; $0.vm = "vm1"
              })
            _ = try await agent.detachVF(.with { $0.allocationID = allocation.id })
            agentTimes.append(seconds(clock.now - began) * 1000)
          }
        }
        func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }
        func mean(_ values: [Double]) -> Double { values.reduce(0, +) / Double(values.count) }
        print("")
        print("attach+detach on a real QEMU \(raw.version) (edu as the VF), \(rounds) rounds x \(cycles) cycles each:")
        print(
          "  raw device_add+device_del+DEVICE_DELETED   mean \(format(mean(rawTimes))) ms  p50 \(format(median(rawTimes))) ms"
        )
        print(
          "  agent AttachVF+DetachVF over gRPC          mean \(format(mean(agentTimes))) ms  p50 \(format(median(agentTimes))) ms"
        )
        print("  ratio: \(format(mean(agentTimes) / mean(rawTimes)))x raw (target <= 1.2)")
      }
      server.beginGracefulShutdown()
    }

  }
}
