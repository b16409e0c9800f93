#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif
import FPGACore

/// Real sysfs rooted at `root` (default `/sys`), device nodes under `devRoot` (default `/dev`).
/// Every access resolves symlinks and refuses any path that ends up outside the root.
public struct LinuxSysfs: Sysfs {
  public let root: String
  public let devRoot: String
  /// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`); tests name a file.
  public let bootIDPath: String
  private let resolvedRoot: String

  public init(
    root: String = "/sys", devRoot: String = "/dev", bootIDPath: String = "/proc/sys/kernel/random/boot_id"
  ) throws(SysfsError) {
    self.root = root
    self.devRoot = devRoot
    self.bootIDPath = bootIDPath
    guard let resolved = Self.realpath(root) else {
      throw SysfsError(operation: "open sysfs root", path: root, errno: errno)
    }
    resolvedRoot = resolved
  }

  public func read(_ path: SysfsPath) throws(SysfsError) -> String {
    let full = try confined(path)
    let fd = open(full, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SysfsError(operation: "open", path: full, errno: errno) }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
      let count = Glibc.read(fd, &buffer, buffer.count)
      if count < 0 {
        if errno == EINTR { continue }
        throw SysfsError(operation: "read", path: full, errno: errno)
      }
      if count == 0 { break }
      bytes += buffer[0..<count]
    }
    var text = String(decoding: bytes, as: UTF8.self)
    while text.hasSuffix("\n") { text.removeLast() }
    return text
  }

  /// The boot id, or nil when the file cannot be read or is not a plain id (at most 64
  /// characters of hex digits and dashes).
  public func bootID() -> String? {
    let fd = open(bootIDPath, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 128)
    let count = Glibc.read(fd, &buffer, buffer.count)
    guard count > 0 else { return nil }
    return BootID.validated(String(decoding: buffer[0..<count], as: UTF8.self))
  }

  public func readBytes(_ path: SysfsPath, count: Int) throws(SysfsError) -> [UInt8] {
    let full = try confined(path)
    let fd = open(full, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SysfsError(operation: "open", path: full, errno: errno) }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: count)
    while true {
      let read = Glibc.pread(fd, &buffer, count, 0)
      if read < 0 {
        if errno == EINTR { continue }
        throw SysfsError(operation: "read", path: full, errno: errno)
      }
      return Array(buffer[0..<read])
    }
  }

  public func write(_ path: SysfsPath, _ value: String) throws(SysfsError) {
    let full = try confined(path)
    let fd = open(full, O_WRONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SysfsError(operation: "open", path: full, errno: errno) }
    defer { close(fd) }
    let bytes = Array(value.utf8)
    while true {
      let count = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
      if count < 0 {
        if errno == EINTR { continue }
        throw SysfsError(operation: "write \"\(value)\" to", path: full, errno: errno)
      }
      return
    }
  }

  public func linkName(_ path: SysfsPath) throws(SysfsError) -> String? {
    try linkComponents(path)?.last
  }

  public func linkComponents(_ path: SysfsPath) throws(SysfsError) -> [String]? {
    let full = root + "/" + path.description
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = readlink(full, &buffer, buffer.count - 1)
    if count < 0 {
      if errno == ENOENT || errno == EINVAL { return nil }
      throw SysfsError(operation: "readlink", path: full, errno: errno)
    }
    // The target must resolve inside the root too.
    _ = try confined(path)
    let target = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return target.split(separator: "/").map(String.init)
  }

  public func list(_ path: SysfsPath) throws(SysfsError) -> [String] {
    let full = root + "/" + path.description
    guard let directory = opendir(full) else {
      if errno == ENOENT { return [] }
      throw SysfsError(operation: "opendir", path: full, errno: errno)
    }
    defer { closedir(directory) }
    _ = try confined(path)
    var names: [String] = []
    while let entry = readdir(directory) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
        String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
      }
      if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
  }

  public func exists(_ path: SysfsPath) -> Bool {
    (try? confined(path)) != nil
  }

  public func deviceNodeExists(_ relative: String) -> Bool {
    guard !relative.contains(".."), !relative.hasPrefix("/") else { return false }
    var info = stat()
    return stat(devRoot + "/" + relative, &info) == 0
  }

  /// The real path of `path`; throws ENOENT when missing and EXDEV when it leaves the root.
  func confined(_ path: SysfsPath) throws(SysfsError) -> String {
    for component in path.components
    where component.isEmpty || component == "." || component == ".." || component.contains("/") {
      throw SysfsError(operation: "refuse path component \"\(component)\" in", path: path.description, errno: EINVAL)
    }
    let full = root + "/" + path.description
    guard let resolved = Self.realpath(full) else {
      throw SysfsError(operation: "resolve", path: full, errno: errno)
    }
    guard resolved == resolvedRoot || resolved.hasPrefix(resolvedRoot == "/" ? "/" : resolvedRoot + "/") else {
      throw SysfsError(operation: "refuse (resolves outside the sysfs root to \(resolved))", path: full, errno: EXDEV)
    }
    return resolved
  }

  static func realpath(_ path: String) -> String? {
    guard let resolved = Glibc.realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
  }
}
