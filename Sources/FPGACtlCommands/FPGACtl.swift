public import ArgumentParser
import FPGAAgentAPI
import GRPCCore
import SwiftProtobuf

/// `fpgactl`: the command line of the node API.
public struct FPGACtl: AsyncParsableCommand {
  public static let configuration = CommandConfiguration(
    commandName: "fpgactl",
    abstract: "Command line for fpga-agent: inventory, allocations, drains, operations.",
    version: "0.1.0",
    subcommands: [
      Status.self, Inventory.self, Rescan.self, Allocate.self, Release.self, Watch.self, Drain.self,
      Undrain.self, Reconfigure.self, OperationCommand.self, VMs.self, Attach.self, Detach.self,
      Accelerators.self, Contexts.self, ContextCommand.self, Policy.self, WhoAmI.self, Audit.self,
      HealthCommand.self,
    ])

  public init() {}

  /// Parses and runs `arguments`, reporting errors on the console; returns the exit code
  /// (0 ok, 1 the agent refused, 2 usage, 3 the agent is unreachable).
  public static func execute(_ arguments: [String]) async -> Int32 {
    do {
      var command = try parseAsRoot(hoistGlobalOptions(arguments))
      if var asyncCommand = command as? any AsyncParsableCommand {
        try await asyncCommand.run()
      } else {
        try command.run()
      }
      return 0
    } catch let error as CtlError {
      switch error {
      case .usage(let message):
        complain("error: \(message)")
        return 2
      case .operationFailed(let id):
        complain("error: operation \(id) failed (`fpgactl operation \(id)` shows it again)")
        return 1
      case .unreachable(let address, let detail):
        complain(
          "error: cannot reach the agent at \(address): is fpga-agent running there? "
            + "(start it with `swift run fpga-agent`, or point --server / FPGACTL_SERVER at it; detail: \(detail))")
        return 3
      }
    } catch let error as RPCError {
      complain("error: \(statusName(error.code)): \(error.message)")
      return 1
    } catch {
      let message = fullMessage(for: error)
      let code = exitCode(for: error).rawValue
      if code == 0 { say(message) } else { complain(message) }
      return code
    }
  }
}

/// Moves `--server X` and `--timeout N` written before the subcommand to after it (and after
/// its nested subcommand and positionals), so both `fpgactl --server X status` and
/// `fpgactl status --server X` work.
func hoistGlobalOptions(_ arguments: [String]) -> [String] {
  var global: [String] = []
  var rest: [String] = []
  var index = 0
  var seenSubcommand = false
  while index < arguments.count {
    let argument = arguments[index]
    if !seenSubcommand, argument == "--server" || argument == "--timeout", index + 1 < arguments.count {
      global += [argument, arguments[index + 1]]
      index += 2
      continue
    }
    if !seenSubcommand, argument.hasPrefix("--server=") || argument.hasPrefix("--timeout=") {
      global.append(argument)
    } else {
      if !argument.hasPrefix("-") { seenSubcommand = true }
      rest.append(argument)
    }
    index += 1
  }
  // After the leading words (the subcommand path, then positionals): a nested subcommand such
  // as `health clear` or `context switch` takes the options, not its group.
  let words = rest.prefix { !$0.hasPrefix("-") }.count
  guard !global.isEmpty, words > 0 else { return rest + global }
  return Array(rest.prefix(words)) + global + rest.dropFirst(words)
}

func statusName(_ code: RPCError.Code) -> String {
  switch code {
  case .invalidArgument: "INVALID_ARGUMENT"
  case .notFound: "NOT_FOUND"
  case .failedPrecondition: "FAILED_PRECONDITION"
  case .resourceExhausted: "RESOURCE_EXHAUSTED"
  case .aborted: "ABORTED"
  case .unavailable: "UNAVAILABLE"
  case .unimplemented: "UNIMPLEMENTED"
  case .deadlineExceeded: "DEADLINE_EXCEEDED"
  case .alreadyExists: "ALREADY_EXISTS"
  case .permissionDenied: "PERMISSION_DENIED"
  case .internalError: "INTERNAL"
  case .cancelled: "CANCELLED"
  default: "\(code)"
  }
}

func requestMeta(key: String?, epoch: UInt64?) -> Fpga_Agent_V1_RequestMeta {
  .with {
    $0.idempotencyKey = key ?? ""
    $0.orchestratorEpoch = epoch ?? 0
  }
}

struct Status: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Show the node's health, capabilities and counters.")

  @OptionGroup var options: ServerOptions
  @Flag(help: "Print JSON.") var json = false

  func run() async throws {
    let status = try await options.withAgent { try await $0.getNodeStatus(.init(), options: options.callOptions) }
    if json { return say(try status.jsonString()) }
    Render.status(status).forEach(say)
  }
}

struct WhoAmI: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "whoami", abstract: "Show the identity and role the agent sees for this caller.")

  @OptionGroup var options: ServerOptions

  func run() async throws {
    let metadata = try await options.withAgent { client in
      try await client.getNodeStatus(.init(), options: options.callOptions) { response in
        _ = try response.message  // a refusal (no role) is an error, not an empty answer
        return response.metadata
      }
    }
    let identity = metadata[stringValues: "fpga-identity"].first { _ in true } ?? "?"
    let role = metadata[stringValues: "fpga-role"].first { _ in true } ?? "?"
    say("\(identity) \(role)")
  }
}

struct Audit: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Show the last entries of the agent's audit trail (admin).",
    discussion:
      "One line per mutating request, allowed or denied, from the API, the orchestrator link and the device plugin.")

  @OptionGroup var options: ServerOptions
  @Option(name: [.customShort("n"), .long], help: "How many entries (newest kept).") var limit: UInt32 = 20
  @Flag(help: "Print the entries as JSON lines, requests included.") var json = false

  func run() async throws {
    let response = try await options.withAgent { client in
      try await client.getAuditTrail(.with { $0.limit = limit }, options: options.callOptions)
    }
    if json { return try response.entries.forEach { say(try $0.jsonString()) } }
    if response.entries.isEmpty { return say("no entries in \(response.path)") }
    table(
      ["TIME", "IDENTITY", "TRANSPORT", "RPC", "STATUS", "REVISION", "KEY"],
      response.entries.map { entry in
        [
          entry.time, entry.identity, entry.transport, entry.rpc, entry.status, "\(entry.revision)",
          entry.commandID.isEmpty ? (entry.idempotencyKey.isEmpty ? "-" : entry.idempotencyKey) : entry.commandID,
        ]
      }
    ).forEach(say)
  }
}

struct Inventory: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "List cards, PFs and allocations.")

  @OptionGroup var options: ServerOptions
  @Option(help: "Only this card (card-DDDD:BB).") var card: String?
  @Flag(help: "Also list every enabled VF.") var vfs = false
  @Flag(help: "Print JSON.") var json = false

  func run() async throws {
    let inventory = try await options.withAgent { client in
      try await client.getInventory(.with { $0.cardID = card ?? "" }, options: options.callOptions)
    }
    if json { return say(try inventory.jsonString()) }
    Render.inventory(inventory, withVFs: vfs).forEach(say)
  }
}

struct Rescan: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Make the agent scan its platform now.")

  @OptionGroup var options: ServerOptions

  func run() async throws {
    let response = try await options.withAgent { try await $0.rescan(.init(), options: options.callOptions) }
    say(
      response.changed
        ? "rescanned: changes found (revision \(response.revision))"
        : "rescanned: no changes (revision \(response.revision))")
  }
}

struct Allocate: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Allocate a free VF.")

  @OptionGroup var options: ServerOptions
  @Option(help: "Only from this card.") var card: String?
  @Option(help: "Only from this PF (DDDD:BB:DD.F).") var pf: String?
  @Option(help: "Only from this NUMA node.") var numa: Int32?
  @Option(help: "Who the VF is for.") var owner: String = "fpgactl"
  @Option(help: "The VM the VF is meant for.") var vm: String?
  @Option(help: "Idempotency key: a retry with the same key returns the same allocation.") var key: String?
  @Option(help: "Orchestrator epoch (fencing).") var epoch: UInt64?
  @Flag(help: "Print JSON.") var json = false

  func run() async throws {
    let response = try await options.withAgent { client in
      try await client.allocateVF(
        .with {
          $0.meta = requestMeta(key: key, epoch: epoch)
          $0.owner = owner
          $0.vm = vm ?? ""
          $0.constraints = .with {
            $0.cardID = card ?? ""
            $0.pfBdf = pf ?? ""
            if let numa { $0.numaNode = numa }
          }
        }, options: options.callOptions)
    }
    if json { return say(try response.jsonString()) }
    let allocation = response.allocation
    say(
      "\(response.replayed ? "already allocated" : "allocated") \(allocation.id): VF \(allocation.vfBdf) "
        + "(PF \(allocation.pfBdf), NUMA \(allocation.numaNode), IOMMU group \(allocation.iommuGroup)) "
        + "for \(allocation.owner)")
  }
}

struct Release: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Release an allocation.")

  @OptionGroup var options: ServerOptions
  @Argument(help: "The allocation id (alloc-…).") var id: String
  @Option(help: "Idempotency key.") var key: String?
  @Option(help: "Orchestrator epoch (fencing).") var epoch: UInt64?

  func run() async throws {
    let response = try await options.withAgent { client in
      try await client.releaseVF(
        .with {
          $0.meta = requestMeta(key: key, epoch: epoch)
          $0.allocationID = id
        }, options: options.callOptions)
    }
    say(
      "\(response.replayed ? "already released" : "released") \(response.allocation.id): VF \(response.allocation.vfBdf) is free"
    )
  }
}

struct Watch: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Stream inventory changes.")

  @OptionGroup var options: ServerOptions
  @Option(help: "Resume after this revision (0: start with a snapshot).") var from: UInt64 = 0
  @Option(help: "Stop after this many events.") var count: Int?
  @Flag(help: "Print each event as JSON.") var json = false

  func run() async throws {
    var callOptions = options.callOptions
    callOptions.timeout = nil
    let (json, count, from) = (self.json, self.count, self.from)
    try await options.withAgent { client in
      try await client.watchInventory(.with { $0.fromRevision = from }, options: callOptions) { response in
        var seen = 0
        for try await event in response.messages {
          if json {
            say(try event.jsonString())
          } else {
            Render.event(event).forEach(say)
          }
          seen += 1
          if let count, seen >= count { return }
        }
      }
    }
  }
}

struct VMs: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "vms", abstract: "List the VMs the agent can plug VFs into.")

  @OptionGroup var options: ServerOptions

  func run() async throws {
    let inventory = try await options.withAgent { try await $0.getInventory(.init(), options: options.callOptions) }
    Render.vms(inventory).forEach(say)
  }
}

struct Attach: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Hot-plug an allocated VF into a running VM.")

  @OptionGroup var options: ServerOptions
  @Argument(help: "The allocation id (alloc-…).") var id: String
  @Argument(help: "The VM (see `fpgactl vms`).") var vm: String
  @Option(help: "Idempotency key.") var key: String?

  func run() async throws {
    let response = try await options.withAgent { client in
      try await client.attachVF(
        .with {
          $0.meta = requestMeta(key: key, epoch: nil)
          $0.allocationID = id
          $0.vm = vm
        }, options: options.callOptions)
    }
    say(
      "\(response.replayed ? "already attached" : "attached") \(response.allocation.id): VF \(response.allocation.vfBdf) "
        + "is device \(response.deviceID) in VM \(vm), root port \(response.rootPort)")
  }
}

struct Detach: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Hot-unplug an attached VF from its VM.")

  @OptionGroup var options: ServerOptions
  @Argument(help: "The allocation id (alloc-…).") var id: String
  @Option(name: .customLong("wait"), help: "Seconds to wait for the guest to acknowledge (default: the agent's).")
  var wait: Int?
  @Option(help: "Idempotency key.") var key: String?

  func run() async throws {
    var callOptions = options.callOptions
    callOptions.timeout = .seconds(max(options.timeout, (wait ?? 10) + 10))
    let response = try await options.withAgent { client in
      try await client.detachVF(
        .with {
          $0.meta = requestMeta(key: key, epoch: nil)
          $0.allocationID = id
          if let wait { $0.timeout = .with { $0.seconds = Int64(wait) } }
        }, options: callOptions)
    }
    say(
      "\(response.replayed ? "already detached" : "detached") \(response.allocation.id): VF \(response.allocation.vfBdf) left its VM"
    )
  }
}

struct Drain: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Stop new allocations on a PF or card.")

  @OptionGroup var options: ServerOptions
  @Argument(help: "A PF (DDDD:BB:DD.F) or a card (card-DDDD:BB).") var device: String
  @Flag(name: .customLong("release-unattached"), help: "Also release allocations not attached to a VM.")
  var releaseUnattached = false
  @Option(help: "Idempotency key.") var key: String?

  func run() async throws {
    let operation = try await options.withAgent { client in
      try await client.drainDevice(
        .with {
          $0.meta = requestMeta(key: key, epoch: nil)
          $0.device = device
          $0.releaseUnattached = releaseUnattached
        }, options: options.callOptions)
    }
    Render.operation(operation).forEach(say)
  }
}

struct Undrain: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Accept allocations on a PF or card again.")

  @OptionGroup var options: ServerOptions
  @Argument(help: "A PF (DDDD:BB:DD.F) or a card (card-DDDD:BB).") var device: String

  func run() async throws {
    let response = try await options.withAgent { client in
      try await client.undrainDevice(.with { $0.device = device }, options: options.callOptions)
    }
    say("\(device) accepts allocations (revision \(response.revision))")
  }
}

struct Reconfigure: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Change a PF's VF count while VMs hold its VFs; shows a line per step.",
    discussion: """
      Strategies: auto (pause where the VM's QEMU can, otherwise detach and re-attach), pause \
      (refused unless every affected VM can pause), detach-reattach (announced unplug and replug), \
      refuse-if-disruptive (refused when any guest would see an unplug). --dry-run prints the \
      plan: the steps, what each guest sees, which allocations are kept or lost.
      """)

  @OptionGroup var options: ServerOptions
  @Argument(help: "The PF (DDDD:BB:DD.F).") var pf: String
  @Argument(help: "The VF count wanted (0 to the PF's total).") var count: UInt32
  @Option(help: "auto, pause, detach-reattach or refuse-if-disruptive.") var strategy = "auto"
  @Flag(name: .customLong("dry-run"), help: "Only show the plan.") var dryRun = false
  @Flag(name: .customLong("no-wait"), help: "Print the operation id and return at once.") var noWait = false
  @Option(help: "Idempotency key.") var key: String?

  func run() async throws {
    let strategies: [String: Fpga_Agent_V1_ReconfigureStrategy] = [
      "auto": .unspecified, "pause": .pause, "detach-reattach": .detachReattach,
      "refuse-if-disruptive": .refuseIfDisruptive,
    ]
    guard let wanted = strategies[strategy] else {
      throw CtlError.usage("--strategy \(strategy): expected auto, pause, detach-reattach or refuse-if-disruptive")
    }
    var watchOptions = options.callOptions
    watchOptions.timeout = nil
    let final = try await options.withAgent { client -> Fpga_Agent_V1_Operation in
      let started = try await client.reconfigure(
        .with {
          $0.meta = requestMeta(key: key, epoch: nil)
          $0.pfBdf = pf
          $0.vfCount = count
          $0.strategy = wanted
          $0.dryRun = dryRun
        }, options: options.callOptions)
      if dryRun || noWait || started.state == .succeeded || started.state == .failed {
        Render.operation(started).forEach(say)
        return started
      }
      say("operation \(started.id): reconfiguring \(started.target) to \(count) VFs (strategy \(strategy))")
      let last = try await client.watchOperation(.with { $0.id = started.id }, options: watchOptions) { response in
        var progress = Render.Progress()
        var last = started
        for try await operation in response.messages {
          progress.lines(for: operation).forEach(say)
          last = operation
        }
        return last
      }
      Render.outcome(last).forEach(say)
      return last
    }
    if final.state == .failed { throw CtlError.operationFailed(final.id) }
  }
}

struct OperationCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "operation", abstract: "Show a long-running operation.")

  @OptionGroup var options: ServerOptions
  @Argument(help: "The operation id (op-…).") var id: String
  @Flag(help: "Follow its progress until it ends.") var watch = false

  func run() async throws {
    var callOptions = options.callOptions
    if watch { callOptions.timeout = nil }
    try await options.withAgent { client in
      if watch {
        let last = try await client.watchOperation(.with { $0.id = id }, options: callOptions) { response in
          var progress = Render.Progress()
          var last: Fpga_Agent_V1_Operation?
          for try await operation in response.messages {
            if last == nil { say("operation \(operation.id) (\(operation.kind) \(operation.target))") }
            progress.lines(for: operation).forEach(say)
            last = operation
          }
          return last
        }
        if let last { Render.outcome(last).forEach(say) }
      } else {
        Render.operation(try await client.getOperation(.with { $0.id = id }, options: callOptions)).forEach(say)
      }
    }
  }
}
