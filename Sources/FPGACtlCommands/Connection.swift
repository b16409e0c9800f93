#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif
public import ArgumentParser
import FPGAAgentAPI
import GRPCCore
import GRPCNIOTransportHTTP2

/// How fpgactl reaches the agent.
public struct ServerOptions: ParsableArguments {
  @Option(
    name: .long,
    help: "The agent: HOST:PORT or unix:PATH (env FPGACTL_SERVER; default: the agent's default Unix socket).")
  var server: String?

  @Option(name: .customLong("tls-cert"), help: "Client certificate (PEM) for a TLS listener (env FPGACTL_TLS_CERT).")
  var tlsCert: String?

  @Option(name: .customLong("tls-key"), help: "Its private key (PEM) (env FPGACTL_TLS_KEY).")
  var tlsKey: String?

  @Option(
    name: .customLong("tls-ca"), help: "CA bundle (PEM) the agent's certificate must chain to (env FPGACTL_TLS_CA).")
  var tlsCA: String?

  @Option(name: .long, help: "Seconds to wait for each call.")
  var timeout: Int = 10

  public init() {}

  var address: String {
    server ?? environmentValue("FPGACTL_SERVER") ?? "unix:" + Self.defaultSocket
  }

  /// Where the agent puts its socket by default (as root, or as this user).
  static var defaultSocket: String {
    if geteuid() == 0 { return "/run/fpga-agent/agent.sock" }
    if let runtime = environmentValue("XDG_RUNTIME_DIR"), !runtime.isEmpty { return runtime + "/fpga-agent.sock" }
    return "/tmp/fpga-agent-\(geteuid()).sock"
  }

  var usesTLS: Bool {
    [
      tlsCert, tlsKey, tlsCA, environmentValue("FPGACTL_TLS_CERT"), environmentValue("FPGACTL_TLS_KEY"),
      environmentValue("FPGACTL_TLS_CA"),
    ].contains { $0 != nil }
  }

  /// mTLS when a certificate, key or CA is given (all three are needed).
  func security() throws -> HTTP2ClientTransport.Posix.TransportSecurity {
    let cert = tlsCert ?? environmentValue("FPGACTL_TLS_CERT")
    let key = tlsKey ?? environmentValue("FPGACTL_TLS_KEY")
    let ca = tlsCA ?? environmentValue("FPGACTL_TLS_CA")
    guard cert != nil || key != nil || ca != nil else { return .plaintext }
    for (flag, value) in [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)] {
      guard let value, !value.isEmpty else {
        throw CtlError.usage("\(flag) is missing: TLS needs --tls-cert, --tls-key and --tls-ca")
      }
      guard access(value, R_OK) == 0 else { throw CtlError.usage("\(flag) \(value) is not a readable file") }
    }
    return .mTLS(certificateChain: [.file(path: cert!, format: .pem)], privateKey: .file(path: key!, format: .pem)) {
      $0.trustRoots = .certificates([.file(path: ca!, format: .pem)])
    }
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
    let transport = try HTTP2ClientTransport.Posix(target: try target(), transportSecurity: try security())
    do {
      return try await withGRPCClient(transport: transport) { client in
        try await body(Fpga_Agent_V1_NodeAgent.Client(wrapping: client))
      }
    } catch let error as RPCError where error.code == .unavailable || error.code == .deadlineExceeded {
      // The agent marks its own errors; anything else never reached it.
      if !Array(error.metadata[stringValues: "fpga-error-source"]).isEmpty { throw error }
      var detail = error.message
      if usesTLS {
        detail +=
          "; the TLS handshake may have failed: check that --tls-ca holds the CA of the agent's certificate "
          + "(which must name this address), and that --tls-cert was issued by the agent's client CA and has not expired"
      }
      throw CtlError.unreachable(address: address, detail: detail)
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
