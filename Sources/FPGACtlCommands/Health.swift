import ArgumentParser
import FPGAAgentAPI
import GRPCCore
import FPGACore
import SwiftProtobuf

/// `fpgactl health`: the devices that are not healthy and why; `fpgactl health clear` accepts a
/// device's errors (admin).
struct HealthCommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "health",
    abstract: "Devices that are not healthy, with their reasons; `health clear` accepts a device's errors.",
    discussion: """
      A judgement is kept across agent restarts: a device stays unhealthy until it is \
      re-enumerated (its AER counters reset: a reboot, a remove and rescan, a VF re-created) or \
      an operator clears it. A device first seen with uncorrectable errors already logged is \
      degraded (aer-history) with their figures.
      """,
    subcommands: [List.self, Clear.self], defaultSubcommand: List.self)

  struct List: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "list", abstract: "Every PF and VF that is not healthy, with its reasons.")

    @OptionGroup var options: ServerOptions
    @Flag(help: "Print every device's health, healthy ones too.") var all = false

    func run() async throws {
      let inventory = try await options.withAgent { client in
        try await client.getInventory(.init(), options: options.callOptions)
      }
      var rows: [[String]] = []
      for card in inventory.cards {
        for pf in card.pfs {
          rows += Self.rows(pf.bdf, pf.health, all: all)
          for vf in pf.vfs { rows += Self.rows(vf.bdf, vf.health, all: all) }
        }
      }
      guard !rows.isEmpty else { return say("every device is healthy") }
      table(["DEVICE", "STATE", "SINCE", "REASON"], rows).forEach(say)
    }

    static func rows(_ device: String, _ health: Fpga_Agent_V1_DeviceHealth, all: Bool) -> [[String]] {
      let state = health.state.word
      guard all || health.state != .healthy else { return [] }
      let since = health.hasSince ? "\(WallTime(seconds: health.since.seconds))" : "-"
      guard !health.reasons.isEmpty else { return [[device, state, since, "-"]] }
      return health.reasons.enumerated().map { index, reason in
        [
          index == 0 ? device : "", index == 0 ? state : "", index == 0 ? since : "",
          "\(reason.kind): \(reason.detail)",
        ]
      }
    }
  }

  struct Clear: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      commandName: "clear",
      abstract: "Accept a device's errors (admin): the counters it shows now become its baseline.",
      discussion: "Audited with the reason. A reason that still holds (a degraded link) comes back at once.")

    @OptionGroup var options: ServerOptions
    @Argument(help: "The PF or VF (DDDD:BB:DD.F).") var device: String
    @Option(help: "Why the errors are accepted (1-256 characters), kept in the audit trail.") var reason: String
    @Option(help: "Idempotency key.") var key: String?

    func run() async throws {
      let response = try await options.withAgent { client in
        try await client.clearDeviceHealth(
          .with {
            $0.meta = requestMeta(key: key, epoch: nil)
            $0.device = device
            $0.reason = reason
          }, options: options.callOptions)
      }
      let health = response.health
      let state = health.state.word
      let reasons = health.reasons.map { "\($0.kind): \($0.detail)" }.joined(separator: "; ")
      say(
        "\(response.replayed ? "already cleared" : "cleared") \(device): \(state)\(reasons.isEmpty ? "" : " (\(reasons))") (revision \(response.revision))"
      )
    }
  }
}
