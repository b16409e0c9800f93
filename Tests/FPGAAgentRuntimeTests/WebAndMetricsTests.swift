import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import FPGACore
import FPGATestSupport
import Foundation
import Testing

@testable import FPGAAgentRuntime
import GRPCCore

@Suite struct WebAccessTests {
  func access(plaintext: Bool = true) throws -> WebAccess {
    let file = NSTemporaryDirectory() + "fpga-tokens-" + UUID().uuidString.prefix(8)
    try "# TOKEN,NAME\nop-token-0123456789abcdef,ops\n\nview-token-0123456789abcd,grafana,extra\n"
      .write(toFile: file, atomically: true, encoding: .utf8)
    defer { try? FileManager.default.removeItem(atPath: file) }
    var auth = AgentConfig.Auth()
    auth.roles = ["token:ops": .operator, "token:grafana": .viewer]
    return WebAccess(auth: auth, tokens: try WebAccess.tokens(file: file), plaintextAllowed: plaintext)
  }

  @Test func tokensByBasicOrBearerGiveTheirRoles() throws {
    let access = try access()
    let basic = "Basic " + Data("anyone:op-token-0123456789abcdef".utf8).base64EncodedString()
    let ops = try access.caller(authorization: basic, peer: "10.0.0.1")
    #expect(ops.identity == "token:ops" && ops.role == .operator && ops.transport == "http")
    let grafana = try access.caller(authorization: "Bearer view-token-0123456789abcd", peer: "10.0.0.1")
    #expect(grafana.identity == "token:grafana" && grafana.role == .viewer)
    #expect(throws: WebAccess.Failure.self) {
      try access.caller(authorization: "Bearer op-token-0123456789abcdeX", peer: "p")
    }
    #expect(throws: WebAccess.Failure.self) { try access.caller(authorization: "Bearer op-token", peer: "p") }
    #expect(throws: WebAccess.Failure.self) { try access.caller(authorization: "Digest x", peer: "p") }
    // No credentials: the plaintext role on loopback, nothing elsewhere.
    #expect(try access.caller(authorization: nil, peer: "127.0.0.1").role == .viewer)
    #expect(throws: WebAccess.Failure.self) { try self.access(plaintext: false).caller(authorization: nil, peer: "p") }
  }

  @Test func aBadTokenFileIsRefusedWithItsLine() throws {
    let file = NSTemporaryDirectory() + "fpga-tokens-" + UUID().uuidString.prefix(8)
    try "short,name\n".write(toFile: file, atomically: true, encoding: .utf8)
    defer { try? FileManager.default.removeItem(atPath: file) }
    #expect { try WebAccess.tokens(file: file) } throws: { error in
      (error as? ConfigError)?.problems.first?.contains("line 1") ?? false
    }
  }

  @Test func httpOffLoopbackNeedsInsecure() throws {
    var config = AgentConfig()
    config.http.listen = "0.0.0.0:50080"
    #expect { try config.validate() } throws: { error in
      (error as? ConfigError)?.problems.contains { $0.contains("http.insecure") } ?? false
    }
    config.http.insecure = true
    try config.validate()
  }
}

@Suite struct MetricsTests {
  /// Sums the samples of one family whose labels contain every given pair.
  func sum(_ text: String, _ name: String, _ labels: [String] = []) -> Double {
    text.split(separator: "\n").filter { line in
      line.hasPrefix(name + "{") && labels.allSatisfy { line.contains($0) }
    }.compactMap { Double($0.split(separator: " ").last ?? "") }.reduce(0, +)
  }

  @Test func vfCountsFollowTheInventoryAndGoneSeriesGo() async throws {
    try await TestAgent.with { agent in
      let metrics = AgentMetrics(version: "test", storeStatistics: { (transactions: 3, commits: 7) })
      await agent.engine.observeOperations { metrics.operationEnded($0) }
      let before = await metrics.scrape(agent.engine)
      let counts = await agent.engine.status().counts
      #expect(sum(before, "fpga_vfs") == Double(counts.vfsEnabled))
      #expect(sum(before, "fpga_vfs", [#"state="free""#]) == Double(counts.vfsFree))
      #expect(before.contains(#"fpga_node_health{state="serving"} 1.0"#))
      let allocated = try await agent.engine.allocate(AllocateRequest(owner: "m"))
      let after = await metrics.scrape(agent.engine)
      #expect(sum(after, "fpga_vfs", [#"state="allocated""#]) == 1)
      #expect(sum(after, "fpga_allocations", [#"state="unattached""#]) == 1)
      // A PF taken to 0 VFs: its VFs' series disappear, not left at old values.
      let pf = allocated.allocation.pf
      _ = try await agent.engine.release(ReleaseRequest(allocationID: allocated.allocation.id))
      let operation = try await agent.engine.reconfigure(ReconfigureRequest(pf: pf, count: 0))
      await agent.engine.waitForOperation(operation.id)
      let emptied = await metrics.scrape(agent.engine)
      #expect(sum(emptied, "fpga_vfs", ["pf=\"\(pf)\""]) == 0)
      #expect(sum(emptied, "fpga_pf_sriov_vfs", ["pf=\"\(pf)\""]) == 0)
      #expect(emptied.contains(#"fpga_agent_operations_total{kind="reconfigure",result="succeeded"} 1"#))
      #expect(
        emptied.contains(#"fpga_agent_operation_duration_seconds_count{kind="reconfigure",result="succeeded"} 1"#))
      #expect(
        emptied.contains(#"fpga_agent_operation_step_duration_seconds_count{kind="reconfigure",step="verify"} 1"#))
      #expect(emptied.contains("fpga_store_commits_total 7") && emptied.contains("fpga_store_transactions_total 3"))
      #expect(emptied.contains("fpga_agent_watcher_cutoffs_total 0"))
    }
  }

  @Test func rpcCodesAreSpelledAsGRPCDoes() {
    #expect(MetricsInterceptor.name(.invalidArgument) == "INVALID_ARGUMENT")
    #expect(MetricsInterceptor.name(.unavailable) == "UNAVAILABLE")
  }
}

@Suite struct AcceleratorMetricsTests {
  @Test func switchesAndWaitsReachTheirHistograms() async throws {
    try await TestAgent.with(configure: { $0.simulator.acceleratorsPerCard = 1 }) { agent in
      // The runtime's own catalog sees what the accelerators report.
      let first = try await agent.engine.registerContext(
        .init(acceleratorID: "card-0000:3b/acc0", guest: "g1", function: "f")
      ).0
      let second = try await agent.engine.registerContext(
        .init(acceleratorID: "card-0000:3b/acc0", guest: "g2", function: "f")
      ).0
      _ = try await agent.engine.switchContext(first.id, now: true, meta: RequestMeta())
      _ = try await agent.engine.switchContext(second.id, now: true, meta: RequestMeta())
      let text = await agent.runtime.metrics.scrape(agent.engine)
      let switches = text.split(separator: "\n").first {
        $0.hasPrefix(#"fpga_accelerator_context_switches_total{accelerator="card-0000:3b/acc0"}"#)
      }
      #expect(switches.flatMap { Int($0.split(separator: " ").last ?? "") }.map { $0 >= 2 } == true, "\(text)")
      #expect(
        text.contains(
          #"fpga_accelerator_context_switch_duration_seconds_bucket{accelerator="card-0000:3b/acc0",le="+Inf"}"#))
    }
  }
}
