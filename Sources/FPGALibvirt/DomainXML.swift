import FPGACore

/// What the agent reads from a domain's live XML (`virDomainGetXMLDesc(dom, 0)`): its root ports
/// and which of them hold a device, and the PCI host devices plugged in.
struct DomainDescription: Hashable, Sendable {
  /// A `pcie-root-port` controller: libvirt's alias (`pci.2`) and the bus it provides (its index).
  struct RootPort: Hashable, Sendable {
    var alias: String
    var bus: Int
    /// `<target hotplug='off'/>`: libvirt refuses hot-plug into it.
    var hotPluggable: Bool
  }

  /// A `<hostdev mode='subsystem' type='pci'>`.
  struct HostDevice: Hashable, Sendable {
    var alias: String?
    /// The host function (`<source><address …/>`).
    var source: PCIAddress?
    /// The guest bus it sits on (`<address type='pci' bus=…/>`).
    var bus: Int?
    var managed: Bool
  }

  var name: String
  /// libvirt's id of the running domain (`<domain id='3'>`): a new one at every start.
  var id: Int?
  /// The QEMU binary (`<emulator>`).
  var emulator: String?
  /// The namespaces of the elements under `<metadata>` (what applications set there).
  var metadataNamespaces: Set<String> = []
  var rootPorts: [RootPort]
  /// Guest buses on which some device sits (any device element's own `<address type='pci'>`).
  var occupiedBuses: Set<Int>
  var hostDevices: [HostDevice]

  /// Root ports a device can be hot-plugged into (without `hotplug='off'`).
  var hotPluggableRootPorts: Int { rootPorts.filter(\.hotPluggable).count }

  /// Hot-pluggable root ports with nothing on their bus, in bus order.
  var freeRootPorts: [RootPort] {
    rootPorts.filter { $0.hotPluggable && !occupiedBuses.contains($0.bus) }.sorted { $0.bus < $1.bus }
  }

  init(name: String, rootPorts: [RootPort], occupiedBuses: Set<Int>, hostDevices: [HostDevice]) {
    self.name = name
    self.rootPorts = rootPorts
    self.occupiedBuses = occupiedBuses
    self.hostDevices = hostDevices
  }

  /// Reads a domain description as libvirt 9.0 writes it.
  init(xml: String) throws(XMLNode.ParseError) {
    let root = try XMLNode.parse(xml)
    guard root.name == "domain" else { throw XMLNode.ParseError(offset: 0, reason: "<\(root.name)> is not a <domain>") }
    name = root.child("name")?.text ?? ""
    id = root["id"].flatMap { Int($0) }
    emulator = root.child("devices")?.child("emulator")?.text
    // <metadata><fpga:agent xmlns:fpga='URI'/></metadata>: libvirt writes each element with the
    // declaration of its own prefix; other declarations on it do not make it that namespace's.
    for element in root.child("metadata")?.children ?? [] {
      let prefix = element.name.split(separator: ":", maxSplits: 1).dropLast().first.map { "xmlns:" + $0 } ?? "xmlns"
      if let namespace = element[prefix] { metadataNamespaces.insert(namespace) }
    }
    rootPorts = []
    occupiedBuses = []
    hostDevices = []
    for device in root.child("devices")?.children ?? [] {
      // A device's own guest address; a hostdev's host address is under <source>, not here.
      if let address = device.children("address").first(where: { $0["type"] == "pci" }),
        let bus = address["bus"].flatMap(Self.number)
      {
        occupiedBuses.insert(bus)
      }
      if device.name == "controller", device["type"] == "pci", device["model"] == "pcie-root-port",
        let index = device["index"].flatMap(Self.number)
      {
        rootPorts.append(
          RootPort(
            alias: device.child("alias")?["name"] ?? "pci.\(index)", bus: index,
            hotPluggable: device.child("target")?["hotplug"] != "off"))
      }
      if device.name == "hostdev", device["mode"] == "subsystem", device["type"] == "pci" {
        hostDevices.append(
          HostDevice(
            alias: device.child("alias")?["name"],
            source: device.child("source")?.child("address").flatMap(Self.pciAddress),
            bus: device.children("address").first { $0["type"] == "pci" }?["bus"].flatMap(Self.number),
            managed: device["managed"] == "yes"))
      }
    }
  }

  /// `0x3b` or `59`, as libvirt writes numbers in addresses and indexes.
  static func number(_ text: String) -> Int? {
    text.hasPrefix("0x") ? Int(text.dropFirst(2), radix: 16) : Int(text)
  }

  /// `<address domain='0x0000' bus='0x3b' slot='0x00' function='0x4'/>`.
  static func pciAddress(_ node: XMLNode) -> PCIAddress? {
    guard let bus = node["bus"].flatMap(number), let slot = node["slot"].flatMap(number),
      let function = node["function"].flatMap(number), bus <= 0xff, slot <= 0x1f, function <= 7
    else { return nil }
    let domain = node["domain"].flatMap(number) ?? 0
    guard domain <= 0xffff else { return nil }
    return PCIAddress(domain: UInt16(domain), bus: UInt8(bus), device: UInt8(slot), function: UInt8(function))
  }
}

/// The XML the agent hands to libvirt.
enum DomainXML {
  /// libvirt requires user aliases to start with `ua-`; the agent's are `ua-` + the device id.
  static let aliasPrefix = "ua-"

  static func alias(deviceID: String) -> String { aliasPrefix + deviceID }

  /// The agent's device id of an alias it set (`ua-alloc-…` → `alloc-…`), or nil for others.
  static func deviceID(alias: String) -> String? {
    alias.hasPrefix(aliasPrefix + "alloc-") ? String(alias.dropFirst(aliasPrefix.count)) : nil
  }

  /// A VF the agent bound to vfio-pci itself (`managed='no'`: libvirt leaves the host driver
  /// alone), with the agent's alias, on the bus of the root port chosen.
  static func hostdev(vf: PCIAddress, alias: String, bus: Int) -> String {
    """
    <hostdev mode='subsystem' type='pci' managed='no'>
      <source>
        <address domain='\(hex(Int(vf.domain), 4))' bus='\(hex(Int(vf.bus), 2))' slot='\(hex(Int(vf.device), 2))' \
    function='\(hex(Int(vf.function), 1))'/>
      </source>
      <alias name='\(xmlEscaped(alias))'/>
      <address type='pci' domain='0x0000' bus='\(hex(bus, 2))' slot='0x00' function='0x0'/>
    </hostdev>
    """
  }

  private static func hex(_ value: Int, _ width: Int) -> String {
    let digits = String(value, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, width - digits.count)) + digits
  }
}
