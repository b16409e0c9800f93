@testable import FPGADRA
import Foundation
import Testing

@Suite struct KubeconfigTests {
  static let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
  static let pemData = Data(pem.utf8).base64EncodedString()

  /// Two clusters and three users in three contexts, the current one `kind`.
  static let sample = """
    apiVersion: v1
    kind: Config
    preferences: {}
    current-context: kind
    clusters:
    - name: kind-cluster
      cluster:
        server: https://127.0.0.1:6443/
        certificate-authority-data: \(pemData)
    - name: lab
      cluster:
        server: https://lab.example:443
        certificate-authority: certs/ca.crt
        extensions: [{name: x, extension: {anything: [1, 2]}}]
    contexts:
    - name: kind
      context: {cluster: kind-cluster, user: kind-admin, namespace: default}
    - name: lab
      context: {cluster: lab, user: lab-agent}
    - name: lab-mtls
      context: {cluster: lab, user: lab-mtls}
    users:
    - name: kind-admin
      user:
        token: abc.def
    - name: lab-agent
      user:
        token: ignored-when-tokenFile-is-given
        tokenFile: tokens/agent
    - name: lab-mtls
      user:
        client-certificate: /etc/fpga/client.crt
        client-key-data: \(Data("-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n".utf8).base64EncodedString())
    """

  func config(_ text: String = sample) throws -> Kubeconfig {
    try Kubeconfig.parse(text, path: "/home/op/.kube/config")
  }

  /// The message of the `KubeconfigError` that `body` throws.
  func failure(_ body: () throws -> Void) -> String {
    do {
      try body()
      return "no error"
    } catch let error as KubeconfigError {
      return error.message
    } catch {
      return "not a KubeconfigError: \(error)"
    }
  }

  @Test func currentContextWithInlineCAAndToken() throws {
    let settings = try config().settings()
    #expect(settings.server == "https://127.0.0.1:6443")
    #expect(
      settings.certificateAuthority == .inline(Array(Self.pem.utf8), origin: settings.certificateAuthority!.origin))
    #expect(
      settings.certificateAuthority?.origin.contains("cluster \"kind-cluster\", certificate-authority-data") == true)
    #expect(settings.token == .inline("abc.def"))
    #expect(settings.clientCertificate == nil && settings.clientKey == nil)
    #expect(settings.origin == "kubeconfig /home/op/.kube/config, context \"kind\"")
    #expect(settings.summary.contains("bearer token"))
  }

  @Test func chosenContextResolvesRelativePathsAgainstTheFilesDirectory() throws {
    let settings = try config().settings(context: "lab")
    #expect(settings.server == "https://lab.example:443")
    #expect(settings.certificateAuthority == .file("/home/op/.kube/certs/ca.crt"))
    // tokenFile wins over token (client-go reads the file and prefers it).
    #expect(settings.token == .file("/home/op/.kube/tokens/agent"))
  }

  @Test func clientCertificateFromAFileAndKeyFromData() throws {
    let settings = try config().settings(context: "lab-mtls")
    #expect(settings.clientCertificate == .file("/etc/fpga/client.crt"))
    guard case .inline(let key, let origin) = settings.clientKey else {
      Issue.record("no inline key: \(String(describing: settings.clientKey))")
      return
    }
    #expect(String(decoding: key, as: UTF8.self).hasPrefix("-----BEGIN PRIVATE KEY-----"))
    #expect(origin.hasSuffix("user \"lab-mtls\", client-key-data"))
    #expect(settings.token == nil)
    #expect(settings.summary.contains("client certificate"))
  }

  @Test func unknownContextNamesTheFileAndListsTheContexts() throws {
    let kubeconfig = try config()
    #expect(
      failure { _ = try kubeconfig.settings(context: "foo") }
        == "kubeconfig /home/op/.kube/config: context \"foo\" not found; contexts: \"kind\", \"lab\", \"lab-mtls\"")
    #expect(kubeconfig.contextNames == ["kind", "lab", "lab-mtls"])
  }

  @Test func noCurrentContext() throws {
    let kubeconfig = try config(
      Self.sample.replacingOccurrences(of: "current-context: kind", with: "current-context: \"\""))
    #expect(kubeconfig.currentContext == nil)
    #expect(
      failure { _ = try kubeconfig.settings() }.hasPrefix(
        "kubeconfig /home/op/.kube/config: no current-context, and no context chosen (kubernetes.api.context, --kube-context); contexts: \"kind\""
      ))
    #expect(try kubeconfig.settings(context: "lab").server == "https://lab.example:443")
  }

  @Test func missingClusterAndUser() throws {
    let noCluster = try config(
      Self.sample.replacingOccurrences(of: "cluster: lab, user: lab-agent", with: "cluster: gone, user: lab-agent"))
    #expect(
      failure { _ = try noCluster.settings(context: "lab") }
        == "kubeconfig /home/op/.kube/config: cluster \"gone\" not found; clusters: \"kind-cluster\", \"lab\"")
    let noUser = try config(Self.sample.replacingOccurrences(of: "user: kind-admin", with: "user: nobody"))
    #expect(
      failure { _ = try noUser.settings() }
        == "kubeconfig /home/op/.kube/config: user \"nobody\" not found; users: \"kind-admin\", \"lab-agent\", \"lab-mtls\""
    )
  }

  @Test func insecureSkipTLSVerifyIsRefusedUnlessACAFileIsGiven() throws {
    let insecure = try config(
      Self.sample.replacingOccurrences(
        of: "certificate-authority-data: \(Self.pemData)", with: "insecure-skip-tls-verify: true"))
    #expect(
      failure { _ = try insecure.settings() }.hasPrefix(
        "kubeconfig /home/op/.kube/config: cluster \"kind-cluster\": insecure-skip-tls-verify is refused"))
    let settings = try insecure.settings(overrides: .init(caFile: "/etc/k8s/ca.crt"))
    #expect(settings.certificateAuthority == .file("/etc/k8s/ca.crt"))
  }

  @Test func explicitSettingsOverrideTheKubeconfigs() throws {
    let settings = try config().settings(
      overrides: .init(server: "https://10.0.0.1:6443", tokenFile: "/run/token", caFile: "/run/ca.crt"))
    #expect(settings.server == "https://10.0.0.1:6443")
    #expect(settings.token == .file("/run/token"))
    #expect(settings.certificateAuthority == .file("/run/ca.crt"))
  }

  @Test func usersWithoutUsableCredentials() throws {
    let exec = try config(
      Self.sample.replacingOccurrences(
        of: "    token: abc.def", with: "    exec: {apiVersion: client.authentication.k8s.io/v1, command: aws}"))
    #expect(
      failure { _ = try exec.settings() }
        == "kubeconfig /home/op/.kube/config: user \"kind-admin\" (of context \"kind\") has no token, tokenFile or client-certificate/client-key (it authenticates by exec, which the agent does not support)"
    )
    // A token file given explicitly is enough.
    #expect(try exec.settings(overrides: .init(tokenFile: "/run/token")).token == .file("/run/token"))
    let halfCertificate = try config(Self.sample.replacingOccurrences(of: "    client-key-data:", with: "    other:"))
    #expect(
      failure { _ = try halfCertificate.settings(context: "lab-mtls") }
        == "kubeconfig /home/op/.kube/config: user \"lab-mtls\" has a client certificate but no client-key (or their -data forms)"
    )
  }

  @Test func malformedFields() throws {
    let badBase64 = try config(Self.sample.replacingOccurrences(of: Self.pemData, with: "not*base64"))
    #expect(
      failure { _ = try badBase64.settings() }
        == "kubeconfig /home/op/.kube/config: cluster \"kind-cluster\": certificate-authority-data is not base64")
    let notPEM = try config(
      Self.sample.replacingOccurrences(of: Self.pemData, with: Data("hello".utf8).base64EncodedString()))
    #expect(
      failure { _ = try notPEM.settings() }.hasSuffix(
        "certificate-authority-data is base64 but not PEM (no -----BEGIN line)"))
    let plaintext = try config(
      Self.sample.replacingOccurrences(of: "https://127.0.0.1:6443/", with: "http://127.0.0.1:8080"))
    #expect(failure { _ = try plaintext.settings() }.contains("server \"http://127.0.0.1:8080\" is not https://"))
    let noServer = try config(
      Self.sample.replacingOccurrences(of: "server: https://127.0.0.1:6443/", with: "server: \"\""))
    #expect(
      failure { _ = try noServer.settings() }
        == "kubeconfig /home/op/.kube/config: cluster \"kind-cluster\" (of context \"kind\") has no server")
    #expect(
      failure { _ = try Kubeconfig.parse("clusters: 3\n", path: "/k") } == "kubeconfig /k: clusters is not a list")
    #expect(
      failure { _ = try Kubeconfig.parse("clusters: [{name: a, cluster: {server: [1]}}]\n", path: "/k") }
        == "kubeconfig /k: clusters[0].cluster.server is not a single value")
    #expect(
      failure {
        _ = try Kubeconfig.parse("clusters: [{name: a, cluster: {insecure-skip-tls-verify: maybe}}]\n", path: "/k")
      }
        == "kubeconfig /k: clusters[0].cluster.insecure-skip-tls-verify is not true or false")
    #expect(
      failure { _ = try Kubeconfig.parse("kind: Pod\n", path: "/k") } == "kubeconfig /k: kind \"Pod\" is not Config")
    #expect(failure { _ = try Kubeconfig.parse("a: [\n", path: "/k") }.hasPrefix("kubeconfig /k: not YAML"))
    #expect(
      failure { _ = try Kubeconfig.parse("", path: "/k").settings() }
        == "kubeconfig /k: no current-context, and no context chosen (kubernetes.api.context, --kube-context); contexts: none"
    )
    let twice = try config(Self.sample + "\n- name: kind-admin\n  user: {token: x}\n")
    #expect(
      failure { _ = try twice.settings() } == "kubeconfig /home/op/.kube/config: user \"kind-admin\" is defined 2 times"
    )
  }

  @Test func filesAreBoundedAndNamed() throws {
    let directory = NSTemporaryDirectory() + "fpga-kubeconfig-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let path = directory + "/config"
    try Self.sample.write(toFile: path, atomically: true, encoding: .utf8)
    let loaded = try Kubeconfig.load(path: path)
    #expect(loaded.path == path)
    #expect(try loaded.settings(context: "lab").certificateAuthority == .file(directory + "/certs/ca.crt"))
    let large = directory + "/large"
    try Data(repeating: 0x20, count: Kubeconfig.maxBytes + 1).write(to: URL(fileURLWithPath: large))
    #expect(
      failure { _ = try Kubeconfig.load(path: large) }
        == "kubeconfig \(large): larger than \(Kubeconfig.maxBytes) bytes, refused")
    #expect(
      failure { _ = try Kubeconfig.parse(String(repeating: " ", count: Kubeconfig.maxBytes + 1), path: "/k") }
        .hasSuffix("more than the \(Kubeconfig.maxBytes) accepted"))
    #expect(
      failure { _ = try Kubeconfig.load(path: directory + "/absent") } == "kubeconfig \(directory)/absent: no such file"
    )
  }

  @Test func precedenceWithoutAKubeconfig() throws {
    #expect(
      try KubernetesAPISettings.resolve(explicit: .init(), kubeconfig: nil, context: nil, environment: [:]) == nil)
    let pod = try #require(
      try KubernetesAPISettings.resolve(
        explicit: .init(tokenFile: "/t"), kubeconfig: nil, context: nil,
        environment: ["KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"]))
    #expect(pod.server == "https://[fd00::1]:443")
    #expect(pod.token == .file("/t"))
    #expect(pod.certificateAuthority == .file("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"))
    let explicit = try #require(
      try KubernetesAPISettings.resolve(
        explicit: .init(server: "https://k:1"), kubeconfig: nil, context: nil,
        environment: ["KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"]))
    #expect(explicit.server == "https://k:1")
    #expect(explicit.token == .file("/var/run/secrets/kubernetes.io/serviceaccount/token"))
    // A kubeconfig wins over the pod's environment.
    let fromFile = try #require(
      try KubernetesAPISettings.resolve(
        explicit: .init(), kubeconfig: config(), context: "lab",
        environment: ["KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"]))
    #expect(fromFile.server == "https://lab.example:443")
  }
}
