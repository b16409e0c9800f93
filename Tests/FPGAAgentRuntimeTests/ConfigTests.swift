import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentRuntime
import FPGACore
import Foundation
import Testing
import Logging
import FPGASimulator
import ArgumentParser

@Suite struct ConfigTests {
  @Test func defaultsAreValid() throws {
    let config = AgentConfig()
    try config.validate()
    #expect(config.server.listen == "127.0.0.1:50051")
    #expect(config.platform == .simulated)
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
    let config = try command.resolvedConfig(environment: [
      "FPGA_AGENT_LOG_FORMAT": "json", "FPGA_AGENT_LISTEN": "127.0.0.1:6500",
    ])
    #expect(config.server.listen == "127.0.0.1:7000", "the flag wins over env and file")
    #expect(config.server.unixSocket == "/run/x/agent.sock")
    #expect(config.stateDir == "/var/lib/x")
    #expect(config.log.level == .debug && config.log.format == .json)
    #expect(config.simulator.cards.count == 1)
    #expect(config.simulator.cards[0].bus == 0x5e && config.simulator.cards[0].totalVFs == [8, 8])

    let fromEnv = try ConfigOptions.parse(["--config", path]).resolvedConfig(environment: [
      "FPGA_AGENT_LISTEN": "127.0.0.1:6500"
    ])
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
      #expect(
        Set(error.problems) == [
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
    config.stateDir = "state"
    config.sharing.overcommitLimit = 0
    do {
      try config.validate()
      Issue.record("expected a ConfigError")
    } catch {
      // Each key's own checks (declaration order), then the rules across keys.
      #expect(
        error.problems == [
          "server.unix_socket \"relative.sock\" must be an absolute path",
          "state_dir \"state\" must be an absolute path",
          "sharing.overcommit_limit 0 is out of range: 1-64",
          "server.listen \"localhost\" is not HOST:PORT (e.g. 127.0.0.1:50051 or [::1]:50051)",
        ])
    }
  }

  @Test func closedSetsAreRefusedWhereTheyAreRead() {
    var config = AgentConfig()
    #expect(throws: ConfigError.self) {
      try ConfigLoader.apply(yaml: "platform: windows\nlog:\n  level: loud\n", source: "agent.yaml", to: &config)
    }
    do {
      try ConfigLoader.apply(yaml: "platform: windows\nlog:\n  level: loud\n", source: "agent.yaml", to: &config)
    } catch {
      #expect(
        error.problems == [
          "agent.yaml: log.level \"loud\" is not one of: trace, debug, info, notice, warning, error, critical",
          "agent.yaml: platform \"windows\" is not one of: simulated, linux",
        ])
    }
    do {
      try ConfigLoader.apply(environment: ["FPGA_AGENT_STATE_DURABILITY": "sometimes"], to: &config)
      Issue.record("expected a ConfigError")
    } catch {
      #expect(
        error.problems == ["FPGA_AGENT_STATE_DURABILITY (state_durability) \"sometimes\" is not one of: process, power"]
      )
    }
    // As flags, by the argument parser.
    #expect(throws: (any Error).self) { _ = try ConfigOptions.parse(["--platform", "windows"]) }
    #expect((try? ConfigOptions.parse(["--log-level", "trace"]).resolvedConfig(environment: [:]))?.log.level == .trace)
  }

  /// `--hypervisor` and `--libvirt-uri` set their keys over the environment; a backend not
  /// offered is refused by the parser.
  @Test func hypervisorFlags() throws {
    let resolution = try ConfigOptions.parse(["--hypervisor", "libvirt", "--libvirt-uri", "qemu+ssh://host/system"])
      .resolve(environment: ["FPGA_AGENT_HYPERVISOR": "qmp", "FPGA_AGENT_LIBVIRT_URI": "qemu:///session"])
    #expect(resolution.config.hypervisor == .libvirt && resolution.config.libvirt.uri == "qemu+ssh://host/system")
    #expect(resolution.sources["hypervisor"] == .flag && resolution.sources["libvirt.uri"] == .flag)
    #expect(throws: (any Error).self) { _ = try ConfigOptions.parse(["--hypervisor", "xen"]) }
  }

  /// The libvirt opt-in and filters: from a file, the environment and `--set`; an empty pattern is
  /// refused, naming the key.
  @Test func libvirtPauseAndDomainFilters() throws {
    var config = AgentConfig()
    try ConfigLoader.apply(
      yaml: """
        hypervisor: libvirt
        libvirt:
          qemu_monitor_pause: true
          domains: [instance-*, "vm-[ab]"]
          metadata_namespace: https://example.org/fpga
        """, source: "agent.yaml", to: &config)
    #expect(config.libvirt.qemuMonitorPause && config.libvirt.domains == ["instance-*", "vm-[ab]"])
    #expect(config.libvirt.metadataNamespace == "https://example.org/fpga")
    try config.validate()
    try ConfigLoader.apply(
      environment: ["FPGA_AGENT_LIBVIRT_DOMAINS": "a-*, b", "FPGA_AGENT_LIBVIRT_QEMU_MONITOR_PAUSE": "false"],
      to: &config)
    #expect(config.libvirt.domains == ["a-*", "b"] && !config.libvirt.qemuMonitorPause)
    let set = try ConfigOptions.parse(["--set", "libvirt.domains=x, y-*,", "--set", "hypervisor=libvirt"])
    #expect(try set.resolve(environment: [:]).config.libvirt.domains == ["x", "y-*"])
    #expect(
      try ConfigOptions.parse([]).resolve(environment: ["FPGA_AGENT_LIBVIRT_DOMAINS": ""]).config.libvirt.domains == [])
    do {
      var file = AgentConfig()
      try ConfigLoader.apply(yaml: "libvirt:\n  domains: ['vm-*', '']\n", source: "agent.yaml", to: &file)
      try file.validate()
      Issue.record("an empty pattern was accepted")
    } catch {
      #expect(error.problems.contains { $0.hasPrefix("libvirt.domains has an empty pattern") })
    }
  }

  /// `KUBECONFIG` is honoured (its first file); a context needs a kubeconfig.
  @Test func kubeconfigFromTheStandardVariable() throws {
    var config = AgentConfig()
    try ConfigLoader.apply(environment: ["KUBECONFIG": "/home/op/.kube/kind:/home/op/.kube/config"], to: &config)
    #expect(config.kubernetes.api.kubeconfig == "/home/op/.kube/kind")
    let flagged = try ConfigOptions.parse(["--kubeconfig", "/etc/k", "--kube-context", "lab"])
      .resolvedConfig(environment: ["KUBECONFIG": "/home/op/.kube/kind"])
    #expect(flagged.kubernetes.api.kubeconfig == "/etc/k")
    #expect(flagged.kubernetes.api.context == "lab")
    config = AgentConfig()
    config.kubernetes.dra.enabled = true
    config.kubernetes.api.context = "lab"
    do {
      try config.validate()
      Issue.record("expected a ConfigError")
    } catch {
      #expect(
        error.problems == [
          "kubernetes.api.context \"lab\" chooses a context, but no kubeconfig is given (kubernetes.api.kubeconfig, --kubeconfig, KUBECONFIG)"
        ])
    }
  }

  @Test func durabilityAndFaultInjectionAreChecked() throws {
    var config = AgentConfig()
    try ConfigLoader.apply(
      environment: [
        "FPGA_AGENT_FAULT_INJECTION": "crash-during:write-zero", "FPGA_AGENT_SIMULATOR_STATE_FILE": "hw.json",
      ], to: &config)
    do {
      try config.validate()
      Issue.record("expected a ConfigError")
    } catch {
      #expect(
        error.problems == [
          "simulator.state_file \"hw.json\" must be an absolute path",
          "fault_injection \"crash-during:write-zero\" is not crash-before:STEP, crash-after:STEP or fail:STEP (STEP: a step index or one of plan, pause, detach, write-zero, write-count, release, verify, bind, resume, reattach, commit, set-qmax)",
        ])
    }
    try ConfigLoader.apply(
      yaml: "state_durability: power\nfault_injection: \"crash-after:4\"\n", source: "agent.yaml", to: &config)
    config.simulator.stateFile = "/tmp/hw.json"
    try config.validate()
    #expect(config.stateDurability == .power && config.faultInjection == "crash-after:4")
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
      #expect(
        error.problems == [
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
      (error as? ConfigError)?.problems.contains {
        $0.contains("orchestrator.tls.cert") && $0.contains("orchestrator.insecure")
      } ?? false
    }
    let flags = try ConfigOptions.parse([
      "--orchestrator", "10.0.0.5:50060", "--kubelet-dir", "/var/lib/kubelet/device-plugins",
    ])
    .resolvedConfig(environment: [
      "FPGA_AGENT_ORCHESTRATOR_TLS_CERT": "/dev/null", "FPGA_AGENT_ORCHESTRATOR_TLS_KEY": "/dev/null",
      "FPGA_AGENT_ORCHESTRATOR_TLS_CA": "/dev/null",
    ])
    #expect(flags.orchestrator.address == "10.0.0.5:50060" && flags.orchestrator.tls.ca == "/dev/null")
    #expect(flags.kubernetes.devicePlugin && flags.kubernetes.kubeletDir == "/var/lib/kubelet/device-plugins")
    try flags.validate()
    #expect(flags.orchestrator.role == .operator)
  }

  /// The one declaration per key reaches the file, the environment, the flags, `--set` and the
  /// listing `--check-config` prints, each value with its source.
  @Test func everySourceIsNamedInTheListing() throws {
    let directory = NSTemporaryDirectory() + "fpga-config-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let path = directory + "/agent.yaml"
    try "http:\n  listen: 127.0.0.1:6080\nsharing:\n  slice_ms: 25\n".write(
      toFile: path, atomically: true, encoding: .utf8)
    let resolution = try ConfigOptions.parse([
      "--config", path, "--node-id", "n1", "--set", "sharing.overcommit_limit=8", "--set",
      "kubernetes.dra.publish_slices=false",
    ]).resolve(environment: ["FPGA_AGENT_RESCAN_INTERVAL_SECONDS": "0"])
    let lines = Set(resolution.listing.split(separator: "\n").map(String.init))
    for line in [
      "http.listen: 127.0.0.1:6080  # file", "sharing.slice_ms: 25  # file", "node_id: n1  # flag",
      "sharing.overcommit_limit: 8  # flag", "kubernetes.dra.publish_slices: false  # flag",
      "rescan_interval_seconds: 0  # environment", "server.listen: 127.0.0.1:50051  # default",
      "platform: simulated  # default",
    ] {
      #expect(lines.contains(line), "missing \(line)")
    }
    #expect(lines.count == ConfigKeys.all.count, "one line per key")
    // --set names the key it refuses.
    #expect {
      _ = try ConfigOptions.parse(["--set", "sharing.overcommit=8", "--set", "simulator.cards=[]", "--set", "x"])
        .resolve(environment: [:])
    } throws: { error in
      (error as? ConfigError)?.problems == [
        "--set: unknown key sharing.overcommit (`fpga-agent config-keys` lists them)",
        "--set: simulator.cards is a list and can only be set in the configuration file",
        "--set \"x\" is not KEY=VALUE",
      ]
    }
  }

  @Test func aMisspelledKeyIsRefusedWithItsPath() {
    var config = AgentConfig()
    do {
      try ConfigLoader.apply(
        yaml: "kubernetes:\n  dra:\n    enabeld: true\n  api:\n    server: https://k:6443\n",
        source: "agent.yaml", to: &config)
      Issue.record("expected a ConfigError")
    } catch {
      #expect(error.problems == ["agent.yaml: unknown key kubernetes.dra.enabeld"])
    }
  }

  /// Every flag the parser declares sets its key; every environment variable and path is unique.
  @Test func flagsAndVariablesFollowTheDeclarations() throws {
    let keys = ConfigKeys.all
    #expect(Set(keys.map(\.path)).count == keys.count)
    let variables = keys.compactMap(\.environment)
    #expect(Set(variables).count == variables.count)
    let options = try ConfigOptions.parse([
      "--listen", "127.0.0.1:1", "--unix-socket", "/tmp/a.sock", "--tls-cert", "/c", "--tls-key", "/k",
      "--tls-client-ca", "/ca", "--platform", "linux", "--state-dir", "/s", "--node-id", "n", "--log-level", "debug",
      "--log-format", "json", "--sysfs-root", "/sys", "--dev-root", "/dev", "--selector", "vendor=10ee",
      "--qmp-socket", "vm=/q.sock", "--qmp-dir", "/q", "--hypervisor", "libvirt",
      "--libvirt-uri", "qemu+ssh://h/system", "--orchestrator", "127.0.0.1:2", "--dra",
      "--dra-driver-name", "a.b", "--dra-registry-dir", "/r", "--dra-plugins-dir", "/p", "--cdi-dir", "/cdi",
      "--kube-api-server", "https://k:1", "--kube-token-file", "/t", "--kube-ca-file", "/kca", "--http-listen", "",
      "--orchestrator-tls-cert", "/oc", "--orchestrator-tls-key", "/ok", "--orchestrator-tls-ca", "/oca",
      "--kubelet-dir", "/kd", "--vf-device-model", "edu", "--kubeconfig", "/kc", "--kube-context", "c",
    ])
    let flagged = options.flagValues.map(\.flag)
    let declared = Set(keys.flatMap { $0.flags.compactMap { $0.split(separator: " ").first.map(String.init) } })
    #expect(
      Set(flagged) == declared,
      "flags without a key: \(Set(flagged).subtracting(declared)); keys naming a missing flag: \(declared.subtracting(flagged))"
    )
  }

  /// docs/operations.md's key table is the declarations' (regenerate: `fpga-agent config-keys --markdown`).
  @Test func theDocumentedTableIsGenerated() throws {
    let path = ShippedConfigTests.root.appendingPathComponent("docs/operations.md").path
    let text = try String(contentsOfFile: path, encoding: .utf8)
    let begin = "<!-- config-keys:begin (generated by `fpga-agent config-keys --markdown`) -->\n"
    let end = "\n<!-- config-keys:end -->"
    guard let from = text.range(of: begin), let to = text.range(of: end, range: from.upperBound..<text.endIndex) else {
      Issue.record("docs/operations.md has no generated key table")
      return
    }
    #expect(
      String(text[from.upperBound..<to.lowerBound]) == ConfigKeys.markdownTable,
      "docs/operations.md's key table is stale: run scripts/generate-config-docs")
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
    #expect(config.log.format == .json)
  }
}
