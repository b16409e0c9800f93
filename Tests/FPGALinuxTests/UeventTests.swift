#if canImport(Glibc)
  import Glibc
#endif
import FPGACore
import FPGALinux
import Foundation
import Synchronization
import Testing

@Suite struct UeventTests {
  @Test func kernelDatagramsParseAndUdevOnesAreIgnored() {
    let kernel = Array(
      "change@/devices/pci0000:00/0000:3b:00.0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:3b:00.0\0SUBSYSTEM=pci\0PCI_SLOT_NAME=0000:3B:00.0\0SEQNUM=7\0"
        .utf8)
    let event = Uevent(datagram: kernel)
    #expect(
      event
        == Uevent(
          action: "change", devpath: "/devices/pci0000:00/0000:3b:00.0", subsystem: "pci",
          pciSlot: PCIAddress("0000:3b:00.0")))
    #expect(event?.concernsPCIDevices == true)
    #expect(Uevent(datagram: Array("libudev\0\u{1}\u{2}".utf8)) == nil)
    #expect(
      Uevent(
        datagram: Array(
          "add@/devices/virtual/net/lo\0ACTION=add\0DEVPATH=/devices/virtual/net/lo\0SUBSYSTEM=net\0".utf8))?
        .concernsPCIDevices == false)
  }

  /// The real kernel: writing "change" to a PCI device's `uevent` attribute makes the kernel
  /// broadcast a uevent for it, which the netlink reader must deliver.
  @Test func theKernelsNetlinkSocketDeliversAPCIEvent() async throws {
    guard geteuid() == 0,
      let device = try? FileManager.default.contentsOfDirectory(atPath: "/sys/bus/pci/devices").sorted().first
    else {
      print("skipped: needs root and a PCI device in /sys")
      return
    }
    let events = NetlinkUevents().events()
    let slot = PCIAddress(device)
    let found = Found()
    let reader = Task {
      for await event in events where event.concernsPCIDevices && event.pciSlot == slot {
        found.set(event)
        return
      }
    }
    defer { reader.cancel() }
    // The reader thread may not be receiving yet: trigger until it sees one (at most 5 s).
    for _ in 0..<50 where found.value == nil {
      try "change".write(toFile: "/sys/bus/pci/devices/\(device)/uevent", atomically: false, encoding: .utf8)
      try await Task.sleep(for: .milliseconds(100))
    }
    #expect(found.value?.action == "change" && found.value?.subsystem == "pci")
  }

  final class Found: Sendable {
    private let event = Mutex<Uevent?>(nil)
    var value: Uevent? { event.withLock { $0 } }
    func set(_ value: Uevent) { event.withLock { $0 = value } }
  }
}
