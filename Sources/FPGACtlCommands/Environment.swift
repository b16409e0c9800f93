#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif

func getenvString(_ name: String) -> String? {
  getenv(name).map { String(cString: $0) }
}

func exitProcess(_ code: Int32) -> Never { exit(code) }
