import FPGACore
import Testing

@testable import FPGALibvirt

@Suite struct DomainXMLTests {
  @Test func rootPortsOfALiveDomainAndWhichAreFree() throws {
    let domain = try DomainDescription(xml: LibvirtSamples.livePersistent)
    #expect(domain.name == "fpga-lv-a")
    #expect(
      domain.rootPorts == [
        .init(alias: "pci.1", bus: 1, hotPluggable: true), .init(alias: "pci.2", bus: 2, hotPluggable: true),
      ])
    // libvirt placed the USB controller on bus 1: only pci.2 is free.
    #expect(domain.occupiedBuses.contains(1))
    #expect(domain.freeRootPorts.map(\.alias) == ["pci.2"])
    #expect(domain.hostDevices.isEmpty)
  }

  @Test func aPortWithHotplugOffIsNotFree() throws {
    let domain = try DomainDescription(xml: LibvirtSamples.liveTransient)
    #expect(domain.rootPorts.count == 2)
    #expect(domain.rootPorts[1].hotPluggable == false)
    #expect(domain.freeRootPorts.map(\.alias) == ["pci.1"])
  }

  @Test func theAgentsHostdevIsFoundWithItsSourceAliasAndBus() throws {
    let domain = try DomainDescription(xml: LibvirtSamples.withHostdev)
    let device = try #require(domain.hostDevices.first)
    #expect(domain.hostDevices.count == 1)
    #expect(device.alias == "ua-alloc-1f0c9a22b7e4")
    #expect(device.source == PCIAddress("0000:3b:00.4"))
    #expect(device.bus == 2)
    #expect(device.managed == false)
    // The hostdev's host address (under <source>) is not a guest bus; its own address is.
    #expect(domain.occupiedBuses.contains(2))
    #expect(!domain.occupiedBuses.contains(0x3b))
    #expect(domain.freeRootPorts.isEmpty)  // pci.1: USB, pci.2: the VF
    #expect(DomainXML.deviceID(alias: device.alias!) == "alloc-1f0c9a22b7e4")
  }

  @Test func onlyTheAgentsAliasesNameDevices() {
    #expect(DomainXML.deviceID(alias: "ua-alloc-x1") == "alloc-x1")
    #expect(DomainXML.deviceID(alias: "hostdev0") == nil)
    #expect(DomainXML.deviceID(alias: "ua-other") == nil)
    #expect(DomainXML.alias(deviceID: "alloc-x1") == "ua-alloc-x1")
  }

  @Test func theHostdevTheAgentWritesReadsBackAsLibvirtWouldStoreIt() throws {
    let vf = try #require(PCIAddress("0000:d8:01.7"))
    let xml = DomainXML.hostdev(vf: vf, alias: "ua-alloc-1f0c9a22b7e4", bus: 0x12)
    #expect(
      xml == """
        <hostdev mode='subsystem' type='pci' managed='no'>
          <source>
            <address domain='0x0000' bus='0xd8' slot='0x01' function='0x7'/>
          </source>
          <alias name='ua-alloc-1f0c9a22b7e4'/>
          <address type='pci' domain='0x0000' bus='0x12' slot='0x00' function='0x0'/>
        </hostdev>
        """)
    // Inside a domain, it parses as the device libvirt reports.
    let domain = try DomainDescription(xml: "<domain><name>d</name><devices>\(xml)</devices></domain>")
    #expect(
      domain.hostDevices == [.init(alias: "ua-alloc-1f0c9a22b7e4", source: vf, bus: 0x12, managed: false)])
  }

  @Test func escapedTextAndEntitiesAreRead() throws {
    let node = try XMLNode.parse(
      "<?xml version='1.0'?><!-- c --><a x='1 &amp; &lt;2&gt;' y=\"&apos;&#x41;&#66;\"><b>t&amp;u</b><![CDATA[<z>]]></a>"
    )
    #expect(node["x"] == "1 & <2>")
    #expect(node["y"] == "'AB")
    #expect(node.child("b")?.text == "t&u")
    #expect(node.text == "<z>")
    #expect(xmlEscaped("a'<&>\"") == "a&apos;&lt;&amp;&gt;&quot;")
  }

  @Test(arguments: [
    "", "<a>", "<a></b>", "<a x=1/>", "<a x='1' x='2'/>", "<a/><b/>", "<a>&bogus;</a>", "<a x='<'/>", "<a><!-- </a>",
  ])
  func notWellFormedXMLIsRefused(_ text: String) {
    #expect(throws: XMLNode.ParseError.self) { try XMLNode.parse(text) }
  }

  @Test func aDocumentThatIsNotADomainIsRefused() {
    #expect(throws: XMLNode.ParseError.self) { try DomainDescription(xml: "<network/>") }
  }

  @Test func libvirtErrorsMapToPreciseCodesWithLibvirtsMessage() {
    let noVFIO = LibvirtHypervisor.map(
      LibvirtError(
        code: 67, domain: 10,
        message: "unsupported configuration: host doesn't support passthrough of host PCI devices"),
      vm: "vm-a", uri: "qemu:///system", doing: "the attach of VF 0000:3b:00.4 into pci.2")
    #expect(noVFIO.code == .failedPrecondition)
    #expect(
      noVFIO.message
        == "libvirt refused the attach of VF 0000:3b:00.4 into pci.2 in VM vm-a: unsupported configuration: host "
        + "doesn't support passthrough of host PCI devices")
    let missing = LibvirtHypervisor.map(
      LibvirtError(code: 42, domain: 10, message: "Domain not found: no domain with matching name 'x'"), vm: "x",
      uri: "qemu:///system", doing: "d")
    #expect(missing.code == .notFound)
    #expect(missing.message.hasSuffix("Domain not found: no domain with matching name 'x'"))
    #expect(
      LibvirtHypervisor.map(LibvirtError(code: 38, domain: 7, message: "m"), vm: "x", uri: "u", doing: "d").code
        == .unavailable)
    #expect(
      LibvirtHypervisor.map(LibvirtError(code: 55, domain: 10, message: "m"), vm: "x", uri: "u", doing: "d").code
        == .failedPrecondition)
    #expect(
      LibvirtHypervisor.map(LibvirtError(code: 99, domain: 10, message: "m"), vm: "x", uri: "u", doing: "d").code
        == .notFound)
  }
}
