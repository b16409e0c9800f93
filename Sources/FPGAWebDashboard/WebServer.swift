package import FPGAAgentDoors
package import FPGAAgentConfig
package import FPGAAgentAPI
package import FPGACore
import Foundation
package import GRPCCore
import GRPCProtobuf
package import Hummingbird
package import Logging
import NIOCore
import ServiceLifecycle
package import SwiftProtobuf

/// The agent's HTTP listener (`http.listen`): the dashboard page, `/metrics`, `/healthz`, and the
/// JSON endpoints the page calls. Every JSON call goes through the node API's door (`NodeDoor`):
/// the same handlers and interceptors as a gRPC caller's, so validation, idempotency, roles,
/// deadlines, audit and error messages are the gRPC API's. The HTTP side only authenticates the
/// caller (basic or bearer tokens) and translates JSON.
package enum WebServer {
  /// Builds the Hummingbird application, to run as a service of the agent's group.
  package static func application(
    listen: ListenAddress, config: AgentConfig, engine: NodeEngine, service: NodeAgentService, door: NodeDoor,
    metrics: AgentMetrics, audit: AuditLog, logger: Logger,
    onListening: @escaping @Sendable (Int) async -> Void = { _ in }
  ) throws -> some ApplicationProtocol {
    let access = WebAccess(
      auth: config.auth, tokens: try WebAccess.tokens(file: config.auth.tokenFile),
      plaintextAllowed: listen.isLoopback || config.http.insecure)
    let api = WebAPI(
      engine: engine, service: service, door: door, metrics: metrics, audit: audit, access: access,
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
package struct WebContext: RequestContext {
  package var coreContext: CoreRequestContextStorage
  package let peer: String

  package init(source: ApplicationRequestContextSource) {
    coreContext = .init(source: source)
    peer = source.channel.remoteAddress?.ipAddress ?? "local"
  }

  /// JSON requests are small; the node API caps its own at `server.max_request_bytes`.
  package var maxUploadSize: Int { 1 << 20 }
}

/// Who is calling over HTTP: a token (HTTP Basic, user = the token's name, password = the
/// token; or `Authorization: Bearer TOKEN`) from `auth.token_file`, whose identity
/// `token:NAME` maps to a role in `auth.roles`; else, on a loopback listener,
/// `auth.plaintext_role`.
package struct WebAccess: Sendable {
  package let auth: AgentConfig.Auth
  /// Token → its name.
  package let tokens: [String: String]
  package let plaintextAllowed: Bool

  /// Reads `TOKEN,NAME` lines (the Kubernetes static token file's first two columns); `#`
  /// starts a comment.
  package static func tokens(file: String) throws -> [String: String] {
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

  package enum Failure: Error { case unauthenticated(String) }

  package func caller(authorization: String?, peer: String) throws(Failure) -> Caller {
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

  package init(auth: AgentConfig.Auth, tokens: [String: String], plaintextAllowed: Bool) {
    self.auth = auth
    self.tokens = tokens
    self.plaintextAllowed = plaintextAllowed
  }
}

/// The JSON endpoints.
package struct WebAPI: Sendable {
  package let engine: NodeEngine
  /// For the page's own reads (the state it starts from).
  package let service: NodeAgentService
  /// Every JSON method call.
  package let door: NodeDoor
  package let metrics: AgentMetrics
  package let audit: AuditLog
  package let access: WebAccess
  package let deadline: Duration?

  /// Only the agent's own page, scripts and styles; no frames, no other origins.
  package static let csp =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
    + "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

  package struct Problem: Error {
    package var code: RPCError.Code
    package var message: String

    package init(code: RPCError.Code, message: String) {
      self.code = code
      self.message = message
    }
  }

  package func caller(_ request: Request, _ context: WebContext) throws -> Caller {
    do {
      return try access.caller(authorization: request.headers[.authorization], peer: context.peer)
    } catch .unauthenticated(let message) {
      throw HTTPError(
        .unauthorized, headers: [.wwwAuthenticate: #"Basic realm="fpga-agent", charset="UTF-8""#],
        message: message)
    }
  }

  package func authorize(_ request: Request, _ context: WebContext, needs: Role) throws {
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
  package func state() async throws -> String {
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
  package func events(operation: String?) -> Response {
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
  /// as `{"code": "...", "message": "..."}` with the gRPC status's HTTP equivalent. The call
  /// goes through the node API's door as the authenticated caller (transport `http`).
  package func call(_ request: Request, _ context: WebContext, method: String) async -> Response {
    let started = ContinuousClock.now
    var caller: Caller?
    var requestJSON: String?
    do {
      guard let entry = Self.methods[method] else {
        throw Problem(
          code: .notFound,
          message: "no method \(quoted(method)); the methods are \(Self.methods.keys.sorted().joined(separator: ", "))")
      }
      var request = request
      let body = try await request.collectBody(upTo: context.maxUploadSize)
      requestJSON = body.readableBytes == 0 ? "{}" : String(buffer: body)
      do {
        caller = try access.caller(authorization: request.headers[.authorization], peer: context.peer)
      } catch .unauthenticated(let message) {
        // The HTTP door's own refusal: no caller to hand to the node API. Audited here.
        if Permissions.isMutating(entry.descriptor.fullyQualifiedMethod) {
          audit.append(
            AuditEntry(
              identity: "unauthenticated", transport: "http", rpc: method, request: requestJSON,
              status: "\(RPCError.Code.unauthenticated)", revision: await engine.revision))
        }
        throw Problem(code: .unauthenticated, message: message)
      }
      let metadata = NodeDoor.metadata(
        identity: caller?.identity ?? "unauthenticated", transport: "http", role: caller?.role)
      var options = CallOptions.defaults
      options.timeout = deadline
      let output = try await entry.run(door, requestJSON ?? "{}", metadata, options)
      metrics.handled(service: "http", method: method, code: "OK", after: ContinuousClock.now - started)
      return Self.json(output)
    } catch {
      let problem = Self.problem(error)
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

  package static func problem(_ error: any Error) -> Problem {
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

  package static func status(_ code: RPCError.Code) -> HTTPResponse.Status {
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

  package static func json(_ text: String, status: HTTPResponse.Status = .ok) -> Response {
    Response(
      status: status, headers: [.contentType: "application/json", .cacheControl: "no-store"],
      body: .init(byteBuffer: ByteBuffer(string: text)))
  }

  /// A JSON string literal.
  package static func quote(_ text: String) -> String {
    guard let data = try? JSONSerialization.data(withJSONObject: [text]),
      let array = String(data: data, encoding: .utf8)
    else { return "\"\"" }
    return String(array.dropFirst().dropLast())
  }

  package static func context(_ descriptor: MethodDescriptor, peer: String) -> ServerContext {
    ServerContext(descriptor: descriptor, remotePeer: peer, localPeer: "http", cancellation: .init())
  }

  /// One JSON method: its descriptor and how to call it through the door.
  package struct Method: Sendable {
    package let descriptor: MethodDescriptor
    package let run: @Sendable (NodeDoor, String, Metadata, CallOptions) async throws -> String

    package init(
      descriptor: MethodDescriptor,
      run: @escaping @Sendable (NodeDoor, String, Metadata, CallOptions) async throws -> String
    ) {
      self.descriptor = descriptor
      self.run = run
    }
  }

  /// A unary method of the node API, called with the request decoded from JSON.
  package static func method<Input: SwiftProtobuf.Message, Output: SwiftProtobuf.Message>(
    _ descriptor: MethodDescriptor, _: Input.Type, _: Output.Type
  ) -> (String, Method) {
    (
      descriptor.method,
      Method(descriptor: descriptor) { door, json, metadata, options in
        let input = try Input(jsonString: json)
        let output: Output = try await door.client.unary(
          request: ClientRequest(message: input, metadata: metadata), descriptor: descriptor,
          serializer: ProtobufSerializer<Input>(), deserializer: ProtobufDeserializer<Output>(), options: options
        ) { try $0.message }
        return try output.jsonString()
      }
    )
  }

  package static let methods: [String: Method] = {
    typealias M = Fpga_Agent_V1_NodeAgent.Method
    return Dictionary(uniqueKeysWithValues: [
      method(M.GetNodeStatus.descriptor, M.GetNodeStatus.Input.self, M.GetNodeStatus.Output.self),
      method(M.GetInventory.descriptor, M.GetInventory.Input.self, M.GetInventory.Output.self),
      method(M.Rescan.descriptor, M.Rescan.Input.self, M.Rescan.Output.self),
      method(M.AllocateVF.descriptor, M.AllocateVF.Input.self, M.AllocateVF.Output.self),
      method(M.ReleaseVF.descriptor, M.ReleaseVF.Input.self, M.ReleaseVF.Output.self),
      method(M.AttachVF.descriptor, M.AttachVF.Input.self, M.AttachVF.Output.self),
      method(M.DetachVF.descriptor, M.DetachVF.Input.self, M.DetachVF.Output.self),
      method(M.Reconfigure.descriptor, M.Reconfigure.Input.self, M.Reconfigure.Output.self),
      method(M.GetOperation.descriptor, M.GetOperation.Input.self, M.GetOperation.Output.self),
      method(M.DrainDevice.descriptor, M.DrainDevice.Input.self, M.DrainDevice.Output.self),
      method(M.UndrainDevice.descriptor, M.UndrainDevice.Input.self, M.UndrainDevice.Output.self),
      method(M.RegisterContext.descriptor, M.RegisterContext.Input.self, M.RegisterContext.Output.self),
      method(M.ListContexts.descriptor, M.ListContexts.Input.self, M.ListContexts.Output.self),
      method(M.DeleteContext.descriptor, M.DeleteContext.Input.self, M.DeleteContext.Output.self),
      method(M.SwitchContext.descriptor, M.SwitchContext.Input.self, M.SwitchContext.Output.self),
      method(M.SetSharingPolicy.descriptor, M.SetSharingPolicy.Input.self, M.SetSharingPolicy.Output.self),
      method(M.MoveContext.descriptor, M.MoveContext.Input.self, M.MoveContext.Output.self),
      method(M.GetAuditTrail.descriptor, M.GetAuditTrail.Input.self, M.GetAuditTrail.Output.self),
      method(M.ClearDeviceHealth.descriptor, M.ClearDeviceHealth.Input.self, M.ClearDeviceHealth.Output.self),
    ])
  }()

  package init(
    engine: NodeEngine, service: NodeAgentService, door: NodeDoor, metrics: AgentMetrics, audit: AuditLog,
    access: WebAccess, deadline: Duration?
  ) {
    self.engine = engine
    self.service = service
    self.door = door
    self.metrics = metrics
    self.audit = audit
    self.access = access
    self.deadline = deadline
  }
}
