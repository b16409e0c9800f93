/// Strict checks of the names that clients send. Each returns the value (trimmed of nothing:
/// input is taken as it is) or throws INVALID_ARGUMENT naming the field and the rule.
public enum Validate {
  /// An owner: 1-128 printable ASCII characters.
  public static func owner(_ text: String) throws(AgentError) -> String {
    guard !text.isEmpty else {
      throw AgentError(.invalidArgument, "owner is required: say who the VF is for (1-128 printable ASCII characters)")
    }
    try printable(text, field: "owner", limit: 128)
    return text
  }

  /// An idempotency key: empty (none) or 1-128 printable ASCII characters.
  public static func idempotencyKey(_ text: String) throws(AgentError) -> String? {
    guard !text.isEmpty else { return nil }
    try printable(text, field: "idempotency_key", limit: 128)
    return text
  }

  /// A VM name: 1-64 characters of `[A-Za-z0-9._-]`, not starting with a dot or a dash, so it is
  /// safe as a file name in a socket directory. Empty means none.
  public static func vmName(_ text: String, field: String = "vm") throws(AgentError) -> String? {
    guard !text.isEmpty else { return nil }
    let allowed = text.utf8.allSatisfy { byte in
      switch byte {
      case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
        UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
        true
      default: false
      }
    }
    guard allowed, text.utf8.count <= 64, text.first != ".", text.first != "-" else {
      throw AgentError(
        .invalidArgument,
        "\(field) \(quoted(text)) is not a valid VM name: use 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -"
      )
    }
    return text
  }

  /// An object id the agent made (`alloc-…`, `op-…`): 1-64 characters of `[a-z0-9-]`.
  public static func id(_ text: String, field: String, prefix: String) throws(AgentError) -> String {
    guard !text.isEmpty else {
      throw AgentError(.invalidArgument, "\(field) is required")
    }
    let allowed = text.utf8.allSatisfy { byte in
      (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte)
        || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) || byte == UInt8(ascii: "-")
    }
    guard allowed, text.utf8.count <= 64, text.hasPrefix(prefix) else {
      throw AgentError(
        .invalidArgument,
        "\(field) \(quoted(text)) is not an id of this agent: expected \(prefix)… (lower-case letters, digits, dashes)"
      )
    }
    return text
  }

  /// A card id: `card-DDDD:BB`.
  public static func cardID(_ text: String, field: String = "card_id") throws(AgentError) -> String? {
    guard !text.isEmpty else { return nil }
    guard text.hasPrefix("card-"), PCIAddress(text.dropFirst(5) + ":00.0") != nil else {
      throw AgentError(
        .invalidArgument, "\(field) \(quoted(text)) is not a card id: expected card-DDDD:BB, e.g. card-0000:3b")
    }
    return text
  }

  private static func printable(_ text: String, field: String, limit: Int) throws(AgentError) {
    guard text.utf8.count <= limit else {
      throw AgentError(.invalidArgument, "\(field) is \(text.utf8.count) bytes long; the limit is \(limit)")
    }
    guard text.utf8.allSatisfy({ (0x20...0x7e).contains($0) }) else {
      throw AgentError(
        .invalidArgument, "\(field) \(quoted(text)) has characters outside printable ASCII (0x20-0x7e)")
    }
  }
}
