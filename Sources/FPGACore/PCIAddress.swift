/// A PCI function address ("BDF"): domain, bus, device, function.
///
/// The only accepted text form is `DDDD:BB:DD.F` in hex (e.g. `0000:3b:00.4`): four domain
/// digits, two bus digits, two device digits (at most 0x1f), one function digit (at most 7), in
/// lower case as sysfs spells them.
/// Anything else is refused, so a value of this type is always safe to put in a sysfs path.
public struct PCIAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
  public let domain: UInt16
  public let bus: UInt8
  public let device: UInt8
  public let function: UInt8

  public init?(domain: UInt16, bus: UInt8, device: UInt8, function: UInt8) {
    guard device < 32, function < 8 else { return nil }
    self.domain = domain
    self.bus = bus
    self.device = device
    self.function = function
  }

  /// The address whose 16-bit routing id (bus << 8 | device << 3 | function) is `routingID`.
  public init?(domain: UInt16, routingID: Int) {
    guard (0...0xffff).contains(routingID) else { return nil }
    self.init(
      domain: domain, bus: UInt8(routingID >> 8), device: UInt8((routingID >> 3) & 0x1f),
      function: UInt8(routingID & 0x7))
  }

  /// Parses the strict form `DDDD:BB:DD.F`; returns nil for anything else.
  public init?(_ text: some StringProtocol) {
    let bytes = Array(text.utf8)
    guard bytes.count == 12, bytes[4] == UInt8(ascii: ":"), bytes[7] == UInt8(ascii: ":"),
      bytes[10] == UInt8(ascii: ".")
    else { return nil }
    func hex(_ range: Range<Int>) -> Int? {
      var value = 0
      for byte in bytes[range] {
        guard let digit = hexDigit(byte) else { return nil }
        value = value << 4 | digit
      }
      return value
    }
    guard let domain = hex(0..<4), let bus = hex(5..<7), let device = hex(8..<10),
      let function = hex(11..<12)
    else { return nil }
    self.init(
      domain: UInt16(domain), bus: UInt8(bus), device: UInt8(truncatingIfNeeded: device),
      function: UInt8(function))
    guard device < 32 else { return nil }
  }

  /// The 16-bit routing id used by SR-IOV offset/stride arithmetic.
  public var routingID: Int { Int(bus) << 8 | Int(device) << 3 | Int(function) }

  /// `DDDD:BB`: the bus this function sits on.
  public var busID: String { hex(Int(domain), width: 4) + ":" + hex(Int(bus), width: 2) }

  public var description: String {
    busID + ":" + hex(Int(device), width: 2) + "." + hex(Int(function), width: 1)
  }

  public static func < (lhs: PCIAddress, rhs: PCIAddress) -> Bool {
    (lhs.domain, lhs.routingID) < (rhs.domain, rhs.routingID)
  }

  /// Parses `text` or throws INVALID_ARGUMENT naming `field`.
  public static func parse(_ text: String, field: String) throws(AgentError) -> PCIAddress {
    guard let address = PCIAddress(text) else {
      throw AgentError(
        .invalidArgument,
        "\(field) \(quoted(text)) is not a PCI address: expected DDDD:BB:DD.F in lower-case hex, e.g. 0000:3b:00.4"
      )
    }
    return address
  }
}

private func hexDigit(_ byte: UInt8) -> Int? {
  switch byte {
  case UInt8(ascii: "0")...UInt8(ascii: "9"): return Int(byte - UInt8(ascii: "0"))
  case UInt8(ascii: "a")...UInt8(ascii: "f"): return Int(byte - UInt8(ascii: "a")) + 10
  default: return nil
  }
}

/// Lower-case hex of `value`, zero-padded to `width` digits.
public func hex(_ value: Int, width: Int) -> String {
  let digits = String(value, radix: 16)
  return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
}
