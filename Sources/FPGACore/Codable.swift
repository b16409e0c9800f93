/// How the records the agent keeps across restarts are encoded (by the state store). Every
/// type here is a plain value; the store chooses the format.

extension PCIAddress: Codable {
  public init(from decoder: any Decoder) throws {
    let container = try decoder.singleValueContainer()
    let text = try container.decode(String.self)
    guard let address = PCIAddress(text) else {
      throw DecodingError.dataCorruptedError(in: container, debugDescription: "not a PCI address: \(text)")
    }
    self = address
  }

  public func encode(to encoder: any Encoder) throws {
    var container = encoder.singleValueContainer()
    try container.encode(description)
  }
}
