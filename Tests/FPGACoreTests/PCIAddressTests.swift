import FPGACore
import Testing

@Suite struct PCIAddressTests {
  @Test func parsesTheStrictForm() throws {
    let address = try #require(PCIAddress("0000:3b:00.4"))
    #expect(address.domain == 0 && address.bus == 0x3b && address.device == 0 && address.function == 4)
    #expect(address.description == "0000:3b:00.4")
    #expect(PCIAddress("0001:d8:1f.7")?.description == "0001:d8:1f.7")
    #expect(PCIAddress("0001:D8:1F.7") == nil, "upper case is not how sysfs spells it")
    #expect(throws: AgentError.self) { try Validate.cardID("card-0000:3B") }
  }

  @Test(arguments: [
    "", "0000:3b:00", "3b:00.0", "0000:3b:00.8", "0000:3b:20.0", "0000:3b:00.0 ", " 0000:3b:00.0",
    "0000:3g:00.0", "0000-3b-00.0", "../../../etc", "0000:3b:00.0/../x", "00000:3b:00.0", "0000:3b:0.00",
  ])
  func refusesEverythingElse(_ text: String) {
    #expect(PCIAddress(text) == nil)
    #expect(throws: AgentError.self) { try PCIAddress.parse(text, field: "pf_bdf") }
  }

  @Test func parseErrorNamesTheFieldAndTheForm() {
    do {
      _ = try PCIAddress.parse("nope", field: "constraints.pf_bdf")
      Issue.record("expected an error")
    } catch {
      #expect(error.code == .invalidArgument)
      #expect(
        error.message
          == "constraints.pf_bdf \"nope\" is not a PCI address: expected DDDD:BB:DD.F in lower-case hex, e.g. 0000:3b:00.4"
      )
    }
  }

  @Test func routingIDArithmeticMatchesTheKernel() throws {
    // pci_iov_virtfn_bus/devfn: routing id = PF's + offset + stride * index.
    let pf = PhysicalFunction(
      address: try #require(PCIAddress("0000:3b:00.1")), vendorID: 0x10ee, deviceID: 0x913f,
      vfDeviceID: 0xa13f, totalVFs: 60, numVFs: 0, vfOffset: 67, vfStride: 1, driversAutoprobe: false,
      driver: "qdma-pf", numaNode: 0, qmax: 0)
    #expect(pf.vfAddress(index: 0)?.description == "0000:3b:08.4")  // 0x3b01 + 67 = 0x3b44
    #expect(pf.vfAddress(index: 59)?.description == "0000:3b:0f.7")  // 0x3b7f
    let crossing = PhysicalFunction(
      address: try #require(PCIAddress("0000:3b:00.0")), vendorID: 0x10ee, deviceID: 0x903f,
      vfDeviceID: 0xa03f, totalVFs: 64, numVFs: 0, vfOffset: 0x100, vfStride: 2, driversAutoprobe: false,
      driver: nil, numaNode: 0, qmax: 0)
    #expect(crossing.vfAddress(index: 1)?.description == "0000:3c:00.2")  // onto the next bus
  }
}

@Suite struct ValidationTests {
  @Test func vmNamesAreSafeFileNames() throws {
    #expect(try Validate.vmName("vm-1.prod_a") == "vm-1.prod_a")
    #expect(try Validate.vmName("") == nil)
    for bad in ["../x", ".hidden", "-flag", "a/b", "a b", String(repeating: "a", count: 65), "é"] {
      #expect(throws: AgentError.self) { try Validate.vmName(bad) }
    }
  }

  @Test func ownersAndKeysArePrintableASCII() throws {
    #expect(try Validate.owner("tenant-a/pod 7") == "tenant-a/pod 7")
    #expect(throws: AgentError.self) { try Validate.owner("") }
    #expect(throws: AgentError.self) { try Validate.owner("bad\nline") }
    #expect(throws: AgentError.self) { try Validate.idempotencyKey(String(repeating: "k", count: 129)) }
    #expect(try Validate.idempotencyKey("") == nil)
  }

  @Test func idsAndCards() throws {
    #expect(try Validate.id("alloc-0123abcd", field: "allocation_id", prefix: "alloc-") == "alloc-0123abcd")
    #expect(throws: AgentError.self) { try Validate.id("op-1", field: "allocation_id", prefix: "alloc-") }
    #expect(throws: AgentError.self) { try Validate.id("alloc-../x", field: "allocation_id", prefix: "alloc-") }
    #expect(try Validate.cardID("card-0000:3b") == "card-0000:3b")
    #expect(throws: AgentError.self) { try Validate.cardID("card-3b") }
  }
}
