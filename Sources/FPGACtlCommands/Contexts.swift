import ArgumentParser
import FPGAAgentAPI
import GRPCCore
import SwiftProtobuf

struct Accelerators: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "The accelerators with their guests and sharing figures (utilization, switches, waits).")

  @OptionGroup var options: ServerOptions

  func run() async throws {
    let inventory = try await options.withAgent { try await $0.getInventory(.init(), options: options.callOptions) }
    Render.accelerators(inventory.accelerators).forEach(say)
  }
}

struct Contexts: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "List the registered contexts.")

  @OptionGroup var options: ServerOptions
  @Option(help: "Only this accelerator.") var accelerator: String?
  @Option(help: "Only this guest.") var guest: String?

  func run() async throws {
    let response = try await options.withAgent { client in
      try await client.listContexts(
        .with {
          $0.acceleratorID = accelerator ?? ""
          $0.guest = guest ?? ""
        }, options: options.callOptions)
    }
    Render.contexts(response.contexts).forEach(say)
  }
}

struct ContextCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "context", abstract: "Register, switch or delete a guest's accelerator context.",
    subcommands: [Register.self, Switch.self, Move.self, Delete.self])

  struct Move: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Move a context, with its pending work, to another accelerator.")

    @OptionGroup var options: ServerOptions
    @Argument(help: "The context (ctx-…).") var id: String
    @Argument(help: "The accelerator to move it to.") var accelerator: String

    func run() async throws {
      let response = try await options.withAgent { client in
        try await client.moveContext(
          .with {
            $0.contextID = id
            $0.acceleratorID = accelerator
          }, options: options.callOptions)
      }
      say("moved \(id) to \(response.context.acceleratorID) with \(Render.millis(response.carried)) of pending work")
    }
  }

  struct Register: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Bind a guest to an accelerator with its context.")

    @OptionGroup var options: ServerOptions
    @Argument(help: "The accelerator (card-DDDD:BB/accN).") var accelerator: String
    @Argument(help: "The guest (a VM name or an allocation id).") var guest: String
    @Argument(help: "The function, e.g. aes256-gcm.") var function: String
    @Option(name: .customLong("param"), help: "A parameter NAME=VALUE (repeatable).") var parameters: [String] = []
    @Option(name: .customLong("state-bytes"), help: "Size of the saved state.") var stateBytes: UInt64 = 0
    @Option(help: "Weight in time sharing (1-1000).") var weight: UInt32 = 1
    @Option(help: "Idempotency key.") var key: String?

    func run() async throws {
      var parsed: [String: String] = [:]
      for parameter in parameters {
        guard let equals = parameter.firstIndex(of: "=") else {
          throw CtlError.usage("--param \(parameter): expected NAME=VALUE")
        }
        parsed[String(parameter[..<equals])] = String(parameter[parameter.index(after: equals)...])
      }
      let response = try await options.withAgent { client in
        try await client.registerContext(
          .with {
            $0.meta = requestMeta(key: key, epoch: nil)
            $0.context.acceleratorID = accelerator
            $0.context.guest = guest
            $0.context.function = function
            $0.context.parameters = parsed
            $0.context.savedStateBytes = stateBytes
            $0.context.weight = weight
          }, options: options.callOptions)
      }
      let context = response.context
      say(
        "\(response.replayed ? "already registered" : "registered") \(context.id): guest \(context.guest) on "
          + "\(context.acceleratorID) (\(context.function), weight \(context.weight))")
    }
  }

  struct Switch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Load a context: at the next slice, or --now.")

    @OptionGroup var options: ServerOptions
    @Argument(help: "The context (ctx-…).") var id: String
    @Flag(help: "Preempt the running context now and wait for the switch.") var now = false

    func run() async throws {
      let response = try await options.withAgent { client in
        try await client.switchContext(
          .with {
            $0.contextID = id
            $0.timing = now ? .now : .nextSlice
          }, options: options.callOptions)
      }
      say(
        response.switched
          ? "switched to \(id) in \(Render.millis(response.switchTime))" : "\(id) runs at the next slice")
    }
  }

  struct Delete: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Delete a context; its guest leaves the accelerator.")

    @OptionGroup var options: ServerOptions
    @Argument(help: "The context (ctx-…).") var id: String

    func run() async throws {
      _ = try await options.withAgent { client in
        try await client.deleteContext(.with { $0.contextID = id }, options: options.callOptions)
      }
      say("deleted \(id)")
    }
  }
}

struct Policy: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Set an accelerator's time slice, guest weights and overcommit limit.")

  @OptionGroup var options: ServerOptions
  @Argument(help: "The accelerator (card-DDDD:BB/accN).") var accelerator: String
  @Option(name: .customLong("slice-ms"), help: "Time slice in milliseconds.") var sliceMilliseconds: Double = 10
  @Option(help: "Most guests sharing it (1 = no overcommitment).") var limit: UInt32 = 4
  @Option(name: .customLong("weight"), help: "GUEST=WEIGHT (repeatable).") var weights: [String] = []

  func run() async throws {
    var parsed: [String: UInt32] = [:]
    for item in weights {
      guard let equals = item.firstIndex(of: "="), let weight = UInt32(item[item.index(after: equals)...]) else {
        throw CtlError.usage("--weight \(item): expected GUEST=WEIGHT")
      }
      parsed[String(item[..<equals])] = weight
    }
    guard sliceMilliseconds > 0, sliceMilliseconds <= 10_000 else {
      throw CtlError.usage("--slice-ms \(sliceMilliseconds): expected a value in (0, 10000]")
    }
    let nanos = Int64(sliceMilliseconds * 1_000_000)
    let response = try await options.withAgent { client in
      try await client.setSharingPolicy(
        .with {
          $0.policy.acceleratorID = accelerator
          $0.policy.timeSlice = .with {
            $0.seconds = nanos / 1_000_000_000
            $0.nanos = Int32(nanos % 1_000_000_000)
          }
          $0.policy.overcommitLimit = limit
          $0.policy.weights = parsed
        }, options: options.callOptions)
    }
    let policy = response.policy
    let weightsText = policy.weights.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
    say(
      "\(accelerator): slice \(Render.millis(policy.timeSlice)), at most \(policy.overcommitLimit) guests"
        + (weightsText.isEmpty ? "" : ", weights \(weightsText)"))
  }
}
