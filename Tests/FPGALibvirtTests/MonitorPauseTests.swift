import FPGACore
import Testing

@testable import FPGALibvirt

/// VFIO pause through libvirt's QEMU monitor passthrough, and the domain filter: what the agent
/// sends and how it reads what libvirt 9.0 returned on this machine (`virsh qemu-monitor-command`
/// against Debian's QEMU 7.2 built with qemu/vfio-pause).
@Suite struct MonitorPauseTests {
  @Test func theCommandsAreQMPWithTheAgentsAliasAsTheDeviceID() {
    #expect(MonitorQMP.command("query-commands") == #"{"execute":"query-commands"}"#)
    #expect(
      MonitorQMP.command("x-vfio-pause", id: DomainXML.alias(deviceID: "alloc-1f0c"))
        == #"{"arguments":{"id":"ua-alloc-1f0c"},"execute":"x-vfio-pause"}"#)
    // Quotes and backslashes are escaped, never spliced into the JSON.
    #expect(MonitorQMP.command("x", id: #"a"b\"#) == #"{"arguments":{"id":"a\"b\\"},"execute":"x"}"#)
  }

  @Test func queryCommandsFindsThePauseCommands() throws {
    let reply =
      #"{"return":[{"name":"device_add"},{"name":"x-vfio-resume"},{"name":"x-vfio-pause"},"#
      + #"{"name":"query-status"}],"id":"libvirt-413"}"#
    let names = try MonitorQMP.commandNames(reply)
    #expect(names == ["device_add", "x-vfio-resume", "x-vfio-pause", "query-status"])
    let stock = #"{"return":[{"name":"device_add"},{"name":"query-status"}],"id":"libvirt-9"}"#
    #expect(try !Set(["x-vfio-pause", "x-vfio-resume"]).isSubset(of: MonitorQMP.commandNames(stock)))
  }

  @Test func qemusRefusalsKeepTheirClassAndText() {
    #expect(throws: MonitorQMP.Refusal(errorClass: "DeviceNotFound", message: "Device 'ua-alloc-x' not found")) {
      try MonitorQMP.result(
        #"{"id":"libvirt-411","error":{"class":"DeviceNotFound","desc":"Device 'ua-alloc-x' not found"}}"#)
    }
    #expect(
      throws: MonitorQMP.Refusal(errorClass: "GenericError", message: "Device 'pci.1' is not a vfio-pci device")
    ) {
      try MonitorQMP.result(
        #"{"id":"libvirt-412","error":{"class":"GenericError","desc":"Device 'pci.1' is not a vfio-pci device"}}"#)
    }
    #expect(throws: Never.self) { try MonitorQMP.result(#"{"return":{},"id":"libvirt-7"}"#) }
  }

  @Test func whatIsNotAQMPReplyIsUnreadableNotACrash() {
    for reply in ["", "null", "[]", #"{"id":"libvirt-1"}"#, #"{"return":"#, String(repeating: "[", count: 10_000)] {
      #expect(throws: MonitorQMP.Unreadable.self) { try MonitorQMP.result(reply) }
    }
    #expect(throws: MonitorQMP.Unreadable.self) { try MonitorQMP.commandNames(#"{"return":{}}"#) }
  }

  @Test func theDomainsIdEmulatorAndMetadataNamespacesAreRead() throws {
    let xml = """
      <domain type='qemu' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
        <name>sample-p</name>
        <metadata>
          <fpga:agent xmlns:fpga="https://example.org/fpga-agent"/>
          <x:thing xmlns:x="https://example.org/x"/>
        </metadata>
        <devices>
          <emulator>/opt/qemu-vfio-pause/bin/qemu-system-x86_64</emulator>
        </devices>
      </domain>
      """
    let domain = try DomainDescription(xml: xml)
    #expect(domain.id == 3)
    #expect(domain.emulator == "/opt/qemu-vfio-pause/bin/qemu-system-x86_64")
    #expect(domain.metadataNamespaces == ["https://example.org/fpga-agent", "https://example.org/x"])
    // An element is in its own prefix's namespace only, whatever else it declares.
    let other = try DomainDescription(
      xml: "<domain><name>d</name><metadata><o:x xmlns:o='A' xmlns:fpga='B'/><plain xmlns='C'/></metadata></domain>")
    #expect(other.metadataNamespaces == ["A", "C"])
    // An inactive domain has no id; a domain without <metadata> no namespaces.
    let inactive = try DomainDescription(xml: LibvirtSamples.withHostdev)
    #expect(inactive.id == nil)
    #expect(inactive.metadataNamespaces.isEmpty)
    #expect(try DomainDescription(xml: LibvirtSamples.livePersistent).id == 1)
  }

  @Test func theFilterAdmitsByNamePatternAndMetadataNamespace() {
    #expect(DomainFilter().admits(name: "anything", metadataNamespaces: nil))
    let names = DomainFilter(patterns: ["tenant-*", "db-[ab]"])
    #expect(names.admits(name: "tenant-7", metadataNamespaces: nil))
    #expect(names.admits(name: "db-b", metadataNamespaces: []))
    #expect(!names.admits(name: "db-c", metadataNamespaces: []))
    #expect(!names.admits(name: "mytenant-1", metadataNamespaces: []))
    let tagged = DomainFilter(metadataNamespace: "https://example.org/fpga-agent")
    #expect(tagged.admits(name: "x", metadataNamespaces: ["https://example.org/fpga-agent"]))
    #expect(!tagged.admits(name: "x", metadataNamespaces: ["https://example.org/x"]))
    // Unreadable XML: the namespace cannot be confirmed, so the domain is not served.
    #expect(!tagged.admits(name: "x", metadataNamespaces: nil))
    let both = DomainFilter(patterns: ["vm-*"], metadataNamespace: "u")
    #expect(!both.admits(name: "db", metadataNamespaces: ["u"]))
    #expect(both.admits(name: "vm-1", metadataNamespaces: ["u"]))
    #expect(both.description == "libvirt.domains: vm-*; libvirt.metadata_namespace: u")
  }
}
