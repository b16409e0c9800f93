import AsyncHTTPClient
import FPGACore
import Foundation
import NIOCore
import NIOHTTP1
import NIOSSL

/// Where the Kubernetes API is and how to prove who the agent is: a bearer token (re-read at
/// every request: projected service-account tokens rotate) and the CA its certificate chains to.
public struct KubernetesAPISettings: Hashable, Sendable {
  /// `https://HOST:PORT`.
  public var server: String
  public var tokenFile: String
  public var caFile: String

  public init(server: String, tokenFile: String, caFile: String) {
    self.server = server
    self.tokenFile = tokenFile
    self.caFile = caFile
  }

  /// In a pod: `KUBERNETES_SERVICE_HOST`/`_PORT` and the service account's token and CA.
  public static func inCluster(environment: [String: String]) -> KubernetesAPISettings? {
    guard let host = environment["KUBERNETES_SERVICE_HOST"], let port = environment["KUBERNETES_SERVICE_PORT"] else {
      return nil
    }
    let authority = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    let account = "/var/run/secrets/kubernetes.io/serviceaccount"
    return KubernetesAPISettings(
      server: "https://\(authority)", tokenFile: account + "/token", caFile: account + "/ca.crt")
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
    tls.trustRoots = .file(settings.caFile)
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

  static func segment(_ text: String) -> String {
    text.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? text
  }

  private func call<Output: Decodable>(
    _ method: HTTPMethod, _ path: String, body: (some Encodable)? = Optional<Kube.Status>.none,
    contentType: String = "application/json", timeout: TimeAmount = .seconds(30)
  ) async throws(KubernetesAPIError) -> Output {
    do {
      let token = (try String(contentsOfFile: settings.tokenFile, encoding: .utf8)).trimmingCharacters(
        in: .whitespacesAndNewlines)
      var request = HTTPClientRequest(url: settings.server + path)
      request.method = method
      request.headers.add(name: "Authorization", value: "Bearer \(token)")
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
