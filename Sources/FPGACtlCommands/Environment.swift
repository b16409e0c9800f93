#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

/// The value of an environment variable.
func environmentValue(_ name: String) -> String? {
  getenv(name).map { String(cString: $0) }
}
