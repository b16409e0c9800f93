import FPGAAgentRuntime

await AgentCommand.execute(Array(CommandLine.arguments.dropFirst()))
