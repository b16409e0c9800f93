import ArgumentParser
import FPGAAgentAPI
import GRPCCore
import GRPCNIOTransportHTTP2

/// How fpgactl reaches the agent.
public struct ServerOptions: ParsableArguments {
  @Option(
    name: .long,
    help: "The agent: HOST:PORT or unix:PATH (env FPGACTL_SERVER; default 127.0.0.1:50051).")
  var server: String?

  @Option(name: .long, help: "Seconds to wait for each call.")
  var timeout: Int = 10

  public init() {}

  var address: String {
    server ?? environmentValue("FPGACTL_SERVER") ?? "127.0.0.1:50051"
  }

  func target() throws -> any ResolvableTarget {
    let address = self.address
    if address.hasPrefix("unix:") {
      let path = String(address.dropFirst(5))
      guard !path.isEmpty else { throw CtlError.usage("--server unix:PATH needs a path") }
      return .unixDomainSocket(path: path)
    }
    var host = address
    var port = 50051
    if let colon = address.lastIndex(of: ":"), !address.hasSuffix("]") {
      host = String(address[..<colon])
      guard let parsed = Int(address[address.index(after: colon)...]), (1...65535).contains(parsed) else {
        throw CtlError.usage("--server \(address): expected HOST:PORT or unix:PATH")
      }
      port = parsed
    }
    if host.hasPrefix("[") && host.hasSuffix("]") {
      return .ipv6(address: String(host.dropFirst().dropLast()), port: port)
    }
    if host.split(separator: ".").count == 4, host.allSatisfy({ $0.isNumber || $0 == "." }) {
      return .ipv4(address: host, port: port)
    }
    guard !host.isEmpty else { throw CtlError.usage("--server \(address): the host is empty") }
    return .dns(host: host, port: port)
  }

  var callOptions: CallOptions {
    var options = CallOptions.defaults
    options.timeout = .seconds(timeout)
    options.waitForReady = false
    return options
  }

  /// Runs `body` with a node API client; turns transport failures into a clear message.
  func withAgent<Result: Sendable>(
    _ body: (Fpga_Agent_V1_NodeAgent.Client<HTTP2ClientTransport.Posix>) async throws -> Result
  ) async throws -> Result {
    let transport = try HTTP2ClientTransport.Posix(target: try target(), transportSecurity: .plaintext)
    do {
      return try await withGRPCClient(transport: transport) { client in
        try await body(Fpga_Agent_V1_NodeAgent.Client(wrapping: client))
      }
    } catch let error as RPCError where error.code == .unavailable || error.code == .deadlineExceeded {
      // The agent marks its own errors; anything else never reached it.
      if !Array(error.metadata[stringValues: "fpga-error-source"]).isEmpty { throw error }
      throw CtlError.unreachable(address: address, detail: error.message)
    }
  }
}

/// fpgactl's own failures.
enum CtlError: Error {
  case usage(String)
  case unreachable(address: String, detail: String)
  /// A long-running operation ended in failure (already shown).
  case operationFailed(String)
}
