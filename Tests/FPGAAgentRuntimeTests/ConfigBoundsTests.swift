import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import FPGAAgentRuntime
import FPGACore
import Testing

/// Numbers of the configuration file that only lists and mappings carry are bounded too, and an
/// extreme one is a problem naming its key, not an overflow.
@Suite struct ConfigBoundsTests {
  @Test func extremeNumbersInListsAreProblemsNotTraps() throws {
    var config = AgentConfig()
    try ConfigLoader.apply(
      yaml: """
        simulator:
          cards:
            - bus: 0x3b
              numa_node: 9223372036854775807
              total_vfs: [9223372036854775807, 1]
          workloads:
            - guest: tenant-a
              accelerator: card-0000:3b/acc0
              state_bytes: 9223372036854775807
        """, source: "agent.yaml", to: &config)
    let error = #expect(throws: ConfigError.self) { try config.validate() }
    let problems = error?.problems ?? []
    #expect(problems.contains("simulator.cards[0].numa_node 9223372036854775807 is out of range: -1 (none) to 1023"))
    #expect(problems.contains("simulator.cards[0].total_vfs must be non-negative and add up to at most 252"))
    #expect(
      problems.contains(
        "simulator.workloads[0].state_bytes 9223372036854775807 is out of range: 0-268435456 (256 MiB)"))
  }
}
