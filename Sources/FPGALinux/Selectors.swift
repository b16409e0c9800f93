public import FPGACore

/// Which PCI functions the agent manages, in the manner of the SR-IOV device plugin's
/// selectors: a function is managed when any selector matches it, and a selector matches when
/// every non-empty field does.
public struct PFSelector: Hashable, Sendable {
  public var vendors: [UInt16]
  public var devices: [UInt16]
  public var drivers: [String]
  public var pciAddresses: [PCIAddress]

  public init(vendors: [UInt16] = [], devices: [UInt16] = [], drivers: [String] = [], pciAddresses: [PCIAddress] = []) {
    self.vendors = vendors
    self.devices = devices
    self.drivers = drivers
    self.pciAddresses = pciAddresses
  }

  public func matches(address: PCIAddress, vendor: UInt16, device: UInt16, driver: String?) -> Bool {
    (vendors.isEmpty || vendors.contains(vendor))
      && (devices.isEmpty || devices.contains(device))
      && (drivers.isEmpty || driver.map(drivers.contains) == true)
      && (pciAddresses.isEmpty || pciAddresses.contains(address))
  }

  /// Xilinx/AMD QDMA PFs: vendor 0x10ee, device `0x9PGL` (PF 0-3, Gen 1-5, lanes x1/x2/x4/x8/x16)
  /// and the Versal CPM PF0 ids `0xb0GL`.
  public static let qdma: PFSelector = {
    var devices: [UInt16] = []
    let lanes: [UInt16] = [0x1, 0x2, 0x4, 0x8, 0xf]
    for generation in UInt16(1)...5 {
      for lane in lanes {
        for pf in UInt16(0)...3 { devices.append(0x9000 | pf << 8 | generation << 4 | lane) }
        devices.append(0xb000 | generation << 4 | lane)
      }
    }
    return PFSelector(vendors: [0x10ee], devices: devices.sorted())
  }()

  /// Matches every PCI function (for discovery on an unknown host).
  public static let any = PFSelector()
}
