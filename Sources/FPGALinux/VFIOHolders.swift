#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// Finds the processes holding a VFIO group open (a VMM using the VF), by reading
/// `/proc/<pid>/fd/*` links, so the agent never rebinds or unbinds a VF in use.
public protocol VFIOHolderFinding: Sendable {
  /// The processes (as "name (pid N)") that have `/dev/vfio/<group>` open.
  func holders(ofGroup group: Int) -> [String]
}

/// `/proc` under a configurable root; device paths are matched under `devRoot`.
public struct ProcVFIOHolders: VFIOHolderFinding {
  public let procRoot: String
  public let devRoot: String

  public init(procRoot: String = "/proc", devRoot: String = "/dev") {
    self.procRoot = procRoot
    self.devRoot = devRoot
  }

  public func holders(ofGroup group: Int) -> [String] {
    let wanted = devRoot + "/vfio/\(group)"
    var found: [String] = []
    for pid in entries(procRoot) where pid.allSatisfy(\.isNumber) {
      let fdDir = procRoot + "/" + pid + "/fd"
      for fd in entries(fdDir) where target(fdDir + "/" + fd) == wanted {
        let name = (try? String(contentsOfProcFile: procRoot + "/" + pid + "/comm")) ?? "?"
        found.append("\(name) (pid \(pid))")
        break
      }
    }
    return found
  }

  private func entries(_ path: String) -> [String] {
    guard let directory = opendir(path) else { return [] }
    defer { closedir(directory) }
    var names: [String] = []
    while let entry = readdir(directory) {
      let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
      if name != "." && name != ".." { names.append(name) }
    }
    return names
  }

  private func target(_ link: String) -> String? {
    var buffer = [UInt8](repeating: 0, count: 4096)
    let count = buffer.withUnsafeMutableBufferPointer { raw in
      raw.withMemoryRebound(to: CChar.self) { readlink(link, $0.baseAddress!, 4095) }
    }
    guard count > 0 else { return nil }
    return String(decoding: buffer[0..<count], as: UTF8.self)
  }
}

extension String {
  init(contentsOfProcFile path: String) throws {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw SysfsError(operation: "open", path: path, errno: errno) }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 256)
    let count = read(fd, &buffer, buffer.count)
    guard count >= 0 else { throw SysfsError(operation: "read", path: path, errno: errno) }
    self = String(decoding: buffer[0..<count], as: UTF8.self).trimmingNewlines()
  }

  func trimmingNewlines() -> String {
    var text = self
    while text.hasSuffix("\n") { text.removeLast() }
    return text
  }
}
