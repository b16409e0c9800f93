#if canImport(Glibc)
  @preconcurrency import Glibc
#endif
public import FPGACore
import Foundation

/// A kernel uevent about a device: `add`, `remove`, `bind`, `unbind`, `change`, ...
public struct Uevent: Hashable, Sendable {
  public var action: String
  public var devpath: String
  public var subsystem: String
  /// `PCI_SLOT_NAME` for a PCI device.
  public var pciSlot: PCIAddress?

  public init(action: String, devpath: String, subsystem: String, pciSlot: PCIAddress? = nil) {
    self.action = action
    self.devpath = devpath
    self.subsystem = subsystem
    self.pciSlot = pciSlot
  }

  /// Parses a kernel uevent datagram (`ACTION@DEVPATH\0KEY=VALUE\0...`); nil for anything else
  /// (udev's re-broadcasts start with `libudev`).
  public init?(datagram: [UInt8]) {
    let fields = datagram.split(separator: 0, omittingEmptySubsequences: true).map {
      String(decoding: $0, as: UTF8.self)
    }
    guard let header = fields.first, header.contains("@"), !header.hasPrefix("libudev") else { return nil }
    var values: [String: String] = [:]
    for field in fields.dropFirst() {
      guard let equals = field.firstIndex(of: "=") else { continue }
      values[String(field[..<equals])] = String(field[field.index(after: equals)...])
    }
    guard let action = values["ACTION"], let devpath = values["DEVPATH"] else { return nil }
    self.init(
      action: action, devpath: devpath, subsystem: values["SUBSYSTEM"] ?? "",
      pciSlot: values["PCI_SLOT_NAME"].flatMap { PCIAddress($0.lowercased()) })
  }

  /// Whether it can change what the agent manages: a PCI device added, removed, bound, unbound
  /// or changed (AER recovery reports `change`).
  public var concernsPCIDevices: Bool {
    subsystem == "pci" && ["add", "remove", "bind", "unbind", "change", "offline", "online"].contains(action)
  }
}

/// Where uevents come from: the kernel's netlink socket, or a test.
public protocol UeventSource: Sendable {
  /// The events from now on, until the stream's consumer goes away.
  func events() -> AsyncStream<Uevent>
}

/// The kernel's uevents (`NETLINK_KOBJECT_UEVENT`, the kernel multicast group), read on a thread
/// of their own (a blocking `recv`), so the cooperative pool never waits on the socket.
public struct NetlinkUevents: UeventSource {
  public init() {}

  /// Opens the socket now, so an error (no permission, no netlink) is reported at start.
  public static func open() throws(SysfsError) -> Int32 {
    let fd = socket(
      AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 15 /* NETLINK_KOBJECT_UEVENT */)
    guard fd >= 0 else { throw SysfsError(operation: "open the uevent netlink socket", path: "netlink", errno: errno) }
    var address = NetlinkAddress(family: sa_family_t(AF_NETLINK), pad: 0, pid: 0, groups: 1)  // the kernel's group
    let bound = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        bind(fd, $0, socklen_t(MemoryLayout<NetlinkAddress>.size))
      }
    }
    guard bound == 0 else {
      let failure = errno
      close(fd)
      throw SysfsError(operation: "bind the uevent netlink socket", path: "netlink", errno: failure)
    }
    // The reader wakes every second to see whether it should stop (shutdown(2) does not wake a
    // netlink reader).
    var timeout = timeval(tv_sec: 1, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var size: Int32 = 1 << 20
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    return fd
  }

  public func events() -> AsyncStream<Uevent> {
    let (stream, continuation) = AsyncStream.makeStream(of: Uevent.self, bufferingPolicy: .bufferingNewest(1024))
    guard let fd = try? Self.open() else {
      continuation.finish()
      return stream
    }
    let state = ReaderState(fd: fd)
    continuation.onTermination = { _ in state.stop() }
    let thread = Thread {
      var buffer = [UInt8](repeating: 0, count: 16 << 10)
      while !state.stopped {
        let count = recv(fd, &buffer, buffer.count, 0)
        if count < 0 {
          // EAGAIN: the 1 s timeout; ENOBUFS: events were lost, the periodic rescan catches up.
          if errno == EINTR || errno == ENOBUFS || errno == EAGAIN || errno == EWOULDBLOCK { continue }
          break
        }
        if count == 0 { break }
        if let event = Uevent(datagram: Array(buffer[0..<count])) { continuation.yield(event) }
      }
      continuation.finish()
      state.close()
    }
    thread.name = "fpga-uevents"
    thread.start()
    return stream
  }

  /// `struct sockaddr_nl` of linux/netlink.h, which Glibc's module does not export.
  struct NetlinkAddress {
    var family: sa_family_t
    var pad: UInt16
    var pid: UInt32
    var groups: UInt32
  }

  /// The socket's lifetime: `stop` wakes the reader (shutdown), which then closes it.
  final class ReaderState: @unchecked Sendable {
    let fd: Int32
    private let lock = NSLock()
    private var isStopped = false
    private var closed = false

    init(fd: Int32) { self.fd = fd }

    var stopped: Bool { lock.withLock { isStopped } }

    func stop() { lock.withLock { isStopped = true } }

    func close() {
      lock.withLock {
        guard !closed else { return }
        closed = true
        _ = Glibc.close(fd)
      }
    }
  }
}
