public import Logging

/// Writes one line per log record to standard error: `text` (time, level, message, key=value
/// metadata) or `json` (one object per line, for log collectors).
public struct AgentLogHandler: LogHandler {
  public enum Format: String, Sendable, CaseIterable { case text, json }

  public var metadata: Logger.Metadata = [:]
  public var logLevel: Logger.Level
  public var metadataProvider: Logger.MetadataProvider?
  package let label: String
  package let format: Format

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
    SystemCalls.writeStandardError(line + "\n")
  }

  package static func textValue(_ value: Logger.MetadataValue) -> String {
    let text = "\(value)"
    return text.contains(" ") || text.isEmpty ? json(text) : text
  }

  /// A JSON string literal.
  package static func json(_ text: String) -> String {
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
  package static func timestamp() -> String { SystemCalls.rfc3339(SystemWallClock().now()) }
}
