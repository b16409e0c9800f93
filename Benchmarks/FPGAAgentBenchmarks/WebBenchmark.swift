import FPGAAgentConfig
#if canImport(Glibc)
  import Glibc
#endif
import FPGAAgentAPI
import FPGAAgentRuntime
import FPGACore
import FPGASimulator
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Logging
import SwiftProtobuf

/// What the dashboard and Prometheus cost: `GET /metrics` and `GET /api/state` of a 1,008-VF
/// node against a `GetInventory` of the same node over gRPC (the baseline), one call in flight,
/// in the same agent process and the same run; rounds alternate.
enum WebBenchmark {
  static func run(seconds: Double, rounds: Int, logger: Logger) async throws {
    let directory = NSTemporaryDirectory() + "fpga-bench-web-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    var config = AgentConfig()
    config.server.listen = "127.0.0.1:0"
    config.server.unixSocket = ""
    config.http.listen = "127.0.0.1:0"
    config.stateDir = directory + "/state"
    config.nodeID = "bench"
    config.rescanIntervalSeconds = 0
    config.simulator.cards = SimulatorConfig.full(cards: 4).cards
    config.simulator.acceleratorsPerCard = 2
    config.simulator.workloads = []
    let runtime = try AgentRuntime(config: config, logger: logger)
    try await withThrowingDiscardingTaskGroup { group in
      group.addTask { try await runtime.run() }
      guard let grpcPort = try await runtime.tcpPort() else { fatalError("no gRPC port") }
      var httpPort = runtime.httpPort
      while httpPort == nil {
        try await Task.sleep(for: .milliseconds(10))
        httpPort = runtime.httpPort
      }
      let http = try HTTPConnection(port: httpPort!)
      try await withGRPCClient(
        transport: .http2NIOPosix(target: .ipv4(address: "127.0.0.1", port: grpcPort), transportSecurity: .plaintext)
      ) { client in
        let node = Fpga_Agent_V1_NodeAgent.Client(wrapping: client)
        let vfs = await runtime.engine.status().counts.vfsEnabled
        let duration = Duration.seconds(seconds)
        // Warm-up.
        for _ in 0..<20 {
          _ = try await node.getInventory(.init())
          _ = try http.get("/metrics")
          _ = try http.get("/api/state")
        }
        var inventory = Sample()
        var metrics = Sample()
        var state = Sample()
        for _ in 0..<rounds {
          inventory.merge(
            try await measure(concurrency: 1, duration: duration) { _ in
              _ = try await node.getInventory(.init())
            })
          metrics.merge(try await measure(concurrency: 1, duration: duration) { _ in _ = try http.get("/metrics") })
          state.merge(try await measure(concurrency: 1, duration: duration) { _ in _ = try http.get("/api/state") })
        }
        let inventorySize = (try await node.getInventory(.init()).serializedBytes() as [UInt8]).count
        let metricsSize = try http.get("/metrics")
        let stateSize = try http.get("/api/state")
        print("")
        print(
          "web: the agent's HTTP listener on a node of \(vfs) VFs, one call in flight, \(rounds) rounds of \(seconds) s"
        )
        print(row("GetInventory (gRPC, baseline)", inventory) + "  \(inventorySize / 1024) KiB")
        print(row("GET /metrics", metrics) + "  \(metricsSize / 1024) KiB")
        print(row("GET /api/state", state) + "  \(stateSize / 1024) KiB")
        print(
          "ratio: /metrics p50 \(format(metrics.percentile(0.5) / inventory.percentile(0.5)))x GetInventory, "
            + "/api/state p50 \(format(state.percentile(0.5) / inventory.percentile(0.5)))x GetInventory")
      }
      http.close()
      await runtime.shutdown()
    }
  }
}

/// A keep-alive HTTP/1.1 client on one socket, enough to time GETs without a client library's
/// own costs in the way.
final class HTTPConnection: @unchecked Sendable {
  private let fd: Int32
  private let lock = NSLock()

  init(port: Int) throws {
    fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    let connected = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
      }
    }
    guard connected == 0 else { throw POSIXError(.ECONNREFUSED) }
  }

  /// Sends a GET, reads the whole answer; returns the body's size.
  func get(_ path: String) throws -> Int {
    try lock.withLock {
      let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".utf8)
      guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, 0) }) == request.count else {
        throw POSIXError(.EIO)
      }
      var received: [UInt8] = []
      var buffer = [UInt8](repeating: 0, count: 1 << 16)
      var headerEnd: Int?
      var length = 0
      var chunked = false
      while true {
        let count = recv(fd, &buffer, buffer.count, 0)
        guard count > 0 else { throw POSIXError(.EIO) }
        received += buffer[0..<count]
        if headerEnd == nil, let end = Self.find([13, 10, 13, 10], in: received) {
          headerEnd = end + 4
          let head = String(decoding: received[0..<end], as: UTF8.self).lowercased()
          for line in head.split(separator: "\r\n") {
            if line.hasPrefix("content-length:") {
              length = Int(line.dropFirst(15).trimmingCharacters(in: .whitespaces)) ?? 0
            }
            if line.hasPrefix("transfer-encoding:") && line.contains("chunked") { chunked = true }
          }
        }
        guard let start = headerEnd else { continue }
        if chunked {
          if received.count >= 5, received.suffix(5) == [48, 13, 10, 13, 10] { return received.count - start }
        } else if received.count - start >= length {
          return length
        }
      }
    }
  }

  static func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
    guard haystack.count >= needle.count else { return nil }
    for index in 0...(haystack.count - needle.count) where haystack[index..<index + needle.count].elementsEqual(needle)
    {
      return index
    }
    return nil
  }

  func close() { _ = Glibc.close(fd) }
}
