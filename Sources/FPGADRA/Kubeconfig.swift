import FPGACore
import Foundation
import Yams

/// A kubeconfig file (what `kubectl` and every kubelet plugin are pointed at a cluster with),
/// read as far as the agent uses it: the contexts, and for the chosen one its cluster's server and
/// CA and its user's token or client certificate. Pure: `parse` takes the text, `load` only adds a
/// bounded read.
///
/// Supported: `current-context` (or a context chosen by name); the cluster's `server` (https only),
/// `certificate-authority` (a file; relative paths resolved against the kubeconfig's directory, as
/// kubectl does) or `certificate-authority-data` (base64 PEM), none of them meaning the system's
/// trust roots; the user's `token`, `tokenFile` (preferred when both are given and re-read at every
/// request, as client-go does), `client-certificate`/`client-key` (files) or their `-data` forms
/// (mutual TLS). Refused with a message: `insecure-skip-tls-verify: true` (the agent would send its
/// token or prove its client key to a server it did not verify), `tls-server-name`, `proxy-url`,
/// and users that authenticate only by `exec`, `auth-provider` or `username`/`password`.
public struct Kubeconfig: Hashable, Sendable {
  /// The largest kubeconfig read; larger files are refused before they are parsed.
  public static let maxBytes = 1 << 20

  /// The file it was read from (absolute), named in every error.
  public var path: String
  public var currentContext: String?
  public var contextNames: [String] { (file.contexts ?? []).map(\.name) }
  private var file: File

  /// The kubeconfig at `path` (relative: against the working directory), read with a bound.
  public static func load(path: String) throws(KubeconfigError) -> Kubeconfig {
    let absolute = URL(fileURLWithPath: path).standardizedFileURL.path
    let text: String
    do {
      text = try readBounded(absolute, limit: maxBytes)
    } catch {
      throw KubeconfigError("kubeconfig \(absolute): \(error.message)")
    }
    return try parse(text, path: absolute)
  }

  /// The kubeconfig in `text`; `path` names it in errors and anchors its relative paths.
  public static func parse(_ text: String, path: String) throws(KubeconfigError) -> Kubeconfig {
    guard text.utf8.count <= maxBytes else {
      throw KubeconfigError("kubeconfig \(path): \(text.utf8.count) bytes, more than the \(maxBytes) accepted")
    }
    let node: Node?
    do {
      node = try Yams.compose(yaml: text)
    } catch {
      throw KubeconfigError("kubeconfig \(path): not YAML: \(error)")
    }
    // Only the keys read are decoded: the rest (extensions, aliases among them) is never walked.
    let file: File
    do {
      file = try node.map { try YAMLDecoder().decode(File.self, from: $0) } ?? File()
    } catch let error as DecodingError {
      throw KubeconfigError("kubeconfig \(path): \(Self.describe(error))")
    } catch {
      throw KubeconfigError("kubeconfig \(path): \(error)")
    }
    if let kind = file.kind, kind != "Config" {
      throw KubeconfigError("kubeconfig \(path): kind \(quoted(kind)) is not Config")
    }
    return Kubeconfig(path: path, currentContext: file.currentContext.flatMap { $0.isEmpty ? nil : $0 }, file: file)
  }

  /// What explicit settings replace in the kubeconfig's (`--kube-api-server`, `--kube-token-file`,
  /// `--kube-ca-file`); empty: not given.
  public struct Overrides: Hashable, Sendable {
    public var server: String
    public var tokenFile: String
    public var caFile: String

    public init(server: String = "", tokenFile: String = "", caFile: String = "") {
      self.server = server
      self.tokenFile = tokenFile
      self.caFile = caFile
    }
  }

  /// The API settings of `context` (nil: the current context), with `overrides` applied first,
  /// so that what they replace is neither required nor refused.
  public func settings(context chosen: String? = nil, overrides: Overrides = Overrides()) throws(KubeconfigError)
    -> KubernetesAPISettings
  {
    guard let contextName = chosen ?? currentContext else {
      throw KubeconfigError(
        "kubeconfig \(path): no current-context, and no context chosen (kubernetes.api.context, --kube-context); contexts: \(Self.list(contextNames))"
      )
    }
    let named = try Self.unique(file.contexts ?? [], contextName, what: "context", in: path)
    guard let context = named.context else {
      throw KubeconfigError("kubeconfig \(path): context \(quoted(contextName)) has no context: {cluster, user}")
    }
    let at = "kubeconfig \(path): context \(quoted(contextName))"
    var settings = KubernetesAPISettings(server: overrides.server, certificateAuthority: nil, token: nil)
    settings.origin = "kubeconfig \(path), context \(quoted(contextName))"

    // The cluster.
    let clusterName = context.cluster ?? ""
    if clusterName.isEmpty, overrides.server.isEmpty {
      throw KubeconfigError("\(at) names no cluster")
    }
    let cluster =
      clusterName.isEmpty
      ? Cluster() : try Self.unique(file.clusters ?? [], clusterName, what: "cluster", in: path).cluster ?? Cluster()
    let clusterAt = "kubeconfig \(path): cluster \(quoted(clusterName))"
    if settings.server.isEmpty {
      guard let server = cluster.server, !server.isEmpty else {
        throw KubeconfigError("\(clusterAt) (of context \(quoted(contextName))) has no server")
      }
      guard server.hasPrefix("https://") else {
        throw KubeconfigError("\(clusterAt): server \(quoted(server)) is not https://: the agent speaks only TLS")
      }
      settings.server = server.hasSuffix("/") ? String(server.dropLast()) : server
    }
    if !overrides.caFile.isEmpty {
      settings.certificateAuthority = .file(overrides.caFile)
    } else {
      if cluster.insecureSkipTLSVerify == true {
        throw KubeconfigError(
          "\(clusterAt): insecure-skip-tls-verify is refused (the agent would send its credentials to a server it did not verify): give certificate-authority or certificate-authority-data, or --kube-ca-file"
        )
      }
      if cluster.tlsServerName.map({ !$0.isEmpty }) == true {
        throw KubeconfigError(
          "\(clusterAt): tls-server-name is not supported: use a server address its certificate names")
      }
      settings.certificateAuthority = try pem(
        file: cluster.certificateAuthority, data: cluster.certificateAuthorityData, field: "certificate-authority",
        at: clusterAt)
    }
    if cluster.proxyURL.map({ !$0.isEmpty }) == true {
      throw KubeconfigError("\(clusterAt): proxy-url is not supported: the agent connects to the server directly")
    }

    // The user.
    let userName = context.user ?? ""
    let user =
      userName.isEmpty ? User() : try Self.unique(file.users ?? [], userName, what: "user", in: path).user ?? User()
    let userAt = "kubeconfig \(path): user \(quoted(userName))"
    settings.clientCertificate = try pem(
      file: user.clientCertificate, data: user.clientCertificateData, field: "client-certificate", at: userAt)
    settings.clientKey = try pem(file: user.clientKey, data: user.clientKeyData, field: "client-key", at: userAt)
    if (settings.clientCertificate == nil) != (settings.clientKey == nil) {
      throw KubeconfigError(
        "\(userAt) has \(settings.clientKey == nil ? "a client certificate but no client-key" : "a client key but no client-certificate") (or their -data forms)"
      )
    }
    if !overrides.tokenFile.isEmpty {
      settings.token = .file(overrides.tokenFile)
    } else if let tokenFile = user.tokenFile, !tokenFile.isEmpty {
      settings.token = .file(resolve(tokenFile))
    } else if let token = user.token, !token.isEmpty {
      settings.token = .inline(token)
    }
    if settings.token == nil, settings.clientCertificate == nil {
      if userName.isEmpty { throw KubeconfigError("\(at) names no user, and no --kube-token-file is given") }
      let others = [
        ("exec", user.exec != nil), ("auth-provider", user.authProvider != nil), ("username", user.username != nil),
      ]
      .filter(\.1).map(\.0)
      throw KubeconfigError(
        "\(userAt) (of context \(quoted(contextName))) has no token, tokenFile or client-certificate/client-key"
          + (others.isEmpty
            ? "" : " (it authenticates by \(others.joined(separator: ", ")), which the agent does not support)"))
    }
    return settings
  }

  // MARK: Helpers

  /// A path of the kubeconfig, resolved against its directory when relative (as kubectl does).
  func resolve(_ relative: String) -> String {
    relative.hasPrefix("/") ? relative : (path as NSString).deletingLastPathComponent + "/" + relative
  }

  private func pem(file: String?, data: String?, field: String, at: String) throws(KubeconfigError)
    -> KubernetesAPISettings.PEM?
  {
    if let data, !data.isEmpty {
      let compact = data.filter { !$0.isWhitespace }
      guard let bytes = Data(base64Encoded: compact) else {
        throw KubeconfigError("\(at): \(field)-data is not base64")
      }
      guard String(decoding: bytes, as: UTF8.self).contains("-----BEGIN ") else {
        throw KubeconfigError("\(at): \(field)-data is base64 but not PEM (no -----BEGIN line)")
      }
      return .inline(Array(bytes), origin: "\(at), \(field)-data")
    }
    if let file, !file.isEmpty { return .file(resolve(file)) }
    return nil
  }

  private static func unique<Entry: NamedEntry>(_ entries: [Entry], _ name: String, what: String, in path: String)
    throws(KubeconfigError) -> Entry
  {
    let matches = entries.filter { $0.name == name }
    guard let first = matches.first else {
      throw KubeconfigError(
        "kubeconfig \(path): \(what) \(quoted(name)) not found; \(what)s: \(list(entries.map(\.name)))")
    }
    guard matches.count == 1 else {
      throw KubeconfigError("kubeconfig \(path): \(what) \(quoted(name)) is defined \(matches.count) times")
    }
    return first
  }

  private static func list(_ names: [String]) -> String {
    names.isEmpty ? "none" : names.map { quoted($0) }.joined(separator: ", ")
  }

  static func describe(_ error: DecodingError) -> String {
    func at(_ path: [any CodingKey]) -> String {
      let text = path.map { key in key.intValue.map { "[\($0)]" } ?? ".\(key.stringValue)" }.joined()
      return text.hasPrefix(".") ? String(text.dropFirst()) : text
    }
    switch error {
    case .typeMismatch(let type, let context), .valueNotFound(let type, let context):
      let place = at(context.codingPath)
      // Yams names the node kind it wanted (Scalar, Sequence, Mapping) or the Swift type.
      let expected =
        [
          "Scalar": "a single value", "Sequence": "a list", "Mapping": "a mapping", "String": "a string",
          "Bool": "true or false",
        ][String(describing: type)] ?? "\(type)"
      return "\(place.isEmpty ? "the document" : place) is not \(expected)"
    case .keyNotFound(let key, let context):
      return "\(at(context.codingPath + [key])) is missing"
    case .dataCorrupted(let context):
      return "\(at(context.codingPath)): \(context.debugDescription)"
    @unknown default:
      return "\(error)"
    }
  }

  // MARK: The file's shape (only what is read)

  private struct File: Decodable, Hashable {
    var kind: String?
    var currentContext: String?
    var clusters: [NamedCluster]?
    var contexts: [NamedContext]?
    var users: [NamedUser]?

    enum CodingKeys: String, CodingKey {
      case kind, clusters, contexts, users
      case currentContext = "current-context"
    }
  }

  private struct NamedCluster: Decodable, Hashable, NamedEntry {
    var name: String
    var cluster: Cluster?
  }

  private struct NamedContext: Decodable, Hashable, NamedEntry {
    var name: String
    var context: Context?
  }

  private struct NamedUser: Decodable, Hashable, NamedEntry {
    var name: String
    var user: User?
  }

  private struct Cluster: Decodable, Hashable {
    var server: String?
    var certificateAuthority: String?
    var certificateAuthorityData: String?
    var insecureSkipTLSVerify: Bool?
    var tlsServerName: String?
    var proxyURL: String?

    enum CodingKeys: String, CodingKey {
      case server
      case certificateAuthority = "certificate-authority"
      case certificateAuthorityData = "certificate-authority-data"
      case insecureSkipTLSVerify = "insecure-skip-tls-verify"
      case tlsServerName = "tls-server-name"
      case proxyURL = "proxy-url"
    }
  }

  private struct Context: Decodable, Hashable {
    var cluster: String?
    var user: String?
  }

  private struct User: Decodable, Hashable {
    var token: String?
    var tokenFile: String?
    var clientCertificate: String?
    var clientCertificateData: String?
    var clientKey: String?
    var clientKeyData: String?
    var exec: Present?
    var authProvider: Present?
    var username: Present?

    enum CodingKeys: String, CodingKey {
      case token, tokenFile, exec, username
      case clientCertificate = "client-certificate"
      case clientCertificateData = "client-certificate-data"
      case clientKey = "client-key"
      case clientKeyData = "client-key-data"
      case authProvider = "auth-provider"
    }
  }

  /// A key whose presence matters, whatever its value (never read further).
  private struct Present: Decodable, Hashable {
    init(from decoder: any Decoder) throws {}
  }
}

private protocol NamedEntry { var name: String { get } }

/// A kubeconfig that cannot be used, with the file, the context and what is wrong.
public struct KubeconfigError: Error, Hashable, Sendable, CustomStringConvertible {
  public var message: String

  public init(_ message: String) { self.message = message }

  public var description: String { message }
}

/// The content of the file at `path`, refused when it is larger than `limit` bytes (read at most
/// `limit + 1` bytes, whatever the file claims to be).
func readBounded(_ path: String, limit: Int) throws(KubeconfigError) -> String {
  guard let handle = FileHandle(forReadingAtPath: path) else {
    throw KubeconfigError(
      FileManager.default.fileExists(atPath: path) ? "cannot be read (permissions?)" : "no such file")
  }
  defer { try? handle.close() }
  let data: Data
  do {
    data = try handle.read(upToCount: limit + 1) ?? Data()
  } catch {
    throw KubeconfigError("cannot be read: \(error.localizedDescription)")
  }
  guard data.count <= limit else { throw KubeconfigError("larger than \(limit) bytes, refused") }
  guard let text = String(data: data, encoding: .utf8) else { throw KubeconfigError("not UTF-8 text") }
  return text
}
