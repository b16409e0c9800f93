#if canImport(Glibc)
  // Foundation, imported elsewhere in this module, loads CoreFoundation, whose headers declare
  // `timespec`, `tm`, `mode_t` and `stderr` again. Which module owns a C declaration then depends
  // on the build's file order, so this file imports both. Standard error and clock formatting are
  // here and nowhere else in the module (SystemdNotify.swift uses Glibc for its socket only).
  @preconcurrency public import CoreFoundation
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  public import Darwin
#endif
public import FPGACore

/// Every system call the daemon's wiring makes, in one place. Each failure carries its errno.
public enum SystemCalls {
  public struct Failure: Error, CustomStringConvertible {
    public var operation: String
    public var path: String
    public var errno: Int32

    public var description: String {
      "\(operation) \(path): \(String(cString: strerror(errno))) (errno \(errno))"
    }

    package init(operation: String, path: String, errno: Int32) {
      self.operation = operation
      self.path = path
      self.errno = errno
    }
  }

  public static func effectiveUserID() -> UInt32 { UInt32(geteuid()) }

  /// Files and sockets the process creates are private (umask 0077) unless chmod-ed after.
  public static func restrictFileCreationMask() { umask(0o077) }

  /// Refuses a directory that others may read or write (an existing state dir made by hand).
  public static func requirePrivateDirectory(_ path: String, key: String) throws(Failure) {
    var info = stat()
    guard stat(path, &info) == 0 else { throw Failure(operation: "stat", path: path, errno: errno) }
    let mode = info.st_mode & 0o777
    guard mode & 0o077 == 0 else {
      throw Failure(
        operation:
          "\(key) has mode \(String(mode, radix: 8)), open to other users: run `chmod 700 \(path)` (it holds the node's records and audit trail); refusing",
        path: path, errno: EPERM)
    }
  }

  /// Makes a Unix socket 0660, owned by `group` (a name or number; empty: the agent's group).
  public static func openSocketToGroup(_ path: String, group: String) throws(Failure) {
    if !group.isEmpty {
      var gid = gid_t(UInt32(group) ?? UInt32.max)
      if UInt32(group) == nil {
        guard let entry = getgrnam(group) else {
          throw Failure(operation: "find group \(group) for", path: path, errno: ENOENT)
        }
        gid = entry.pointee.gr_gid
      }
      guard chown(path, uid_t.max, gid) == 0 else { throw Failure(operation: "chown", path: path, errno: errno) }
    }
    guard chmod(path, 0o660) == 0 else { throw Failure(operation: "chmod 0660", path: path, errno: errno) }
  }

  /// Whether this process can read the file at `path`.
  public static func isReadableFile(_ path: String) -> Bool { access(path, R_OK) == 0 }

  /// Raises the soft open-file limit to the hard one (systemd starts services at 1,024);
  /// returns the soft limit in force afterwards.
  @discardableResult
  public static func raiseOpenFileLimit() -> Int {
    var limit = rlimit()
    guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
    if limit.rlim_cur < limit.rlim_max {
      var raised = limit
      raised.rlim_cur = limit.rlim_max
      if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
    }
    return limit.rlim_cur == rlim_t.max ? Int.max : Int(clamping: limit.rlim_cur)
  }

  /// `root/relative` with symlinks resolved, refused when it leads outside `root` (a planted
  /// link must not redirect the agent).
  public static func confinedPath(_ root: String, _ relative: String) throws(ConfigError) -> String {
    guard let realRoot = realpath(root, nil) else {
      throw ConfigError(problems: ["\(root) cannot be resolved: \(String(cString: strerror(errno)))"])
    }
    defer { free(realRoot) }
    let rootText = String(cString: realRoot)
    guard let resolved = realpath(root + "/" + relative, nil) else {
      throw ConfigError(problems: ["\(root)/\(relative) does not exist: \(String(cString: strerror(errno)))"])
    }
    defer { free(resolved) }
    let text = String(cString: resolved)
    guard text == rootText || text.hasPrefix(rootText == "/" ? "/" : rootText + "/") else {
      throw ConfigError(problems: ["\(root)/\(relative) leads outside \(root) (to \(text)): refused"])
    }
    return text
  }

  /// Ends the process at once, without cleanup, as a crash would (fault injection): status 86.
  public static func crash(_ reason: String) -> Never {
    let line = Array("fpga-agent: \(reason)\n".utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    _exit(86)
  }

  public static func environment(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
  }

  /// The whole environment, as a dictionary.
  public static func environment() -> [String: String] {
    var result: [String: String] = [:]
    var pointer = environ
    while let entry = pointer.pointee {
      let text = String(cString: entry)
      if let equals = text.firstIndex(of: "=") {
        result[String(text[..<equals])] = String(text[text.index(after: equals)...])
      }
      pointer += 1
    }
    return result
  }

  public static func hostname() -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
    return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
  }

  /// `mkdir -p` with `mode` for the directories it creates.
  public static func makeDirectories(_ path: String, mode: mode_t = 0o755) throws(Failure) {
    var current = path.hasPrefix("/") ? "" : "."
    for component in path.split(separator: "/") {
      current += "/" + component
      if mkdir(current, mode) != 0 && errno != EEXIST {
        throw Failure(operation: "mkdir", path: current, errno: errno)
      }
    }
    var info = stat()
    guard stat(path, &info) == 0 else { throw Failure(operation: "stat", path: path, errno: errno) }
    guard (info.st_mode & S_IFMT) == S_IFDIR else { throw Failure(operation: "mkdir", path: path, errno: ENOTDIR) }
  }

  /// The file's contents, nil when it does not exist.
  public static func readFile(_ path: String) throws(Failure) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0 {
      if errno == ENOENT { return nil }
      throw Failure(operation: "open", path: path, errno: errno)
    }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
      let count = read(fd, &buffer, buffer.count)
      if count < 0 {
        if errno == EINTR { continue }
        throw Failure(operation: "read", path: path, errno: errno)
      }
      if count == 0 { break }
      bytes += buffer[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
  }

  /// Writes `contents` to a temporary file beside `path`, syncs it, and renames it over `path`.
  public static func writeFileAtomically(_ path: String, _ contents: String, mode: mode_t = 0o644) throws(Failure) {
    let temporary = path + ".tmp"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
    guard fd >= 0 else { throw Failure(operation: "open", path: temporary, errno: errno) }
    var bytes = Array(contents.utf8)
    var written = 0
    while written < bytes.count {
      let count = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
      if count < 0 {
        if errno == EINTR { continue }
        let failure = Failure(operation: "write", path: temporary, errno: errno)
        close(fd)
        unlink(temporary)
        throw failure
      }
      written += count
    }
    bytes.removeAll()
    guard fsync(fd) == 0 else {
      let failure = Failure(operation: "fsync", path: temporary, errno: errno)
      close(fd)
      throw failure
    }
    close(fd)
    guard rename(temporary, path) == 0 else { throw Failure(operation: "rename", path: path, errno: errno) }
  }

  /// Before binding a Unix socket: removes a stale socket file at `path` (nobody accepts on it);
  /// refuses when another process serves there or when the path is not a socket.
  public static func prepareUnixSocketPath(_ path: String) throws(Failure) {
    var info = stat()
    if lstat(path, &info) != 0 {
      if errno == ENOENT { return }
      throw Failure(operation: "lstat", path: path, errno: errno)
    }
    guard (info.st_mode & S_IFMT) == S_IFSOCK else {
      throw Failure(operation: "bind (path exists and is not a socket)", path: path, errno: EEXIST)
    }
    if unixSocketAcceptsConnections(path) {
      throw Failure(operation: "bind (another process is serving there)", path: path, errno: EADDRINUSE)
    }
    unlink(path)
  }

  /// Removes the socket file after shutdown.
  public static func removeSocket(_ path: String) {
    var info = stat()
    if lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
  }

  package static func unixSocketAcceptsConnections(_ path: String) -> Bool {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
      for (index, byte) in bytes.enumerated() { raw[index] = byte }
    }
    let result = withUnsafePointer(to: &address) {
      $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
        connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
      }
    }
    return result == 0
  }

  /// Makes standard output line-buffered, so what was printed survives a kill. Standard error
  /// needs nothing: `writeStandardError` writes each text with write(2).
  public static func lineBufferOutput() {
    setvbuf(stdout, nil, _IOLBF, 0)
  }
}

/// The real wall clock (CLOCK_REALTIME).
public struct SystemWallClock: WallClock {
  public init() {}

  public func now() -> WallTime {
    var spec = timespec()
    clock_gettime(CLOCK_REALTIME, &spec)
    return WallTime(seconds: Int64(spec.tv_sec), nanoseconds: Int32(spec.tv_nsec))
  }
}

extension SystemCalls {
  /// Writes `text` to file descriptor 2 with as few write(2) calls as the kernel allows (one for
  /// a log line), so lines from concurrent tasks do not interleave. Bypasses stdio's `stderr`.
  public static func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)
    var offset = 0
    while offset < bytes.count {
      let written = bytes.withUnsafeMutableBytes { raw in
        write(STDERR_FILENO, raw.baseAddress! + offset, raw.count - offset)
      }
      if written > 0 {
        offset += written
      } else if written < 0 && errno == EINTR {
        continue
      } else {
        return
      }
    }
  }

  /// `time` in UTC with milliseconds, RFC 3339 (`2026-11-30T19:00:48.123Z`).
  public static func rfc3339(_ time: WallTime) -> String {
    var parts = tm()
    var seconds = time_t(time.seconds)
    gmtime_r(&seconds, &parts)
    var buffer = [CChar](repeating: 0, count: 32)
    strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S", &parts)
    let millis = Int(time.nanoseconds / 1_000_000)
    let padded = millis < 10 ? "00\(millis)" : millis < 100 ? "0\(millis)" : "\(millis)"
    return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) } + "." + padded + "Z"
  }
}
