package import FPGAAgentConfig
package import FPGAAgentAPI
package import FPGACore
import Foundation
package import GRPCCore
import GRPCNIOTransportHTTP2
package import NIOCore
package import NIOHTTP2
import Synchronization
import SwiftProtobuf
import X509
import NIOHPACK
import CoreFoundation

/// Who is calling, as the agent sees it, and what it may do.
package struct Caller: Sendable {
  /// `spiffe://…`, `cn:NAME`, `uid:N`, `plaintext:PEER`, `orchestrator:ADDRESS`, `kubelet`,
  /// `in-process`.
  package var identity: String
  /// `tcp-tls`, `tcp-plaintext`, `unix`, `link`, `device-plugin`, `in-process`.
  package var transport: String
  package var role: Role?

  package init(identity: String, transport: String, role: Role?) {
    self.identity = identity
    self.transport = transport
    self.role = role
  }
}

/// The role each RPC needs. An RPC missing here is refused (fail closed); health is open.
package enum Permissions {
  package typealias Method = Fpga_Agent_V1_NodeAgent.Method

  package static let required: [String: Role] = {
    var table: [String: Role] = [:]
    for method in [
      Method.GetNodeStatus.descriptor, Method.GetInventory.descriptor, Method.WatchInventory.descriptor,
      Method.GetOperation.descriptor, Method.WatchOperation.descriptor, Method.ListContexts.descriptor,
    ] {
      table[method.fullyQualifiedMethod] = .viewer
    }
    for method in [
      Method.AllocateVF.descriptor, Method.ReleaseVF.descriptor, Method.AttachVF.descriptor, Method.DetachVF.descriptor,
      Method.RegisterContext.descriptor, Method.DeleteContext.descriptor, Method.SwitchContext.descriptor,
      Method.MoveContext.descriptor,
    ] {
      table[method.fullyQualifiedMethod] = .operator
    }
    for method in [
      Method.Reconfigure.descriptor, Method.DrainDevice.descriptor, Method.UndrainDevice.descriptor,
      Method.SetSharingPolicy.descriptor, Method.Rescan.descriptor, Method.GetAuditTrail.descriptor,
      Method.ClearDeviceHealth.descriptor,
    ] {
      table[method.fullyQualifiedMethod] = .admin
    }
    return table
  }()

  /// Why `caller` may not call `method`, as every surface answers it (the gRPC listeners, the
  /// orchestrator link, the dashboard's JSON endpoints); nil when it may. Fail closed: an RPC
  /// missing from the table is open to no role.
  package static func refusal(_ method: MethodDescriptor, _ caller: Caller) -> RPCError? {
    guard let role = caller.role else {
      return RPCError(
        code: .permissionDenied,
        message: "\(caller.identity) has no role on this agent; map it in auth.roles (viewer, operator or admin)")
    }
    guard let needed = required[method.fullyQualifiedMethod] else {
      return RPCError(code: .permissionDenied, message: "\(method.method) is not open to any role")
    }
    guard role >= needed else {
      return RPCError(
        code: .permissionDenied,
        message:
          "\(method.method) needs role \(needed.rawValue); \(caller.identity) has role \(role.rawValue): nothing changed"
      )
    }
    return nil
  }

  /// RPCs that read only, whatever role they need.
  package static let reading: Set<String> = [Method.GetAuditTrail.descriptor.fullyQualifiedMethod]

  /// RPCs that change something: each one, allowed or denied, is audited.
  package static func isMutating(_ method: String) -> Bool {
    (required[method] ?? .admin) > .viewer && !reading.contains(method)
  }
}

/// Turns a call's transport facts into a `Caller`: a verified client certificate on TCP, the
/// peer's uid on the Unix socket (added by the agent to the stream's headers, never taken from
/// the client), the configured plaintext role on plaintext TCP, admin in the agent's own process.
package struct CallerResolver: Sendable {
  /// Where the node API is served.
  package enum Listener: Sendable {
    case tcp(tls: Bool)
    case unix
    /// `InProcessTransport`: only code in the agent's process (tests, embedders) can call it.
    case inProcess
    /// The agent's own doors (the orchestrator link, the dashboard's HTTP bridge), over an
    /// `InProcessTransport` only they hold: each call carries who it comes from, as the door
    /// established it (`NodeDoor`); trusted here, and only here.
    case door

    /// The audit trail's `transport` of a call without an identity.
    package var name: String {
      switch self {
      case .tcp: "tcp"
      case .unix: "unix"
      case .inProcess: "in-process"
      case .door: "door"
      }
    }

    package var isDoor: Bool { if case .door = self { true } else { false } }
  }

  package let auth: AgentConfig.Auth
  package let listener: Listener

  /// The header the agent sets on Unix-socket streams (a client's own value is removed).
  package static let peerHeader = "fpga-internal-peer-cred"

  package func caller(_ context: ServerContext, _ metadata: Metadata) -> Caller? {
    let tls: Bool
    switch listener {
    case .inProcess: return Caller(identity: "in-process", transport: "in-process", role: .admin)
    case .door: return NodeDoor.caller(metadata)
    case .tcp(let secured): tls = secured
    case .unix:
      guard let credentials = metadata[stringValues: Self.peerHeader].first(where: { _ in true }) else { return nil }
      let parts = credentials.split(separator: ":")
      guard parts.count == 2, let uid = UInt32(parts[0]), let gid = UInt32(parts[1]) else { return nil }
      // Root, and the user the agent runs as, are admin unless the roles say otherwise.
      let owner = (uid == 0 && auth.rootIsAdmin) || uid == SystemCalls.effectiveUserID()
      let role = auth.roles["uid:\(uid)"] ?? auth.roles["gid:\(gid)"] ?? (owner ? .admin : nil)
      return Caller(identity: "uid:\(uid)", transport: "unix", role: role)
    }
    guard tls else {
      return Caller(identity: "plaintext:\(context.remotePeer)", transport: "tcp-plaintext", role: auth.plaintextRole)
    }
    guard let posix = context.transportSpecific as? HTTP2ServerTransport.Posix.Context,
      let leaf = posix.peerCertificate
    else { return nil }
    var names: [String] = []
    if let sans = try? leaf.extensions.subjectAlternativeNames {
      for name in sans {
        if case .uniformResourceIdentifier(let uri) = name { names.append(uri) }
      }
    }
    for rdn in leaf.subject {
      for attribute in rdn where attribute.type == .RDNAttributeType.commonName {
        names.append("cn:" + String(describing: attribute.value))
      }
    }
    guard let identity = names.first else { return nil }
    let role = names.lazy.compactMap { auth.roles[$0] }.first
    return Caller(identity: identity, transport: "tcp-tls", role: role)
  }

  package init(auth: AgentConfig.Auth, listener: Listener) {
    self.auth = auth
    self.listener = listener
  }
}

/// One interceptor for every RPC of a listener: identifies the caller, checks its role, audits
/// every mutating call (allowed or denied) and tells the caller who it is (`fpga-identity`,
/// `fpga-role` in the response headers; `fpgactl whoami` shows them).
package struct AuthorizationInterceptor: ServerInterceptor {
  package let resolver: CallerResolver
  package let audit: AuditLog?
  package let engine: NodeEngine

  package func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>, context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let method = context.descriptor.fullyQualifiedMethod
    if context.descriptor.service.fullyQualifiedService == "grpc.health.v1.Health" {
      return try await next(request, context)
    }
    let mutating = Permissions.isMutating(method)
    let rpc = context.descriptor.method
    let caller = resolver.caller(context, request.metadata)
    let commandID = resolver.listener.isDoor ? NodeDoor.commandID(request.metadata) : nil
    let captured = Mutex<String?>(nil)
    var request = request
    if mutating {
      request.messages = RPCAsyncSequence(
        wrapping: request.messages.map { message in
          if let message = message as? any SwiftProtobuf.Message {
            captured.withLock { $0 = (try? message.jsonString()) ?? "{}" }
          }
          return message
        })
    }
    guard let caller else {
      let error = RPCError(
        code: .unauthenticated, message: "no identity: present a client certificate signed by the agent's client CA")
      if mutating { await record(nil, rpc: rpc, request: nil, status: error.code, commandID: commandID) }
      throw error
    }
    if let refusal = Permissions.refusal(context.descriptor, caller) {
      if mutating { await record(caller, rpc: rpc, request: nil, status: refusal.code, commandID: commandID) }
      throw refusal
    }
    let role = caller.role ?? .viewer
    do {
      let wrapped = request
      // The handler task is always awaited before this returns: `next` does not outlive the call.
      var response = try await withoutActuallyEscaping(next) { next in
        try await Self.cancellable(context) { try await next(wrapped, context) }
      }
      response.metadata.replaceOrAddString(caller.identity, forKey: "fpga-identity")
      response.metadata.replaceOrAddString(role.rawValue, forKey: "fpga-role")
      if mutating {
        let status: RPCError.Code? = if case .failure(let error) = response.accepted { error.code } else { nil }
        await record(caller, rpc: rpc, request: captured.withLock { $0 }, status: status, commandID: commandID)
      }
      return response
    } catch {
      if mutating {
        let code = (error as? any RPCErrorConvertible)?.rpcErrorCode ?? (error as? RPCError)?.code ?? .unknown
        await record(caller, rpc: rpc, request: captured.withLock { $0 }, status: code, commandID: commandID)
      }
      throw error
    }
  }

  /// Runs a call's handler so that when gRPC cancels the RPC (its deadline passed, the client
  /// went away, the server is stopping) the handler's task is cancelled too, and every wait in
  /// it ends; a call ended by its deadline answers DEADLINE_EXCEEDED.
  package static func cancellable<Output: Sendable>(
    _ context: ServerContext, _ body: @escaping @Sendable () async throws -> Output
  ) async throws -> Output {
    let work = Task { try await body() }
    do {
      return try await withTaskCancellationHandler {
        try await withRPCCancellationHandler {
          try await work.value
        } onCancelRPC: {
          work.cancel()
        }
      } onCancel: {
        work.cancel()
      }
    } catch {
      if context.cancellation.isCancelled, !(error is RPCError) || (error as? RPCError)?.code != .deadlineExceeded {
        throw RPCError(
          code: .deadlineExceeded,
          message: "the call was cancelled before it finished (its deadline, server.default_deadline_seconds when "
            + "the client sets none, passed): \(error)")
      }
      throw error
    }
  }

  private func record(
    _ caller: Caller?, rpc: String, request: String?, status: RPCError.Code?, commandID: String?
  ) async {
    guard let audit else { return }
    audit.append(
      AuditEntry(
        identity: caller?.identity ?? "unauthenticated", transport: caller?.transport ?? resolver.listener.name,
        rpc: rpc, request: request, status: status.map { "\($0)" } ?? "ok", revision: await engine.revision,
        commandID: commandID))
  }

  package init(resolver: CallerResolver, audit: AuditLog?, engine: NodeEngine) {
    self.resolver = resolver
    self.audit = audit
    self.engine = engine
  }
}

/// Audits the kubelet's mutating calls on the sockets it alone reaches (so there is no role to
/// check): a device plugin's `Allocate` (transport `device-plugin`, the VFs taken) and a DRA
/// driver's `NodePrepareResources` / `NodeUnprepareResources` (transport `dra`, each claim named
/// by namespace, name and uid), with the result, like every node API mutation.
package struct KubeletAuditInterceptor: ServerInterceptor {
  package let audit: AuditLog
  package let engine: NodeEngine
  package let transport: String
  /// The audited methods: the method's name → its name in the trail.
  package let methods: [String: String]

  package static func devicePlugin(audit: AuditLog, engine: NodeEngine) -> Self {
    Self(audit: audit, engine: engine, transport: "device-plugin", methods: ["Allocate": "DevicePlugin.Allocate"])
  }

  package static func dra(audit: AuditLog, engine: NodeEngine) -> Self {
    Self(
      audit: audit, engine: engine, transport: "dra",
      methods: [
        "NodePrepareResources": "DRA.NodePrepareResources", "NodeUnprepareResources": "DRA.NodeUnprepareResources",
      ])
  }

  package func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>, context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    guard let rpc = methods[context.descriptor.method] else { return try await next(request, context) }
    let captured = Mutex<String?>(nil)
    var request = request
    request.messages = RPCAsyncSequence(
      wrapping: request.messages.map { message in
        if let message = message as? any SwiftProtobuf.Message {
          captured.withLock { $0 = (try? message.jsonString()) ?? "{}" }
        }
        return message
      })
    func record(_ status: RPCError.Code?) async {
      audit.append(
        AuditEntry(
          identity: "kubelet", transport: transport, rpc: rpc, request: captured.withLock { $0 },
          status: status.map { "\($0)" } ?? "ok", revision: await engine.revision))
    }
    do {
      let response = try await next(request, context)
      if case .failure(let error) = response.accepted { await record(error.code) } else { await record(nil) }
      return response
    } catch {
      await record((error as? any RPCErrorConvertible)?.rpcErrorCode ?? (error as? RPCError)?.code ?? .unknown)
      throw error
    }
  }

  package init(audit: AuditLog, engine: NodeEngine, transport: String, methods: [String: String]) {
    self.audit = audit
    self.engine = engine
    self.transport = transport
    self.methods = methods
  }
}

/// One audited request.
package struct AuditEntry: Sendable {
  package var identity: String
  package var transport: String
  package var rpc: String
  /// The request as protobuf JSON (ids, BDFs, the idempotency key are in it).
  package var request: String?
  /// `ok` or the gRPC status.
  package var status: String
  /// The node's revision after the request.
  package var revision: UInt64
  /// The orchestrator's command id, for commands that came over the link.
  package var commandID: String? = nil

  package init(
    identity: String, transport: String, rpc: String, request: String?, status: String, revision: UInt64,
    commandID: String? = nil
  ) {
    self.identity = identity
    self.transport = transport
    self.rpc = rpc
    self.request = request
    self.status = status
    self.revision = revision
    self.commandID = commandID
  }
}

/// The audit trail: one JSON object per line in `STATE_DIR/audit.log` (mode 0600), written
/// before the answer leaves, rotated at `limit` bytes (one older file, `audit.log.1`, is kept).
package final class AuditLog: Sendable {
  package let path: String
  package let limit: Int
  private let lock = Mutex<Int32>(-1)

  package init(path: String, limit: Int = 16 << 20) throws {
    self.path = path
    self.limit = limit
    let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
    guard descriptor >= 0 else {
      throw SystemCalls.Failure(operation: "open the audit log", path: path, errno: errno)
    }
    fchmod(descriptor, 0o600)
    lock.withLock { $0 = descriptor }
  }

  deinit { lock.withLock { if $0 >= 0 { close($0) } } }

  package func append(_ entry: AuditEntry) {
    var object: [String: Any] = [
      "time": Date().formatted(.iso8601), "identity": entry.identity,
      "transport": entry.transport, "rpc": entry.rpc, "status": entry.status, "revision": entry.revision,
    ]
    if let request = entry.request, let data = request.data(using: .utf8),
      let parsed = try? JSONSerialization.jsonObject(with: data)
    {
      object["request"] = parsed
      if let meta = (parsed as? [String: Any])?["meta"] as? [String: Any], let key = meta["idempotencyKey"] {
        object["idempotency_key"] = key
      }
    }
    if let commandID = entry.commandID { object["command_id"] = commandID }
    guard var line = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return }
    line.append(UInt8(ascii: "\n"))
    lock.withLock { descriptor in
      var size = stat()
      if fstat(descriptor, &size) == 0, Int(size.st_size) + line.count > limit {
        rename(path, path + ".1")
        let fresh = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        if fresh >= 0 {
          close(descriptor)
          descriptor = fresh
        }
      }
      _ = line.withUnsafeBytes { write(descriptor, $0.baseAddress, $0.count) }
    }
  }

  /// The last `limit` entries, oldest first (from the rotated file too when needed).
  package func last(_ limit: Int) -> [Fpga_Agent_V1_AuditEntry] {
    var lines: [Substring] = []
    for file in [path, path + ".1"] where lines.count < limit {
      guard let text = try? SystemCalls.readFile(file) else { continue }
      let fresh = text.split(separator: "\n", omittingEmptySubsequences: true)
      lines.insert(contentsOf: fresh.suffix(limit - lines.count), at: 0)
    }
    return lines.map { line in
      var entry = Fpga_Agent_V1_AuditEntry()
      guard let object = (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any] else {
        entry.status = "unreadable"
        entry.requestJson = String(line.prefix(512))
        return entry
      }
      entry.time = object["time"] as? String ?? ""
      entry.identity = object["identity"] as? String ?? ""
      entry.transport = object["transport"] as? String ?? ""
      entry.rpc = object["rpc"] as? String ?? ""
      entry.status = object["status"] as? String ?? ""
      entry.revision = (object["revision"] as? NSNumber)?.uint64Value ?? 0
      entry.idempotencyKey = object["idempotency_key"] as? String ?? ""
      entry.commandID = object["command_id"] as? String ?? ""
      if let request = object["request"],
        let data = try? JSONSerialization.data(withJSONObject: request, options: [.sortedKeys])
      {
        entry.requestJson = String(decoding: data, as: UTF8.self)
      }
      return entry
    }
  }
}

/// Rewrites each stream's request headers before gRPC reads them: removes any
/// `fpga-internal-peer-cred` a client sent and, on the Unix socket, sets it to the peer's uid and
/// gid (SO_PEERCRED of the connection); gives a call without `grpc-timeout` the default
/// deadline, except the watch streams, which last as long as their clients want.
package final class StreamHeaders: ChannelInboundHandler {
  package typealias InboundIn = HTTP2Frame.FramePayload
  package typealias InboundOut = HTTP2Frame.FramePayload

  private let peer: String?
  private let defaultTimeout: String?

  package init(peer: String?, defaultTimeout: String?) {
    self.peer = peer
    self.defaultTimeout = defaultTimeout
  }

  /// Server-streaming calls that are meant to stay open.
  package static func isWatch(_ path: String) -> Bool {
    guard let method = path.split(separator: "/").last else { return false }
    return method.hasPrefix("Watch")
  }

  package func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    var payload = unwrapInboundIn(data)
    if case .headers(var headers) = payload {
      headers.headers.remove(name: CallerResolver.peerHeader)
      if let peer { headers.headers.add(name: CallerResolver.peerHeader, value: peer) }
      if let defaultTimeout, !headers.headers.contains(name: "grpc-timeout"),
        let path = headers.headers.first(name: ":path"), !Self.isWatch(path)
      {
        headers.headers.add(name: "grpc-timeout", value: defaultTimeout)
      }
      payload = .headers(headers)
    }
    context.fireChannelRead(wrapInboundOut(payload))
  }

  /// `uid:gid` of the process at the other end of a Unix socket connection, or nil.
  package static func credentials(of connection: any Channel) -> EventLoopFuture<String?> {
    guard let provider = connection as? any SocketOptionProvider else {
      return connection.eventLoop.makeSucceededFuture(nil)
    }
    let future: EventLoopFuture<PeerCredentials> = provider.unsafeGetSocketOption(
      level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET), name: NIOBSDSocket.Option(rawValue: PeerCredentials.option)
    )
    return future.map { credentials -> String? in "\(credentials.uid):\(credentials.gid)" }
      .recover { _ -> String? in nil }
  }

  /// Linux's `struct ucred` (pid, uid, gid), which Glibc's module does not export.
  package struct PeerCredentials {
    package var pid: Int32 = 0
    package var uid: UInt32 = 0
    package var gid: UInt32 = 0
    /// `SO_PEERCRED` on Linux.
    package static let option: Int32 = 17

    package init(pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0) {
      self.pid = pid
      self.uid = uid
      self.gid = gid
    }
  }
}
