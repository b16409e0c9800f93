import FPGAOrchestratorLink
import FPGAWebDashboard
import FPGAAgentDoors
import FPGAAgentConfig
import ArgumentParser
import FPGADRA
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf

/// `fpga-agent dra …`: talks to a running agent's DRA driver the way the kubelet does, over the
/// same sockets and protos. For operators checking a node without a kubelet at hand (and for the
/// real-kernel test, whose guest has no kubelet). The sockets follow from the configuration
/// (`kubernetes.dra.*`, `--dra-*`), exactly as the serving agent computes them.
struct DRACommand: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "dra",
    abstract: "Call this node's DRA driver as the kubelet would (registration, prepare, unprepare).",
    subcommands: [Info.self, Prepare.self, Unprepare.self])

  /// The sockets as the serving agent computes them (its node name does not matter here).
  static func settings(_ options: ConfigOptions) throws -> DRASettings {
    try options.resolvedOrExit().draSettings(nodeID: "")
  }

  static func withClient<Result: Sendable>(
    socket: String, _ body: (GRPCClient<HTTP2ClientTransport.Posix>) async throws -> Result
  ) async throws -> Result {
    let transport = try HTTP2ClientTransport.Posix(
      target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)
    do {
      return try await withGRPCClient(transport: transport) { try await body($0) }
    } catch let error as RPCError {
      let hint =
        error.code == .unavailable
        ? "; is the agent running with kubernetes.dra.enabled (--dra) and the same --dra-* settings as this command?"
        : ""
      let message = error.message.hasSuffix(".") ? String(error.message.dropLast()) : error.message
      printError("error: \(socket): \(error.code): \(message)\(hint)")
      throw ExitCode(1)
    }
  }

  static var callOptions: CallOptions {
    var options = CallOptions.defaults
    options.timeout = .seconds(150)  // The kubelet's own limit is longer; a prepare can wait for a rescan.
    return options
  }

  /// `NAMESPACE/NAME` and a UID.
  struct Claim: ParsableArguments {
    @Argument(help: "The ResourceClaim as NAMESPACE/NAME.")
    var claim: String

    @Argument(help: "Its metadata.uid.")
    var uid: String

    @Option(name: .long, help: "The plugin socket (default: <plugins_dir>/<driver>/dra.sock).")
    var socket: String?

    func validate() throws {
      let parts = claim.split(separator: "/", omittingEmptySubsequences: false)
      guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else {
        throw ValidationError("the claim \(claim) is not NAMESPACE/NAME")
      }
      guard !uid.isEmpty else { throw ValidationError("the claim's UID is empty") }
    }

    var namespace: String { String(claim.split(separator: "/")[0]) }
    var name: String { String(claim.split(separator: "/")[1]) }

    /// Calls the v1 plugin service on the claim's socket with this claim as the kubelet names it.
    func call<Result: Sendable>(
      _ options: ConfigOptions,
      _ body: (
        K8s_Io_Kubelet_Pkg_Apis_Dra_V1_DRAPlugin.Client<HTTP2ClientTransport.Posix>,
        [K8s_Io_Kubelet_Pkg_Apis_Dra_V1_Claim]
      )
        async throws -> Result
    ) async throws -> Result {
      let socket = try socket ?? DRACommand.settings(options).pluginSocket
      let claims = [
        K8s_Io_Kubelet_Pkg_Apis_Dra_V1_Claim.with {
          $0.namespace = namespace; $0.name = name; $0.uid = uid
        }
      ]
      return try await DRACommand.withClient(socket: socket) { client in
        try await body(K8s_Io_Kubelet_Pkg_Apis_Dra_V1_DRAPlugin.Client(wrapping: client), claims)
      }
    }
  }

  struct Info: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "Ask the registration socket what the kubelet's plugin watcher would learn.")
    @OptionGroup var options: ConfigOptions

    func run() async throws {
      let settings = try DRACommand.settings(options)
      let info = try await DRACommand.withClient(socket: settings.registrationSocket) { client in
        try await Pluginregistration_Registration.Client(wrapping: client).getInfo(
          .init(), options: DRACommand.callOptions)
      }
      print("type      \(info.type)")
      print("name      \(info.name)")
      print("endpoint  \(info.endpoint)")
      print("versions  \(info.supportedVersions.joined(separator: ", "))")
    }
  }

  struct Prepare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
      abstract: "NodePrepareResources (v1) for one claim; prints the devices and their CDI ids.")
    @OptionGroup var options: ConfigOptions
    @OptionGroup var claim: Claim

    func run() async throws {
      let response = try await claim.call(options) { plugin, claims in
        try await plugin.nodePrepareResources(.with { $0.claims = claims }, options: DRACommand.callOptions)
      }
      guard let result = response.claims[claim.uid] else {
        printError("error: the driver answered nothing for claim \(claim.uid)")
        throw ExitCode(1)
      }
      guard result.error.isEmpty else {
        printError("error: \(claim.claim) (\(claim.uid)): \(result.error)")
        throw ExitCode(1)
      }
      print("prepared \(claim.claim) (\(claim.uid))")
      for device in result.devices {
        let share = device.hasShareID ? " share \(device.shareID)" : ""
        print(
          "  \(device.requestNames.joined(separator: ",")): \(device.poolName)/\(device.deviceName)\(share) "
            + "cdi \(device.cdiDeviceIds.joined(separator: " "))")
      }
    }
  }

  struct Unprepare: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "NodeUnprepareResources (v1) for one claim.")
    @OptionGroup var options: ConfigOptions
    @OptionGroup var claim: Claim

    func run() async throws {
      let response = try await claim.call(options) { plugin, claims in
        try await plugin.nodeUnprepareResources(.with { $0.claims = claims }, options: DRACommand.callOptions)
      }
      let error = response.claims[claim.uid]?.error ?? "the driver answered nothing for claim \(claim.uid)"
      guard error.isEmpty else {
        printError("error: \(claim.claim) (\(claim.uid)): \(error)")
        throw ExitCode(1)
      }
      print("unprepared \(claim.claim) (\(claim.uid))")
    }
  }
}
