import FPGACore
@testable import FPGADRA
import Testing

/// A claim's opaque parameters for this driver are checked against their ranges (docs/api.md,
/// "Ranges"): out of range, the claim fails with the field named; nothing is replaced silently.
@Suite struct OpaqueParametersTests {
  func claim(_ parameters: [String: JSONAny]) -> Kube.ResourceClaim {
    var claim = Claims.claim("share", uid: "uid-p", devices: ["acc-0000-3b-0"])
    claim.status?.allocation?.devices?.config = [
      .init(requests: nil, opaque: .init(driver: "qdma.xilinx.com", parameters: .object(parameters)))
    ]
    return claim
  }

  @Test func weightsWithinTheirRangeAreTaken() throws {
    for weight in [1.0, 7.0, 1000.0] {
      let taken = try DRADriver.parameters(
        claim(["function": .string("fft"), "weight": .number(weight)]), request: "vf", driver: "qdma.xilinx.com")
      #expect(taken.function == "fft" && taken.weight == UInt32(weight))
    }
    let defaults = try DRADriver.parameters(claim([:]), request: "vf", driver: "qdma.xilinx.com")
    #expect(defaults.function == "default" && defaults.weight == 1)
  }

  @Test func weightsOutsideTheirRangeFailTheClaim() {
    for weight: JSONAny in [
      .number(0), .number(1001), .number(-1), .number(2.5), .number(1e300), .number(-.infinity), .string("3"),
      .bool(true), .array([]),
    ] {
      let failure = #expect(throws: DRAFailure.self) {
        _ = try DRADriver.parameters(claim(["weight": weight]), request: "vf", driver: "qdma.xilinx.com")
      }
      #expect(failure?.message.contains("weight") == true && failure?.message.contains("1-1000") == true)
    }
    let failure = #expect(throws: DRAFailure.self) {
      _ = try DRADriver.parameters(claim(["function": .number(3)]), request: "vf", driver: "qdma.xilinx.com")
    }
    #expect(failure?.message.contains("function") == true)
  }
}
