import FPGAAgentAPI
import FPGACore
import Foundation
import GRPCCore
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
import SwiftProtobuf

/// The agent's HTTP listener (`http.listen`): the dashboard page, `/metrics`, `/healthz`, and the
/// JSON endpoints the page calls. Every JSON call goes through the node API's own handlers
/// (`NodeAgentService`), so validation, idempotency and error messages are the gRPC API's; the
/// roles are the gRPC API's too, and every mutating call is audited.
enum WebServer {
  /// Builds the Hummingbird application, to run as a service of the agent's group.
  static func application(
    listen: ListenAddress, config: AgentConfig, engine: NodeEngine, service: NodeAgentService, metrics: AgentMetrics,
    audit: AuditLog, logger: Logger, onListening: @escaping @Sendable (Int) async -> Void = { _ in }
  ) throws -> some ApplicationProtocol {
    let access = WebAccess(
      auth: config.auth, tokens: try WebAccess.tokens(file: config.auth.tokenFile),
      plaintextAllowed: listen.isLoopback || config.http.insecure)
    let api = WebAPI(
      engine: engine, service: service, metrics: metrics, audit: audit, access: access,
      deadline: config.server.defaultDeadlineSeconds > 0 ? .seconds(config.server.defaultDeadlineSeconds) : nil)
    let router = Router(context: WebContext.self)
    router.get("/") { _, _ in
      Response(
        status: .ok,
        headers: [
          .contentType: "text/html; charset=utf-8", .cacheControl: "no-cache", .contentSecurityPolicy: WebAPI.csp,
        ],
        body: .init(byteBuffer: ByteBuffer(string: DashboardPage.html)))
    }
    router.get("/healthz") { _, _ in
      let health = await engine.status().health
      return Response(
        status: health == .notServing ? .serviceUnavailable : .ok, headers: [.contentType: "text/plain"],
        body: .init(byteBuffer: ByteBuffer(string: health == .notServing ? "not serving\n" : "ok\n")))
    }
    router.get("/metrics") { request, context in
      try api.authorize(request, context, needs: .viewer)
      return Response(
        status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
        body: .init(byteBuffer: ByteBuffer(string: await metrics.scrape(engine))))
    }
    router.get("/api/whoami") { request, context in
      let caller = try api.caller(request, context)
      return WebAPI.json(
        #"{"identity":\#(WebAPI.quote(caller.identity)),"role":\#(WebAPI.quote(caller.role?.rawValue ?? "none"))}"#)
    }
    router.get("/api/state") { request, context in
      try api.authorize(request, context, needs: .viewer)
      return WebAPI.json(try await api.state())
    }
    router.get("/api/events") { request, context in
      try api.authorize(request, context, needs: .viewer)
      return api.events(operation: nil)
    }
    router.get("/api/operations/:id/events") { request, context in
      try api.authorize(request, context, needs: .viewer)
      do {
        let id = try Validate.id(try context.parameters.require("id"), field: "id", prefix: "op-")
        _ = try await engine.operation(id)
        return api.events(operation: id)
      } catch let error as AgentError {
        // A malformed or unknown id is the caller's, not the server's (500).
        throw HTTPError(WebAPI.status(error.rpcErrorCode), message: error.rpcErrorMessage)
      }
    }
    router.post("/api/rpc/:method") { request, context in
      await api.call(request, context, method: try context.parameters.require("method"))
    }
    let address: BindAddress = .hostname(listen.host, port: listen.port)
    return Application(
      router: router, configuration: .init(address: address, serverName: "fpga-agent"),
      onServerRunning: { channel in await onListening(channel.localAddress?.port ?? listen.port) },
      logger: logger)
  }
}

/// A request's context: Hummingbird's core, and the peer's address.
struct WebContext: RequestContext {
  var coreContext: CoreRequestContextStorage
  let peer: String

  init(source: ApplicationRequestContextSource) {
    coreContext = .init(source: source)
    peer = source.channel.remoteAddress?.ipAddress ?? "local"
  }

  /// JSON requests are small; the node API caps its own at `server.max_request_bytes`.
  var maxUploadSize: Int { 1 << 20 }
}

/// Who is calling over HTTP: a token (HTTP Basic, user = the token's name, password = the
/// token; or `Authorization: Bearer TOKEN`) from `auth.token_file`, whose identity
/// `token:NAME` maps to a role in `auth.roles`; else, on a loopback listener,
/// `auth.plaintext_role`.
struct WebAccess: Sendable {
  let auth: AgentConfig.Auth
  /// Token → its name.
  let tokens: [String: String]
  let plaintextAllowed: Bool

  /// Reads `TOKEN,NAME` lines (the Kubernetes static token file's first two columns); `#`
  /// starts a comment.
  static func tokens(file: String) throws -> [String: String] {
    guard !file.isEmpty else { return [:] }
    guard let text = try SystemCalls.readFile(file) else {
      throw ConfigError(problems: ["auth.token_file \(quoted(file)) does not exist"])
    }
    var tokens: [String: String] = [:]
    for (number, line) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
      let trimmed = line.trimmingCharacters(in: .whitespaces)
      guard !trimmed.isEmpty, !trimmed.hasPrefix("#") else { continue }
      let fields = trimmed.split(separator: ",", maxSplits: 2).map { $0.trimmingCharacters(in: .whitespaces) }
      guard fields.count >= 2, fields[0].count >= 16, !fields[1].isEmpty else {
        throw ConfigError(problems: [
          "auth.token_file \(quoted(file)) line \(number + 1) is not TOKEN,NAME with a token of 16 characters or more"
        ])
      }
      tokens[fields[0]] = fields[1]
    }
    return tokens
  }

  enum Failure: Error { case unauthenticated(String) }

  func caller(authorization: String?, peer: String) throws(Failure) -> Caller {
    guard let authorization else {
      guard plaintextAllowed else {
        throw .unauthenticated("no credentials: log in with a token from auth.token_file (HTTP Basic or Bearer)")
      }
      return Caller(identity: "plaintext:\(peer)", transport: "http", role: auth.plaintextRole)
    }
    var presented: String?
    if authorization.lowercased().hasPrefix("bearer ") {
      presented = String(authorization.dropFirst(7)).trimmingCharacters(in: .whitespaces)
    } else if authorization.lowercased().hasPrefix("basic "),
      let data = Data(base64Encoded: String(authorization.dropFirst(6)).trimmingCharacters(in: .whitespaces)),
      let text = String(data: data, encoding: .utf8), let colon = text.firstIndex(of: ":")
    {
      presented = String(text[text.index(after: colon)...])
    }
    guard let presented, let name = lookup(presented) else {
      throw .unauthenticated("the token is not in auth.token_file")
    }
    return Caller(identity: "token:\(name)", transport: "http", role: auth.roles["token:\(name)"])
  }

  /// Compares every token in constant time for its length, so timing tells nothing.
  private func lookup(_ presented: String) -> String? {
    let given = Array(presented.utf8)
    var found: String?
    for (token, name) in tokens {
      let expected = Array(token.utf8)
      var difference = UInt8(expected.count == given.count ? 0 : 1)
      for index in 0..<expected.count { difference |= expected[index] ^ (index < given.count ? given[index] : 0) }
      if difference == 0 { found = name }
    }
    return found
  }
}

/// The JSON endpoints.
struct WebAPI: Sendable {
  let engine: NodeEngine
  let service: NodeAgentService
  let metrics: AgentMetrics
  let audit: AuditLog
  let access: WebAccess
  let deadline: Duration?

  /// Only the agent's own page, scripts and styles; no frames, no other origins.
  static let csp =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
    + "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

  struct Problem: Error {
    var code: RPCError.Code
    var message: String
  }

  func caller(_ request: Request, _ context: WebContext) throws -> Caller {
    do {
      return try access.caller(authorization: request.headers[.authorization], peer: context.peer)
    } catch .unauthenticated(let message) {
      throw HTTPError(
        .unauthorized, headers: [.wwwAuthenticate: #"Basic realm="fpga-agent", charset="UTF-8""#],
        message: message)
    }
  }

  func authorize(_ request: Request, _ context: WebContext, needs: Role) throws {
    let caller = try caller(request, context)
    guard let role = caller.role else {
      throw HTTPError(.forbidden, message: "\(caller.identity) has no role on this agent; map it in auth.roles")
    }
    guard role >= needs else {
      throw HTTPError(
        .forbidden, message: "this needs role \(needs.rawValue); \(caller.identity) has role \(role.rawValue)")
    }
  }

  /// The page's model: status, inventory, contexts and recent operations at one moment.
  func state() async throws -> String {
    let context = Self.context(Fpga_Agent_V1_NodeAgent.Method.GetInventory.descriptor, peer: "dashboard")
    let status = try await service.getNodeStatus(request: .init(), context: context)
    let inventory = try await service.getInventory(request: .init(), context: context)
    let contexts = try await service.listContexts(request: .init(), context: context)
    let operations = await engine.recentOperations(50).map { try? Fpga_Agent_V1_Operation($0).jsonString() }
    return
      #"{"revision":\#(inventory.revision),"status":\#(try status.jsonString()),"inventory":\#(try inventory.jsonString()),"contexts":\#(try contexts.jsonString()),"operations":[\#(operations.compactMap { $0 }.joined(separator: ","))]}"#
  }

  /// Server-sent events: `revision` on every inventory change (or `operation` records of one
  /// operation, until it ends), `: ping` every 15 s; ends at shutdown.
  func events(operation: String?) -> Response {
    let engine = engine
    let body = ResponseBody { writer in
      let (stream, feed) = AsyncStream.makeStream(of: String.self, bufferingPolicy: .bufferingNewest(512))
      await withTaskGroup(of: Void.self) { group in
        if let operation {
          group.addTask {
            if let updates = try? await engine.watchOperation(operation) {
              for await record in updates {
                if let json = try? Fpga_Agent_V1_Operation(record).jsonString() {
                  feed.yield("event: operation\ndata: \(json)\n\n")
                }
              }
            }
            feed.finish()
          }
        } else {
          group.addTask {
            let subscription = await engine.watch(from: await engine.revision)
            defer { subscription.cancel() }
            for await event in subscription.events {
              feed.yield("event: revision\ndata: {\"revision\":\(event.revision)}\n\n")
            }
            feed.finish()
          }
          group.addTask {
            guard let updates = try? await engine.watchOperations() else { return }
            for await record in updates {
              if let json = try? Fpga_Agent_V1_Operation(record).jsonString() {
                feed.yield("event: operation\ndata: \(json)\n\n")
              }
            }
          }
        }
        group.addTask {
          while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(15))
            feed.yield(": ping\n\n")
          }
        }
        feed.yield("retry: 1000\n: connected\n\n")
        for await text in stream.cancelOnGracefulShutdown() {
          do { try await writer.write(ByteBuffer(string: text)) } catch { break }
        }
        group.cancelAll()
      }
      try await writer.finish(nil)
    }
    return Response(
      status: .ok,
      headers: [.contentType: "text/event-stream", .cacheControl: "no-cache", .init("X-Accel-Buffering")!: "no"],
      body: body)
  }

  /// `POST /api/rpc/METHOD`: the request message as protobuf JSON in, the response out; errors
  /// as `{"code": "...", "message": "..."}` with the gRPC status's HTTP equivalent.
  func call(_ request: Request, _ context: WebContext, method: String) async -> Response {
    let started = ContinuousClock.now
    var caller: Caller?
    var requestJSON: String?
    var mutating = false
    do {
      guard let entry = Self.methods[method] else {
        throw Problem(
          code: .notFound,
          message: "no method \(quoted(method)); the methods are \(Self.methods.keys.sorted().joined(separator: ", "))")
      }
      mutating = Permissions.isMutating(entry.descriptor.fullyQualifiedMethod)
      var request = request
      let body = try await request.collectBody(upTo: context.maxUploadSize)
      requestJSON = body.readableBytes == 0 ? "{}" : String(buffer: body)
      let resolved: Caller
      do {
        resolved = try access.caller(authorization: request.headers[.authorization], peer: context.peer)
      } catch .unauthenticated(let message) {
        throw Problem(code: .unauthenticated, message: message)
      }
      caller = resolved
      if let refusal = Permissions.refusal(entry.descriptor, resolved) {
        throw Problem(code: refusal.code, message: refusal.message)
      }
      let serverContext = Self.context(entry.descriptor, peer: resolved.identity)
      let json = requestJSON ?? "{}"
      let run = entry.run
      let service = service
      let output = try await withDeadline(deadline) { try await run(service, json, serverContext) }
      if mutating { await record(caller, rpc: entry.descriptor.method, request: requestJSON, status: "ok") }
      metrics.handled(service: "http", method: method, code: "OK", after: ContinuousClock.now - started)
      return Self.json(output)
    } catch {
      let problem = Self.problem(error)
      if mutating { await record(caller, rpc: method, request: requestJSON, status: "\(problem.code)") }
      metrics.handled(
        service: "http", method: method, code: MetricsInterceptor.name(problem.code),
        after: ContinuousClock.now - started)
      var response = Self.json(
        #"{"code":\#(Self.quote(MetricsInterceptor.name(problem.code))),"message":\#(Self.quote(problem.message))}"#,
        status: Self.status(problem.code))
      if problem.code == .unauthenticated {
        response.headers[.wwwAuthenticate] = #"Basic realm="fpga-agent", charset="UTF-8""#
      }
      return response
    }
  }

  private func record(_ caller: Caller?, rpc: String, request: String?, status: String) async {
    audit.append(
      AuditEntry(
        identity: caller?.identity ?? "unauthenticated", transport: "http", rpc: rpc, request: request, status: status,
        revision: await engine.revision))
  }

  /// Runs `body`, cancelling it past `deadline` (then DEADLINE_EXCEEDED).
  private func withDeadline<Output: Sendable>(
    _ deadline: Duration?, _ body: @escaping @Sendable () async throws -> Output
  ) async throws -> Output {
    guard let deadline else { return try await body() }
    return try await withThrowingTaskGroup(of: Output?.self) { group in
      group.addTask { try await body() }
      group.addTask {
        try await Task.sleep(for: deadline)
        return nil
      }
      defer { group.cancelAll() }
      guard let first = try await group.next(), let output = first else {
        throw Problem(
          code: .deadlineExceeded,
          message: "the call did not finish within server.default_deadline_seconds (\(deadline)); it was cancelled")
      }
      return output
    }
  }

  static func problem(_ error: any Error) -> Problem {
    switch error {
    case let problem as Problem: return problem
    case let error as AgentError: return Problem(code: error.rpcErrorCode, message: error.rpcErrorMessage)
    case let error as RPCError: return Problem(code: error.code, message: error.message)
    case let error as JSONDecodingError:
      return Problem(code: .invalidArgument, message: "the request is not valid JSON for this method: \(error)")
    case let error as HTTPError:
      return Problem(
        code: error.status == .contentTooLarge ? .resourceExhausted : .invalidArgument, message: "\(error)")
    default: return Problem(code: .internalError, message: "\(error)")
    }
  }

  static func status(_ code: RPCError.Code) -> HTTPResponse.Status {
    switch code {
    case .invalidArgument, .outOfRange: .badRequest
    case .unauthenticated: .unauthorized
    case .permissionDenied: .forbidden
    case .notFound: .notFound
    case .aborted, .alreadyExists: .conflict
    case .failedPrecondition: .preconditionFailed
    case .resourceExhausted: .tooManyRequests
    case .unavailable: .serviceUnavailable
    case .deadlineExceeded: .gatewayTimeout
    case .unimplemented: .notImplemented
    default: .internalServerError
    }
  }

  static func json(_ text: String, status: HTTPResponse.Status = .ok) -> Response {
    Response(
      status: status, headers: [.contentType: "application/json", .cacheControl: "no-store"],
      body: .init(byteBuffer: ByteBuffer(string: text)))
  }

  /// A JSON string literal.
  static func quote(_ text: String) -> String {
    guard let data = try? JSONSerialization.data(withJSONObject: [text]),
      let array = String(data: data, encoding: .utf8)
    else { return "\"\"" }
    return String(array.dropFirst().dropLast())
  }

  static func context(_ descriptor: MethodDescriptor, peer: String) -> ServerContext {
    ServerContext(descriptor: descriptor, remotePeer: peer, localPeer: "http", cancellation: .init())
  }

  /// One JSON method: its descriptor (for the role table) and how to run it.
  struct Method: Sendable {
    let descriptor: MethodDescriptor
    let run: @Sendable (NodeAgentService, String, ServerContext) async throws -> String
  }

  /// `run` for a unary handler of the node API.
  static func method<Input: SwiftProtobuf.Message, Output: SwiftProtobuf.Message>(
    _ descriptor: MethodDescriptor,
    _ handler: @escaping @Sendable (NodeAgentService) -> (Input, ServerContext) async throws -> Output
  ) -> (String, Method) {
    (
      descriptor.method,
      Method(descriptor: descriptor) { service, json, context in
        let input = try Input(jsonString: json)
        return try await handler(service)(input, context).jsonString()
      }
    )
  }

  static let methods: [String: Method] = {
    typealias M = Fpga_Agent_V1_NodeAgent.Method
    return Dictionary(uniqueKeysWithValues: [
      method(M.GetNodeStatus.descriptor) { service in { try await service.getNodeStatus(request: $0, context: $1) } },
      method(M.GetInventory.descriptor) { service in { try await service.getInventory(request: $0, context: $1) } },
      method(M.Rescan.descriptor) { service in { try await service.rescan(request: $0, context: $1) } },
      method(M.AllocateVF.descriptor) { service in { try await service.allocateVF(request: $0, context: $1) } },
      method(M.ReleaseVF.descriptor) { service in { try await service.releaseVF(request: $0, context: $1) } },
      method(M.AttachVF.descriptor) { service in { try await service.attachVF(request: $0, context: $1) } },
      method(M.DetachVF.descriptor) { service in { try await service.detachVF(request: $0, context: $1) } },
      method(M.Reconfigure.descriptor) { service in { try await service.reconfigure(request: $0, context: $1) } },
      method(M.GetOperation.descriptor) { service in { try await service.getOperation(request: $0, context: $1) } },
      method(M.DrainDevice.descriptor) { service in { try await service.drainDevice(request: $0, context: $1) } },
      method(M.UndrainDevice.descriptor) { service in { try await service.undrainDevice(request: $0, context: $1) } },
      method(M.RegisterContext.descriptor) { service in { try await service.registerContext(request: $0, context: $1) }
      },
      method(M.ListContexts.descriptor) { service in { try await service.listContexts(request: $0, context: $1) } },
      method(M.DeleteContext.descriptor) { service in { try await service.deleteContext(request: $0, context: $1) } },
      method(M.SwitchContext.descriptor) { service in { try await service.switchContext(request: $0, context: $1) } },
      method(M.SetSharingPolicy.descriptor) { service in
        { try await service.setSharingPolicy(request: $0, context: $1) }
      },
      method(M.MoveContext.descriptor) { service in { try await service.moveContext(request: $0, context: $1) } },
      method(M.GetAuditTrail.descriptor) { service in { try await service.getAuditTrail(request: $0, context: $1) } },
      method(M.ClearDeviceHealth.descriptor) { service in
        { try await service.clearDeviceHealth(request: $0, context: $1) }
      },
    ])
  }()
}
