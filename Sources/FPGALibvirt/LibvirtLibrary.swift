#if canImport(Glibc)
  import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// libvirt's C API, loaded at run time with `dlopen("libvirt.so.0")`: the agent builds without
/// libvirt's headers and starts on a host without libvirt; only `hypervisor: libvirt` needs the
/// library, and says so at start when it is missing. Each function is declared here by hand with
/// its C type (libvirt 9.0, `<libvirt/libvirt-*.h>`); every one of them exists since libvirt
/// 4.4 (`virDomainDetachDeviceAlias`), so a missing symbol means a library older than that.
///
/// Opaque libvirt objects (`virConnectPtr`, `virDomainPtr`) are `OpaquePointer`s.
struct LibvirtLibrary: @unchecked Sendable {
  typealias Connection = OpaquePointer
  typealias Domain = OpaquePointer

  // Callbacks libvirt calls (on its event loop thread).
  typealias CloseCallback = @convention(c) (Connection?, Int32, UnsafeMutableRawPointer?) -> Void
  typealias LifecycleCallback = @convention(c) (Connection?, Domain?, Int32, Int32, UnsafeMutableRawPointer?) -> Int32
  /// `DEVICE_REMOVED`, `DEVICE_ADDED` and `DEVICE_REMOVAL_FAILED` share this shape.
  typealias DeviceCallback =
    @convention(c) (Connection?, Domain?, UnsafePointer<CChar>?, UnsafeMutableRawPointer?) ->
    Void
  /// `METADATA_CHANGE`: the kind of metadata and, for an element, its namespace.
  typealias MetadataCallback =
    @convention(c) (Connection?, Domain?, Int32, UnsafePointer<CChar>?, UnsafeMutableRawPointer?) -> Void
  typealias FreeCallback = @convention(c) (UnsafeMutableRawPointer?) -> Void
  typealias ErrorHandler = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer?) -> Void

  let connectOpen: @convention(c) (UnsafePointer<CChar>?) -> Connection?
  let connectClose: @convention(c) (Connection?) -> Int32
  let connectIsAlive: @convention(c) (Connection?) -> Int32
  let connectSetKeepAlive: @convention(c) (Connection?, Int32, UInt32) -> Int32
  let connectRegisterCloseCallback:
    @convention(c) (Connection?, CloseCallback?, UnsafeMutableRawPointer?, FreeCallback?) -> Int32
  let connectUnregisterCloseCallback: @convention(c) (Connection?, CloseCallback?) -> Int32
  let connectListAllDomains:
    @convention(c) (Connection?, UnsafeMutablePointer<UnsafeMutablePointer<Domain?>?>?, UInt32) -> Int32
  /// The callback argument is `virConnectDomainEventGenericCallback`: any of the typed callbacks
  /// above, cast (`VIR_DOMAIN_EVENT_CALLBACK`).
  let connectDomainEventRegisterAny:
    @convention(c) (Connection?, Domain?, Int32, UnsafeRawPointer?, UnsafeMutableRawPointer?, FreeCallback?) -> Int32
  let connectDomainEventDeregisterAny: @convention(c) (Connection?, Int32) -> Int32
  let domainLookupByName: @convention(c) (Connection?, UnsafePointer<CChar>?) -> Domain?
  let domainGetName: @convention(c) (Domain?) -> UnsafePointer<CChar>?
  let domainGetState:
    @convention(c) (Domain?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?, UInt32) ->
      Int32
  /// The returned string is the caller's: `free` it.
  let domainGetXMLDesc: @convention(c) (Domain?, UInt32) -> UnsafeMutablePointer<CChar>?
  let domainIsPersistent: @convention(c) (Domain?) -> Int32
  let domainAttachDeviceFlags: @convention(c) (Domain?, UnsafePointer<CChar>?, UInt32) -> Int32
  let domainDetachDeviceAlias: @convention(c) (Domain?, UnsafePointer<CChar>?, UInt32) -> Int32
  let domainFree: @convention(c) (Domain?) -> Int32
  let eventRegisterDefaultImpl: @convention(c) () -> Int32
  let eventRunDefaultImpl: @convention(c) () -> Int32
  /// `virErrorPtr`: `{ int code; int domain; char *message; … }`, thread-local, owned by libvirt.
  let getLastError: @convention(c) () -> UnsafeMutableRawPointer?
  let setErrorFunc: @convention(c) (UnsafeMutableRawPointer?, ErrorHandler?) -> Void

  /// Why the library could not be loaded, with what to install.
  struct LoadError: Error, CustomStringConvertible {
    var description: String
  }

  static let soname = "libvirt.so.0"

  /// Loads the library once per process (later calls return the same table or the same error).
  static func shared() throws(LoadError) -> LibvirtLibrary {
    switch loaded {
    case .success(let library): return library
    case .failure(let error): throw error
    }
  }

  private static let loaded: Result<LibvirtLibrary, LoadError> = Result { () throws(LoadError) in try load() }

  private static func load() throws(LoadError) -> LibvirtLibrary {
    guard let handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL) else {
      let reason = dlerror().map { String(cString: $0) } ?? "not found"
      throw LoadError(
        description:
          "hypervisor: libvirt needs libvirt's client library \(soname), which cannot be loaded (\(reason)): install "
          + "libvirt0 / libvirt-clients (Debian, Ubuntu: apt-get install libvirt0 libvirt-clients; Fedora, RHEL: "
          + "dnf install libvirt-libs libvirt-client), or select hypervisor: qmp")
    }
    func symbol<T>(_ name: String, as type: T.Type) throws(LoadError) -> T {
      guard let address = dlsym(handle, name) else {
        throw LoadError(
          description:
            "\(soname) has no \(name): hypervisor: libvirt needs libvirt 4.4 or later (this agent is tested with 9.0)")
      }
      return unsafeBitCast(address, to: type)
    }
    let library = LibvirtLibrary(
      connectOpen: try symbol("virConnectOpen", as: (@convention(c) (UnsafePointer<CChar>?) -> Connection?).self),
      connectClose: try symbol("virConnectClose", as: (@convention(c) (Connection?) -> Int32).self),
      connectIsAlive: try symbol("virConnectIsAlive", as: (@convention(c) (Connection?) -> Int32).self),
      connectSetKeepAlive: try symbol(
        "virConnectSetKeepAlive", as: (@convention(c) (Connection?, Int32, UInt32) -> Int32).self),
      connectRegisterCloseCallback: try symbol(
        "virConnectRegisterCloseCallback",
        as: (@convention(c) (Connection?, CloseCallback?, UnsafeMutableRawPointer?, FreeCallback?) -> Int32).self),
      connectUnregisterCloseCallback: try symbol(
        "virConnectUnregisterCloseCallback", as: (@convention(c) (Connection?, CloseCallback?) -> Int32).self),
      connectListAllDomains: try symbol(
        "virConnectListAllDomains",
        as: (@convention(c) (Connection?, UnsafeMutablePointer<UnsafeMutablePointer<Domain?>?>?, UInt32) -> Int32)
          .self),
      connectDomainEventRegisterAny: try symbol(
        "virConnectDomainEventRegisterAny",
        as: (@convention(c) (
          Connection?, Domain?, Int32, UnsafeRawPointer?, UnsafeMutableRawPointer?, FreeCallback?
        ) -> Int32).self),
      connectDomainEventDeregisterAny: try symbol(
        "virConnectDomainEventDeregisterAny", as: (@convention(c) (Connection?, Int32) -> Int32).self),
      domainLookupByName: try symbol(
        "virDomainLookupByName", as: (@convention(c) (Connection?, UnsafePointer<CChar>?) -> Domain?).self),
      domainGetName: try symbol("virDomainGetName", as: (@convention(c) (Domain?) -> UnsafePointer<CChar>?).self),
      domainGetState: try symbol(
        "virDomainGetState",
        as: (@convention(c) (Domain?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?, UInt32) -> Int32)
          .self),
      domainGetXMLDesc: try symbol(
        "virDomainGetXMLDesc", as: (@convention(c) (Domain?, UInt32) -> UnsafeMutablePointer<CChar>?).self),
      domainIsPersistent: try symbol("virDomainIsPersistent", as: (@convention(c) (Domain?) -> Int32).self),
      domainAttachDeviceFlags: try symbol(
        "virDomainAttachDeviceFlags", as: (@convention(c) (Domain?, UnsafePointer<CChar>?, UInt32) -> Int32).self),
      domainDetachDeviceAlias: try symbol(
        "virDomainDetachDeviceAlias", as: (@convention(c) (Domain?, UnsafePointer<CChar>?, UInt32) -> Int32).self),
      domainFree: try symbol("virDomainFree", as: (@convention(c) (Domain?) -> Int32).self),
      eventRegisterDefaultImpl: try symbol("virEventRegisterDefaultImpl", as: (@convention(c) () -> Int32).self),
      eventRunDefaultImpl: try symbol("virEventRunDefaultImpl", as: (@convention(c) () -> Int32).self),
      getLastError: try symbol("virGetLastError", as: (@convention(c) () -> UnsafeMutableRawPointer?).self),
      setErrorFunc: try symbol(
        "virSetErrorFunc", as: (@convention(c) (UnsafeMutableRawPointer?, ErrorHandler?) -> Void).self))
    // libvirt's default handler prints every error to stderr; the agent reports them itself.
    library.setErrorFunc(nil) { _, _ in }
    return library
  }

  /// The calling thread's last libvirt error (`virGetLastError`): code, domain and message.
  func lastError() -> LibvirtError {
    guard let error = getLastError() else { return LibvirtError(code: 0, domain: 0, message: "unknown libvirt error") }
    let code = error.load(as: Int32.self)
    let domain = error.load(fromByteOffset: 4, as: Int32.self)
    let message = error.load(fromByteOffset: 8, as: UnsafePointer<CChar>?.self).map { String(cString: $0) }
    return LibvirtError(code: code, domain: domain, message: message ?? "libvirt error \(code)")
  }
}

/// A libvirt error as `virGetLastError` gives it.
struct LibvirtError: Error, Hashable, Sendable {
  var code: Int32
  var domain: Int32
  var message: String

  // virErrorNumber values the agent tells apart (<libvirt/virterror.h>).
  static let internalError: Int32 = 1
  static let noSupport: Int32 = 3
  static let noConnect: Int32 = 5
  static let invalidConnection: Int32 = 6
  static let invalidArgument: Int32 = 8
  static let operationFailed: Int32 = 9
  static let xmlError: Int32 = 27
  static let operationDenied: Int32 = 29
  static let xmlDetail: Int32 = 35
  static let systemError: Int32 = 38
  static let rpc: Int32 = 39
  static let noDomain: Int32 = 42
  static let authFailed: Int32 = 45
  static let operationInvalid: Int32 = 55
  static let configUnsupported: Int32 = 67
  static let operationTimeout: Int32 = 68
  static let argumentUnsupported: Int32 = 74
  static let operationAborted: Int32 = 78
  static let operationUnsupported: Int32 = 84
  static let agentUnresponsive: Int32 = 86
  static let resourceBusy: Int32 = 87
  static let accessDenied: Int32 = 88
  static let deviceMissing: Int32 = 99
}
