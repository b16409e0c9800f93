import FPGAAgentRuntime
import FPGACore
import Foundation
import Testing

@Suite struct ConfigTests {
  @Test func defaultsAreValid() throws {
    let config = AgentConfig()
    try config.validate()
    #expect(config.server.listen == "127.0.0.1:50051")
    #expect(config.platform == "simulated")
    #expect(config.simulator.cards.count == 2)
  }

  @Test func fileThenEnvironmentThenFlags() throws {
    let directory = NSTemporaryDirectory() + "fpga-config-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let path = directory + "/agent.yaml"
    try """
      server:
        listen: 0.0.0.0:6000
        unix_socket: /run/x/agent.sock
      state_dir: /var/lib/x
      log:
        level: debug
      simulator:
        cards:
          - bus: "5e"
            numa_node: 1
            total_vfs: [8, 8]
            enabled_vfs: [2, 0]
      """.write(toFile: path, atomically: true, encoding: .utf8)
    let command = try ConfigOptions.parse(["--config", path, "--listen", "127.0.0.1:7000"])
    let config = try command.resolvedConfig(environment: ["FPGA_AGENT_LOG_FORMAT": "json", "FPGA_AGENT_LISTEN": "127.0.0.1:6500"])
    #expect(config.server.listen == "127.0.0.1:7000", "the flag wins over env and file")
    #expect(config.server.unixSocket == "/run/x/agent.sock")
    #expect(config.stateDir == "/var/lib/x")
    #expect(config.log.level == "debug" && config.log.format == "json")
    #expect(config.simulator.cards.count == 1)
    #expect(config.simulator.cards[0].bus == 0x5e && config.simulator.cards[0].totalVFs == [8, 8])

    let fromEnv = try ConfigOptions.parse(["--config", path]).resolvedConfig(environment: ["FPGA_AGENT_LISTEN": "127.0.0.1:6500"])
    #expect(fromEnv.server.listen == "127.0.0.1:6500", "env wins over the file")
  }

  @Test func unknownKeysAndBadValuesAreNamed() {
    var config = AgentConfig()
    do {
      try ConfigLoader.apply(
        yaml: """
          server:
            listn: 1
          platfrom: linux
          rescan_interval_seconds: soon
          simulator:
            cards:
              - bus: zz
          """, source: "agent.yaml", to: &config)
      Issue.record("expected a ConfigError")
    } catch {
      #expect(Set(error.problems) == [
        "agent.yaml: unknown key platfrom",
        "agent.yaml: rescan_interval_seconds must be a whole number",
        "agent.yaml: unknown key server.listn",
        "agent.yaml: simulator.cards[0].bus must be a number from 0 to 255 (or hex text like \"3b\")",
      ])
    }
  }

  @Test func validationNamesEachKey() {
    var config = AgentConfig()
    config.server.listen = "localhost"
    config.server.unixSocket = "relative.sock"
    config.platform = "windows"
    config.stateDir = "state"
    config.log.level = "loud"
    do {
      try config.validate()
      Issue.record("expected a ConfigError")
    } catch {
      #expect(error.problems == [
        "server.listen \"localhost\" is not HOST:PORT (e.g. 127.0.0.1:50051 or [::1]:50051)",
        "server.unix_socket \"relative.sock\" must be an absolute path",
        "platform \"windows\" is not one of: simulated, linux",
        "state_dir \"state\" must be an absolute path",
        "log.level \"loud\" is not one of: trace, debug, info, notice, warning, error, critical",
      ])
    }
  }

  @Test func durabilityAndFaultInjectionAreChecked() throws {
    var config = AgentConfig()
    try ConfigLoader.apply(
      environment: [
        "FPGA_AGENT_STATE_DURABILITY": "sometimes", "FPGA_AGENT_FAULT_INJECTION": "crash-during:write-zero",
        "FPGA_AGENT_SIMULATOR_STATE_FILE": "hw.json",
      ], to: &config)
    do {
      try config.validate()
      Issue.record("expected a ConfigError")
    } catch {
      #expect(error.problems == [
        "state_durability \"sometimes\" is not one of: process, power",
        "fault_injection \"crash-during:write-zero\" is not crash-before:STEP, crash-after:STEP or fail:STEP (STEP: a step index or one of plan, pause, detach, write-zero, write-count, release, verify, bind, resume, reattach, commit)",
        "simulator.state_file \"hw.json\" must be an absolute path",
      ])
    }
    try ConfigLoader.apply(
      yaml: "state_durability: power\nfault_injection: \"crash-after:4\"\n", source: "agent.yaml", to: &config)
    config.simulator.stateFile = "/tmp/hw.json"
    try config.validate()
    #expect(config.stateDurability == "power" && config.faultInjection == "crash-after:4")
  }

  @Test func orchestratorAndKubernetesKeysAreChecked() throws {
    var config = AgentConfig()
    try ConfigLoader.apply(
      yaml: """
        orchestrator:
          address: nowhere
        kubernetes:
          device_plugin: true
          kubelet_dir: relative/dir
          pools:
            - resource: qdma-vf
              pfs: ["3b:00.0"]
        """, source: "agent.yaml", to: &config)
    do {
      try config.validate()
      Issue.record("expected a ConfigError")
    } catch {
      #expect(error.problems == [
        "orchestrator.address \"nowhere\" is not HOST:PORT",
        "kubernetes.kubelet_dir \"relative/dir\" must be an absolute path",
        "kubernetes.pools[0].resource \"qdma-vf\" is not domain/name (e.g. xilinx.com/qdma-vf)",
        "kubernetes.pools[0].pfs: \"3b:00.0\" is not a PCI address (DDDD:BB:DD.F)",
      ])
    }
    // A plaintext link off loopback is refused, naming what to set.
    #expect {
      _ = try ConfigOptions.parse(["--orchestrator", "10.0.0.5:50060"]).resolvedConfig(environment: [:])
    } throws: { error in
      (error as? ConfigError)?.problems.contains { $0.contains("orchestrator.tls.cert") && $0.contains("orchestrator.insecure") } ?? false
    }
    let flags = try ConfigOptions.parse(["--orchestrator", "10.0.0.5:50060", "--kubelet-dir", "/var/lib/kubelet/device-plugins"])
      .resolvedConfig(environment: ["FPGA_AGENT_ORCHESTRATOR_TLS_CERT": "/dev/null", "FPGA_AGENT_ORCHESTRATOR_TLS_KEY": "/dev/null", "FPGA_AGENT_ORCHESTRATOR_TLS_CA": "/dev/null"])
    #expect(flags.orchestrator.address == "10.0.0.5:50060" && flags.orchestrator.tls.ca == "/dev/null")
    #expect(flags.kubernetes.devicePlugin && flags.kubernetes.kubeletDir == "/var/lib/kubelet/device-plugins")
    try flags.validate()
    #expect(flags.summary.contains("orchestrator:\n  address: 10.0.0.5:50060"))
    #expect(flags.summary.contains("  role: operator"))
  }

  @Test func listenAddresses() {
    #expect(ListenAddress("127.0.0.1:50051") == ListenAddress("127.0.0.1:50051"))
    #expect(ListenAddress("[::1]:50051")?.isIPv6 == true)
    #expect(ListenAddress("[::1]:50051")?.host == "::1")
    #expect(ListenAddress("127.0.0.1:70000") == nil)
    #expect(ListenAddress("::1:50051") == nil)
    #expect(ListenAddress(":50051") == nil)
  }
}

@Suite struct ShippedConfigTests {
  static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()

  @Test func theExampleConfigurationIsValid() throws {
    let path = Self.root.appendingPathComponent("deploy/fpga-agent.yaml").path
    let command = try ConfigOptions.parse(["--config", path])
    let config = try command.resolvedConfig(environment: [:])
    #expect(config.server.unixSocket == "/run/fpga-agent/agent.sock")
    #expect(config.simulator.cards.map(\.bus) == [0x3b, 0xd8])
    #expect(config.log.format == "json")
  }
}
