/// A small XML reader for what libvirt writes (domain descriptions): elements, attributes, text,
/// the five predefined entities and numeric character references; comments, processing
/// instructions, CDATA and a DOCTYPE are skipped. It refuses what is not well-formed (an
/// unclosed or mismatched tag, an unquoted attribute) rather than guessing. It keeps the agent
/// free of libxml2 (FoundationXML) so that it starts on hosts without it.
struct XMLNode: Hashable, Sendable {
  var name: String
  var attributes: [String: String]
  var children: [XMLNode]
  var text: String

  init(name: String, attributes: [String: String] = [:], children: [XMLNode] = [], text: String = "") {
    self.name = name
    self.attributes = attributes
    self.children = children
    self.text = text
  }

  subscript(attribute: String) -> String? { attributes[attribute] }

  /// The first child element named `name`.
  func child(_ name: String) -> XMLNode? { children.first { $0.name == name } }

  /// Every child element named `name`.
  func children(_ name: String) -> [XMLNode] { children.filter { $0.name == name } }

  struct ParseError: Error, Hashable, CustomStringConvertible {
    var offset: Int
    var reason: String
    var description: String { "not well-formed XML at byte \(offset): \(reason)" }
  }

  /// Parses a document; returns its root element.
  static func parse(_ text: String) throws(ParseError) -> XMLNode {
    var parser = XMLTreeParser(bytes: Array(text.utf8))
    return try parser.document()
  }
}

private struct XMLTreeParser {
  let bytes: [UInt8]
  var index = 0

  init(bytes: [UInt8]) { self.bytes = bytes }

  mutating func document() throws(XMLNode.ParseError) -> XMLNode {
    try skipMisc()
    guard peek == UInt8(ascii: "<") else { throw fail("no root element") }
    let root = try element()
    try skipMisc()
    guard index == bytes.count else { throw fail("content after the root element") }
    return root
  }

  private var peek: UInt8? { index < bytes.count ? bytes[index] : nil }

  private func fail(_ reason: String) -> XMLNode.ParseError { XMLNode.ParseError(offset: index, reason: reason) }

  private func starts(with prefix: String) -> Bool {
    let utf8 = Array(prefix.utf8)
    return index + utf8.count <= bytes.count && Array(bytes[index..<index + utf8.count]) == utf8
  }

  private mutating func skip(past terminator: String) throws(XMLNode.ParseError) {
    let utf8 = Array(terminator.utf8)
    while index + utf8.count <= bytes.count {
      if Array(bytes[index..<index + utf8.count]) == utf8 {
        index += utf8.count
        return
      }
      index += 1
    }
    throw fail("unterminated construct (no \(terminator))")
  }

  private mutating func skipSpace() {
    while let byte = peek, byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D { index += 1 }
  }

  /// Whitespace, comments, processing instructions and a DOCTYPE outside the root element.
  private mutating func skipMisc() throws(XMLNode.ParseError) {
    while true {
      skipSpace()
      if starts(with: "<?") {
        try skip(past: "?>")
      } else if starts(with: "<!--") {
        try skip(past: "-->")
      } else if starts(with: "<!DOCTYPE") {
        try skip(past: ">")
      } else {
        return
      }
    }
  }

  private mutating func name() throws(XMLNode.ParseError) -> String {
    let start = index
    while let byte = peek,
      !(byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D || byte == UInt8(ascii: "/")
        || byte == UInt8(ascii: ">") || byte == UInt8(ascii: "=") || byte == UInt8(ascii: "<"))
    {
      index += 1
    }
    guard index > start else { throw fail("a name was expected") }
    return String(decoding: bytes[start..<index], as: UTF8.self)
  }

  private mutating func element() throws(XMLNode.ParseError) -> XMLNode {
    index += 1  // "<"
    var node = XMLNode(name: try name())
    while true {
      skipSpace()
      guard let byte = peek else { throw fail("unterminated start tag <\(node.name)>") }
      if byte == UInt8(ascii: "/") {
        index += 1
        guard peek == UInt8(ascii: ">") else { throw fail("'/' not followed by '>' in <\(node.name)>") }
        index += 1
        return node
      }
      if byte == UInt8(ascii: ">") {
        index += 1
        break
      }
      let attribute = try name()
      skipSpace()
      guard peek == UInt8(ascii: "=") else { throw fail("attribute \(attribute) of <\(node.name)> has no value") }
      index += 1
      skipSpace()
      guard let quote = peek, quote == UInt8(ascii: "'") || quote == UInt8(ascii: "\"") else {
        throw fail("attribute \(attribute) of <\(node.name)> is not quoted")
      }
      index += 1
      let start = index
      while let byte = peek, byte != quote {
        guard byte != UInt8(ascii: "<") else { throw fail("'<' in attribute \(attribute)") }
        index += 1
      }
      guard peek == quote else { throw fail("unterminated attribute \(attribute)") }
      let value = try unescape(bytes[start..<index])
      index += 1
      guard node.attributes.updateValue(value, forKey: attribute) == nil else {
        throw fail("attribute \(attribute) repeated in <\(node.name)>")
      }
    }
    // Content: text, children, until the matching end tag.
    var text: [UInt8] = []
    while true {
      guard let byte = peek else { throw fail("<\(node.name)> is not closed") }
      if byte != UInt8(ascii: "<") {
        text.append(byte)
        index += 1
      } else if starts(with: "</") {
        index += 2
        let closing = try name()
        guard closing == node.name else { throw fail("</\(closing)> closes <\(node.name)>") }
        skipSpace()
        guard peek == UInt8(ascii: ">") else { throw fail("unterminated end tag </\(closing)>") }
        index += 1
        node.text = try unescape(text[...]).trimmingXMLSpace()
        return node
      } else if starts(with: "<!--") {
        try skip(past: "-->")
      } else if starts(with: "<![CDATA[") {
        index += 9
        let start = index
        try skip(past: "]]>")
        text += Array(bytes[start..<index - 3]).flatMap { escapeByte($0) }
      } else if starts(with: "<?") {
        try skip(past: "?>")
      } else {
        node.children.append(try element())
      }
    }
  }

  /// CDATA text is literal: escape it again so that `unescape` of the whole text restores it.
  private func escapeByte(_ byte: UInt8) -> [UInt8] {
    byte == UInt8(ascii: "&") ? Array("&amp;".utf8) : [byte]
  }

  private func unescape(_ raw: ArraySlice<UInt8>) throws(XMLNode.ParseError) -> String {
    guard raw.contains(UInt8(ascii: "&")) else { return String(decoding: raw, as: UTF8.self) }
    var out: [UInt8] = []
    var position = raw.startIndex
    while position < raw.endIndex {
      let byte = raw[position]
      guard byte == UInt8(ascii: "&") else {
        out.append(byte)
        position += 1
        continue
      }
      guard let semicolon = raw[position...].firstIndex(of: UInt8(ascii: ";")) else {
        throw fail("'&' without ';'")
      }
      let entity = String(decoding: raw[(position + 1)..<semicolon], as: UTF8.self)
      switch entity {
      case "amp": out.append(UInt8(ascii: "&"))
      case "lt": out.append(UInt8(ascii: "<"))
      case "gt": out.append(UInt8(ascii: ">"))
      case "quot": out.append(UInt8(ascii: "\""))
      case "apos": out.append(UInt8(ascii: "'"))
      default:
        let scalar: UInt32? =
          entity.hasPrefix("#x")
          ? UInt32(entity.dropFirst(2), radix: 16) : entity.hasPrefix("#") ? UInt32(entity.dropFirst()) : nil
        guard let scalar, let character = Unicode.Scalar(scalar) else { throw fail("unknown entity &\(entity);") }
        out += Array(String(Character(character)).utf8)
      }
      position = semicolon + 1
    }
    return String(decoding: out, as: UTF8.self)
  }
}

extension String {
  fileprivate func trimmingXMLSpace() -> String {
    let space: Set<Character> = [" ", "\t", "\n", "\r"]
    guard let first = firstIndex(where: { !space.contains($0) }), let last = lastIndex(where: { !space.contains($0) })
    else { return "" }
    return String(self[first...last])
  }
}

/// Escapes text for an XML attribute value in single or double quotes.
func xmlEscaped(_ text: String) -> String {
  var out = ""
  for character in text {
    switch character {
    case "&": out += "&amp;"
    case "<": out += "&lt;"
    case ">": out += "&gt;"
    case "'": out += "&apos;"
    case "\"": out += "&quot;"
    default: out.append(character)
    }
  }
  return out
}
