import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentRuntime
import FPGACore
import FPGATestSupport
import Foundation
import Logging
import Testing

@Suite struct RuntimeTests {
  func config(in directory: String) -> AgentConfig {
    var config = AgentConfig()
    config.server.listen = "127.0.0.1:0"
    config.http.listen = "127.0.0.1:0"
    config.server.unixSocket = directory + "/agent.sock"
    config.stateDir = directory + "/state"
    config.rescanIntervalSeconds = 0
    return config
  }

  func temporaryDirectory() throws -> String {
    let directory = NSTemporaryDirectory() + "fpga-runtime-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    return directory
  }

  @Test func theNodeIDIsKeptInTheStateDirectory() throws {
    let directory = try temporaryDirectory()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let first = try AgentRuntime(config: config(in: directory), logger: Logger(label: "t"))
    let second = try AgentRuntime(config: config(in: directory), logger: Logger(label: "t"))
    #expect(first.engine.nodeID == second.engine.nodeID)
    let stored = try String(contentsOfFile: directory + "/state/node-id", encoding: .utf8)
    #expect(stored == first.engine.nodeID + "\n")
  }

  @Test func aStaleSocketIsReplacedButALiveOneIsNot() async throws {
    let directory = try temporaryDirectory()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    // A live agent owns the socket: a second one must refuse to take it.
    try await TestAgent.with { agent in
      var clash = config(in: agent.directory)
      clash.stateDir = directory + "/state2"
      #expect(throws: SystemCalls.Failure.self) { try AgentRuntime(config: clash, logger: Logger(label: "t")) }
    }
    // A file that is not a socket is never removed.
    _ = FileManager.default.createFile(atPath: directory + "/agent.sock", contents: Data("keep".utf8))
    #expect(throws: SystemCalls.Failure.self) {
      try AgentRuntime(config: config(in: directory), logger: Logger(label: "t"))
    }
    #expect(FileManager.default.fileExists(atPath: directory + "/agent.sock"))
  }

  @Test func aMissingSysfsRootIsRefusedNamingTheKey() throws {
    let directory = try temporaryDirectory()
    defer { try? FileManager.default.removeItem(atPath: directory) }
    var linux = config(in: directory)
    linux.platform = .linux
    linux.linux.sysfsRoot = directory + "/no-such-sys"
    do {
      _ = try AgentRuntime(config: linux, logger: Logger(label: "t"))
      Issue.record("expected a ConfigError")
    } catch let error as ConfigError {
      #expect(error.problems.first?.hasPrefix("linux.sysfs_root \"\(directory)/no-such-sys\" cannot be opened") == true)
    }
  }

  @Test func gracefulShutdownRemovesTheSocket() async throws {
    var path = ""
    try await TestAgent.with { agent in
      path = agent.socketPath
      #expect(FileManager.default.fileExists(atPath: path))
    }
    #expect(!FileManager.default.fileExists(atPath: path))
  }
}
