public import FPGAQMP
import Foundation
import Synchronization

/// An in-process QMP server on a Unix socket, for what a stock QEMU cannot show (a QEMU with a
/// VFIO pause command, devices with a `host` property). It answers the greeting and
/// `qmp_capabilities` like QEMU, then calls `handler` for every other command; records commands.
public final class FakeQMPServer: @unchecked Sendable {
  public typealias Handler = @Sendable (String, JSONValue?) -> Result<JSONValue, QMPError>

  public let path: String
  private let listener: Int32
  private let handler: Handler
  private let log = Mutex<[String]>([])

  public init(path: String, handler: @escaping Handler) throws {
    self.path = path
    self.handler = handler
    listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
    }
    unlink(path)
    let bound = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    guard bound == 0, listen(listener, 8) == 0 else {
      throw QMPError(.connectFailed, "fake QMP server cannot bind \(path)")
    }
    let thread = Thread { [self] in self.acceptLoop() }
    thread.start()
  }

  /// The commands received, oldest first.
  public var commands: [String] { log.withLock { $0 } }

  /// Stops accepting. The accept thread closes the listener itself, so its descriptor number is
  /// never used again after someone else may have been given it.
  public func stop() {
    shutdown(listener, Int32(SHUT_RDWR))
    unlink(path)
  }

  private func acceptLoop() {
    while true {
      let client = accept(listener, nil, nil)
      guard client >= 0 else {
        if errno == EINTR { continue }
        close(listener)
        return
      }
      let thread = Thread { [self] in self.serve(client) }
      thread.start()
    }
  }

  private func serve(_ fd: Int32) {
    defer { close(fd) }
    func send(_ value: JSONValue) {
      let data = value.serialized + Data("\r\n".utf8)
      _ = data.withUnsafeBytes { Foundation.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }
    send([
      "QMP": ["version": ["qemu": ["major": 7, "minor": 2, "micro": 99], "package": "fake"], "capabilities": ["oob"]]
    ])
    var buffer = Data()
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
      let count = read(fd, &chunk, chunk.count)
      guard count > 0 else { return }
      buffer.append(contentsOf: chunk[0..<count])
      while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
        let line = Data(buffer[buffer.startIndex..<newline])
        buffer.removeSubrange(buffer.startIndex...newline)
        guard let message = try? JSONValue.parse(line), let command = message["execute"]?.stringValue else { continue }
        let id = message["id"] ?? .null
        log.withLock { $0.append(command) }
        if command == "qmp_capabilities" {
          send(["return": [:], "id": id])
          continue
        }
        switch handler(command, message["arguments"]) {
        case .success(let value): send(["return": value, "id": id])
        case .failure(let error):
          send([
            "error": ["class": .string(error.errorClass ?? "GenericError"), "desc": .string(error.message)], "id": id,
          ])
        }
      }
    }
  }
}
