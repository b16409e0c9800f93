import AsyncHTTPClient
import FPGACore
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL

/// Where the Kubernetes API is and how to prove who the agent is: a bearer token (a file is re-read
/// at every request: projected service-account tokens rotate) and/or a client certificate, and the
/// CA the server's certificate chains to. From explicit settings, the pod's service account
/// (`inCluster`) or a kubeconfig (`Kubeconfig.settings`).
public struct KubernetesAPISettings: Hashable, Sendable {
  /// PEM text: a file, or the PEM itself (a kubeconfig's `…-data`); `origin` names it in errors.
  public enum PEM: Hashable, Sendable {
    case file(String)
    case inline([UInt8], origin: String)

    public var origin: String {
      switch self {
      case .file(let path): path
      case .inline(_, let origin): origin
      }
    }
  }

  public enum Token: Hashable, Sendable {
    /// Read again for each request.
    case file(String)
    case inline(String)
  }

  /// The service account's token and CA in a pod.
  public static let serviceAccountDirectory = "/var/run/secrets/kubernetes.io/serviceaccount"

  /// `https://HOST:PORT`.
  public var server: String
  /// The CA bundle; nil: the system's trust roots.
  public var certificateAuthority: PEM?
  /// The bearer token; nil: none is sent.
  public var token: Token?
  /// Mutual TLS: the agent's certificate chain and its key (both or neither).
  public var clientCertificate: PEM?
  public var clientKey: PEM?
  /// Where these settings came from, for the log (e.g. `kubeconfig /x, context "kind"`).
  public var origin: String

  public init(
    server: String, certificateAuthority: PEM?, token: Token?, clientCertificate: PEM? = nil, clientKey: PEM? = nil,
    origin: String = "settings"
  ) {
    self.server = server
    self.certificateAuthority = certificateAuthority
    self.token = token
    self.clientCertificate = clientCertificate
    self.clientKey = clientKey
    self.origin = origin
  }

  /// A token file and a CA file, as `--kube-token-file` and `--kube-ca-file` give them.
  public init(server: String, tokenFile: String, caFile: String, origin: String = "settings") {
    self.init(server: server, certificateAuthority: .file(caFile), token: .file(tokenFile), origin: origin)
  }

  /// In a pod: `KUBERNETES_SERVICE_HOST`/`_PORT` and the service account's token and CA.
  public static func inCluster(environment: [String: String]) -> KubernetesAPISettings? {
    guard let host = environment["KUBERNETES_SERVICE_HOST"], let port = environment["KUBERNETES_SERVICE_PORT"] else {
      return nil
    }
    let authority = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    let account = serviceAccountDirectory
    return KubernetesAPISettings(
      server: "https://\(authority)", tokenFile: account + "/token", caFile: account + "/ca.crt", origin: "in-cluster")
  }

  /// The settings from every source, in order of precedence: explicit settings (each overriding
  /// the same field of what follows), a kubeconfig (its chosen or current context), the pod's
  /// environment; nil when none gives a server. Without a kubeconfig, a token or CA file not
  /// given is the service account's.
  public static func resolve(
    explicit: Kubeconfig.Overrides, kubeconfig: Kubeconfig?, context: String?, environment: [String: String]
  ) throws(KubeconfigError) -> KubernetesAPISettings? {
    if let kubeconfig {
      return try kubeconfig.settings(context: context, overrides: explicit)
    }
    let server =
      explicit.server.isEmpty ? inCluster(environment: environment)?.server : explicit.server
    return server.map {
      KubernetesAPISettings(
        server: $0,
        tokenFile: explicit.tokenFile.isEmpty ? serviceAccountDirectory + "/token" : explicit.tokenFile,
        caFile: explicit.caFile.isEmpty ? serviceAccountDirectory + "/ca.crt" : explicit.caFile,
        origin: explicit.server.isEmpty ? "in-cluster" : "settings")
    }
  }

  /// What the log says: the server, how the agent proves itself, and where this came from.
  public var summary: String {
    let credentials = [token.map { _ in "bearer token" }, clientCertificate.map { _ in "client certificate" }]
      .compactMap { $0 }
    return
      "\(server) (\(origin); \(credentials.isEmpty ? "no credentials" : credentials.joined(separator: " and ")))"
  }
}

/// A failed API call, with the HTTP status and the API server's own message.
public struct KubernetesAPIError: Error, Hashable, Sendable, CustomStringConvertible {
  public var status: Int
  public var message: String

  public init(status: Int, message: String) {
    self.status = status
    self.message = message
  }

  public var description: String { status == 0 ? message : "the Kubernetes API answered \(status): \(message)" }
}

/// A small client of the API server: JSON over HTTPS (async-http-client), the verbs the driver
/// needs and nothing else.
public final class KubernetesAPI: Sendable {
  public let settings: KubernetesAPISettings
  private let client: HTTPClient

  public init(settings: KubernetesAPISettings) throws {
    self.settings = settings
    var tls = TLSConfiguration.makeClientConfiguration()
    do {
      switch settings.certificateAuthority {
      case .file(let path): tls.trustRoots = .file(path)
      case .inline(let bytes, _): tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(bytes))
      case nil: tls.trustRoots = .default
      }
    } catch {
      throw KubernetesAPIError(
        status: 0, message: "the CA of \(settings.certificateAuthority?.origin ?? "") is not PEM certificates: \(error)"
      )
    }
    if let certificate = settings.clientCertificate, let key = settings.clientKey {
      do {
        let chain =
          switch certificate {
          case .file(let path): try NIOSSLCertificate.fromPEMFile(path)
          case .inline(let bytes, _): try NIOSSLCertificate.fromPEMBytes(bytes)
          }
        tls.certificateChain = chain.map { .certificate($0) }
      } catch {
        throw KubernetesAPIError(status: 0, message: "the client certificate \(certificate.origin): \(error)")
      }
      do {
        tls.privateKey =
          switch key {
          case .file(let path): .privateKey(try NIOSSLPrivateKey(file: path, format: .pem))
          case .inline(let bytes, _): .privateKey(try NIOSSLPrivateKey(bytes: bytes, format: .pem))
          }
      } catch {
        throw KubernetesAPIError(status: 0, message: "the client key \(key.origin): \(error)")
      }
    }
    var configuration = HTTPClient.Configuration(tlsConfiguration: tls)
    configuration.timeout = .init(connect: .seconds(5), read: .seconds(30))
    client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
  }

  public func shutdown() async {
    try? await client.shutdown()
  }

  // MARK: Verbs

  public func resourceClaim(namespace: String, name: String) async throws(KubernetesAPIError) -> Kube.ResourceClaim {
    try await call(
      .GET, "/apis/resource.k8s.io/v1/namespaces/\(Self.segment(namespace))/resourceclaims/\(Self.segment(name))")
  }

  /// Server-side apply of this driver's entries in a claim's `status.devices` (the driver is the
  /// field manager). Needs `patch` on `resourceclaims/status` and, from Kubernetes 1.36,
  /// `associated-node:patch` on `resourceclaims/driver` for the driver's name.
  public func applyDeviceStatus(
    _ devices: [Kube.AllocatedDeviceStatus], namespace: String, name: String, uid: String, driver: String,
    timeoutSeconds: Int64 = 5
  ) async throws(KubernetesAPIError) {
    let _: Kube.MetadataOnly = try await call(
      .PATCH,
      "/apis/resource.k8s.io/v1/namespaces/\(Self.segment(namespace))/resourceclaims/\(Self.segment(name))/status"
        + "?fieldManager=\(Self.segment(driver))&force=true",
      body: Kube.ClaimDeviceStatusApply(namespace: namespace, name: name, uid: uid, devices: devices),
      contentType: "application/apply-patch+yaml", timeout: .seconds(timeoutSeconds))
  }

  public func node(_ name: String) async throws(KubernetesAPIError) -> Kube.MetadataOnly {
    try await call(.GET, "/api/v1/nodes/\(Self.segment(name))")
  }

  public func resourceSlices(node: String, driver: String) async throws(KubernetesAPIError) -> [Kube.ResourceSlice] {
    let selector =
      "spec.nodeName=\(node),spec.driver=\(driver)"
      .addingPercentEncoding(withAllowedCharacters: .urlQueryAllowed.subtracting(CharacterSet(charactersIn: "=,&+")))
      ?? ""
    let list: Kube.List<Kube.ResourceSlice> = try await call(
      .GET, "/apis/resource.k8s.io/v1/resourceslices?fieldSelector=\(selector)")
    // A server that ignores the selector must not make the driver touch others' slices.
    return list.items.filter { $0.spec.nodeName == node && $0.spec.driver == driver }
  }

  public func create(_ slice: Kube.ResourceSlice) async throws(KubernetesAPIError) -> Kube.ResourceSlice {
    try await call(.POST, "/apis/resource.k8s.io/v1/resourceslices", body: slice)
  }

  public func update(_ slice: Kube.ResourceSlice) async throws(KubernetesAPIError) -> Kube.ResourceSlice {
    try await call(
      .PUT, "/apis/resource.k8s.io/v1/resourceslices/\(Self.segment(slice.metadata.name ?? ""))", body: slice)
  }

  public func deleteResourceSlice(_ name: String) async throws(KubernetesAPIError) {
    let _: Kube.Status = try await call(.DELETE, "/apis/resource.k8s.io/v1/resourceslices/\(Self.segment(name))")
  }

  // MARK: Transport

  /// The token, a file's read again (bounded: a token is a few KiB).
  private func bearerToken() throws -> String? {
    switch settings.token {
    case .inline(let token): return token
    case .file(let path):
      do {
        return try readBounded(path, limit: 64 << 10).trimmingCharacters(in: .whitespacesAndNewlines)
      } catch {
        throw KubernetesAPIError(status: 0, message: "the token file \(path): \(error.message)")
      }
    case nil: return nil
    }
  }

  static func segment(_ text: String) -> String {
    text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? text
  }

  private func call<Output: Decodable>(
    _ method: HTTPMethod, _ path: String, body: (some Encodable)? = Optional<Kube.Status>.none,
    contentType: String = "application/json", timeout: TimeAmount = .seconds(30)
  ) async throws(KubernetesAPIError) -> Output {
    do {
      var request = HTTPClientRequest(url: settings.server + path)
      request.method = method
      if let token = try bearerToken() {
        request.headers.add(name: "Authorization", value: "Bearer \(token)")
      }
      request.headers.add(name: "Accept", value: "application/json")
      request.headers.add(name: "User-Agent", value: "fpga-agent")
      if let body {
        let encoder = JSONEncoder()
        // Slashes unescaped: an apply patch is read as YAML, and YAML 1.1 parsers (the API
        // server's) refuse JSON's `\/`.
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // JSON is YAML too: an apply patch is sent as JSON with the apply content type.
        request.headers.add(name: "Content-Type", value: contentType)
        request.body = .bytes(ByteBuffer(bytes: Array(try encoder.encode(body))))
      }
      let response = try await client.execute(request, timeout: timeout)
      let bytes = try await response.body.collect(upTo: 32 << 20)
      let data = Data(bytes.readableBytesView)
      guard (200..<300).contains(response.status.code) else {
        let status = try? JSONDecoder().decode(Kube.Status.self, from: data)
        throw KubernetesAPIError(
          status: Int(response.status.code),
          message: "\(method) \(path): \(status?.message ?? String(decoding: data.prefix(300), as: UTF8.self))")
      }
      return try JSONDecoder().decode(Output.self, from: data)
    } catch let error as KubernetesAPIError {
      throw error
    } catch {
      throw KubernetesAPIError(status: 0, message: "\(method) \(settings.server)\(path): \(error)")
    }
  }
}
