import FPGACore
import Foundation

#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// libvirt's QEMU-specific API (`libvirt-qemu.so.0`, `<libvirt/libvirt-qemu.h>`), loaded only
/// when the operator opts in to VFIO pause through libvirt (`libvirt.qemu_monitor_pause`): one
/// function, `virDomainQemuMonitorCommand`, which hands a QMP command to the domain's monitor
/// (libvirt keeps owning it) and returns QEMU's reply. libvirt marks every domain it is used on
/// as tainted (`custom-monitor`, logged once per domain and shown by `virsh dominfo`'s log), as
/// it cannot know what the command changed.
struct LibvirtQEMULibrary: @unchecked Sendable {
  typealias MonitorCommand =
    @convention(c) (
      OpaquePointer?, UnsafePointer<CChar>?, UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?, UInt32
    ) -> Int32

  let monitorCommand: MonitorCommand

  static let soname = "libvirt-qemu.so.0"

  static func shared() throws(LibvirtLibrary.LoadError) -> LibvirtQEMULibrary {
    switch loaded {
    case .success(let library): return library
    case .failure(let error): throw error
    }
  }

  private static let loaded: Result<LibvirtQEMULibrary, LibvirtLibrary.LoadError> = Result {
    () throws(LibvirtLibrary.LoadError) in
    guard let handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL) else {
      let reason = dlerror().map { String(cString: $0) } ?? "not found"
      throw LibvirtLibrary.LoadError(
        description:
          "libvirt.qemu_monitor_pause needs libvirt's QEMU library \(soname), which cannot be loaded (\(reason)): "
          + "install libvirt0 (Debian, Ubuntu) or libvirt-libs (Fedora, RHEL), or turn libvirt.qemu_monitor_pause off")
    }
    guard let address = dlsym(handle, "virDomainQemuMonitorCommand") else {
      throw LibvirtLibrary.LoadError(description: "\(soname) has no virDomainQemuMonitorCommand")
    }
    return LibvirtQEMULibrary(monitorCommand: unsafeBitCast(address, to: MonitorCommand.self))
  }

  /// Sends one QMP command (JSON text) to `domain`'s monitor: QEMU's reply, or libvirt's error.
  func command(_ library: LibvirtLibrary, _ domain: OpaquePointer, _ json: String) -> Result<String, LibvirtFailure> {
    var reply: UnsafeMutablePointer<CChar>?
    // Flags 0: a QMP command (VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP would be 1).
    guard monitorCommand(domain, json, &reply, 0) == 0, let reply else {
      return .failure(.libvirt(library.lastError()))
    }
    defer { free(reply) }
    return .success(String(cString: reply))
  }
}

/// QMP through libvirt's monitor passthrough: the commands the agent sends and what it reads
/// from QEMU's replies (libvirt returns the reply whole, `{"return": …}` or `{"error": …}`,
/// and reports only its own failures as errors).
enum MonitorQMP {
  /// QEMU refused the command: its error class and text.
  struct Refusal: Error, Hashable {
    var errorClass: String
    var message: String
  }

  /// A reply libvirt returned that is not a QMP reply.
  struct Unreadable: Error, Hashable {
    var reply: String
  }

  /// `{"execute": NAME, "arguments": {"id": ID}}` (no arguments when `id` is nil).
  static func command(_ name: String, id: String? = nil) -> String {
    var object: [String: Any] = ["execute": name]
    if let id { object["arguments"] = ["id": id] }
    // A dictionary of strings always serializes.
    let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data()
    return String(decoding: data, as: UTF8.self)
  }

  /// The `return` value of a reply, or QEMU's refusal.
  static func result(_ reply: String) throws -> Any {
    guard let object = try? JSONSerialization.jsonObject(with: Data(reply.utf8)) as? [String: Any] else {
      throw Unreadable(reply: String(reply.prefix(200)))
    }
    if let error = object["error"] as? [String: Any] {
      throw Refusal(
        errorClass: error["class"] as? String ?? "GenericError", message: error["desc"] as? String ?? "no description")
    }
    guard let value = object["return"] else { throw Unreadable(reply: String(reply.prefix(200))) }
    return value
  }

  /// The command names of a `query-commands` reply.
  static func commandNames(_ reply: String) throws -> Set<String> {
    guard let list = try result(reply) as? [[String: Any]] else { throw Unreadable(reply: String(reply.prefix(200))) }
    return Set(list.compactMap { $0["name"] as? String })
  }
}

/// Which domains of the connection the agent serves (`libvirt.domains`,
/// `libvirt.metadata_namespace`): by default all. A domain is served when its name matches one of
/// the patterns (shell globs, `fnmatch`) and, when a namespace is set, its `<metadata>` holds an
/// element in that namespace (`virsh metadata DOMAIN URI --key fpga --set '<agent/>'`).
struct DomainFilter: Hashable, Sendable {
  var patterns: [String] = []
  var metadataNamespace: String?

  var isEmpty: Bool { patterns.isEmpty && metadataNamespace == nil }

  func admits(name: String, metadataNamespaces: Set<String>?) -> Bool {
    if !patterns.isEmpty, !patterns.contains(where: { fnmatch($0, name, 0) == 0 }) { return false }
    guard let metadataNamespace else { return true }
    return metadataNamespaces?.contains(metadataNamespace) ?? false
  }

  /// What the operator configured, for messages.
  var description: String {
    var parts: [String] = []
    if !patterns.isEmpty { parts.append("libvirt.domains: " + patterns.joined(separator: ", ")) }
    if let metadataNamespace { parts.append("libvirt.metadata_namespace: " + metadataNamespace) }
    return parts.joined(separator: "; ")
  }
}
