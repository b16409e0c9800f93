#if canImport(Glibc)
  // `timespec` is declared by Glibc and again by CoreFoundation's headers; with
  // MemberImportVisibility the file must import whichever one the compiler picks.
  @preconcurrency import CoreFoundation
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif
public import Logging

/// Writes one line per log record to standard error: `text` (time, level, message, key=value
/// metadata) or `json` (one object per line, for log collectors).
public struct AgentLogHandler: LogHandler {
  public enum Format: String, Sendable, CaseIterable { case text, json }

  public var metadata: Logger.Metadata = [:]
  public var logLevel: Logger.Level
  public var metadataProvider: Logger.MetadataProvider?
  let label: String
  let format: Format

  public init(label: String, level: Logger.Level, format: Format) {
    self.label = label
    self.logLevel = level
    self.format = format
  }

  public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { metadata[key] }
    set { metadata[key] = newValue }
  }

  public func log(event: LogEvent) {
    var merged = metadata
    if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
    if let extra = event.metadata { merged.merge(extra) { _, new in new } }
    let line: String
    switch format {
    case .text:
      let fields = merged.sorted { $0.key < $1.key }.map { "\($0.key)=\(Self.textValue($0.value))" }
      line = ([Self.timestamp(), event.level.rawValue, "\(label):", "\(event.message)"] + fields)
        .joined(separator: " ")
    case .json:
      var object = [
        "\"ts\":" + Self.json(Self.timestamp()), "\"level\":" + Self.json(event.level.rawValue),
        "\"logger\":" + Self.json(label), "\"msg\":" + Self.json("\(event.message)"),
      ]
      for (key, value) in merged.sorted(by: { $0.key < $1.key }) {
        object.append(Self.json(key) + ":" + Self.json("\(value)"))
      }
      line = "{" + object.joined(separator: ",") + "}"
    }
    fputs(line + "\n", stderr)
  }

  static func textValue(_ value: Logger.MetadataValue) -> String {
    let text = "\(value)"
    return text.contains(" ") || text.isEmpty ? json(text) : text
  }

  /// A JSON string literal.
  static func json(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
      switch scalar {
      case "\"": out += "\\\""
      case "\\": out += "\\\\"
      case "\n": out += "\\n"
      case "\r": out += "\\r"
      case "\t": out += "\\t"
      case _ where scalar.value < 0x20:
        out +=
          "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count)
          + String(scalar.value, radix: 16)
      default: out.unicodeScalars.append(scalar)
      }
    }
    return out + "\""
  }

  /// UTC time with milliseconds, RFC 3339.
  static func timestamp() -> String {
    var spec = timespec()
    clock_gettime(CLOCK_REALTIME, &spec)
    var parts = tm()
    var seconds = spec.tv_sec
    gmtime_r(&seconds, &parts)
    var buffer = [CChar](repeating: 0, count: 32)
    strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S", &parts)
    let millis = Int(spec.tv_nsec / 1_000_000)
    let padded = millis < 10 ? "00\(millis)" : millis < 100 ? "0\(millis)" : "\(millis)"
    return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) } + "." + padded + "Z"
  }
}
