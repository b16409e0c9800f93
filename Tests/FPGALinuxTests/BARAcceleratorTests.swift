import FPGACore
import FPGALinux
import FPGATestSupport
import Foundation
import Testing

/// The register-level accelerator control against a simulated firmware sharing a regular file,
/// as the card and the host share a BAR.
@Suite struct BARAcceleratorTests {
  func firmware(slots: Int = 2, magic: UInt32 = AcceleratorRegisters.magicValue) throws -> (SimulatedFirmware, String) {
    let directory = NSTemporaryDirectory() + "bar-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let path = directory + "/resource2"
    return (try SimulatedFirmware(path: path, slots: slots, magic: magic), path)
  }

  @Test func saveLoadAndRunGoThroughTheRegisters() async throws {
    let (card, path) = try firmware()
    defer { card.stop() }
    let control = try BARAcceleratorControl(path: path, slot: 1)
    let saved = try await control.save(context: "ctx-a", stateBytes: 4 << 20)
    // The card measured it: at least its fixed 100 µs plus 4 MiB at 4 GB/s (1.05 ms).
    #expect(saved >= .microseconds(1100))
    _ = try await control.load(context: "ctx-b", stateBytes: 0)
    let ran = await control.run(context: "ctx-b", for: .milliseconds(3))
    #expect(ran >= .milliseconds(3))
    #expect(card.commands == ["1:save:1:4194304", "1:load:2:0", "1:run:2:0"])
  }

  @Test func aCancelledRunIsStoppedOnTheCard() async throws {
    let (card, path) = try firmware(slots: 1)
    defer { card.stop() }
    let control = try BARAcceleratorControl(path: path, slot: 0)
    let run = Task { await control.run(context: "ctx-a", for: .seconds(30)) }
    while card.commands.isEmpty && !FileManager.default.contents(atPath: path)!.isEmpty {
      // Busy is visible in the status register.
      let data = FileManager.default.contents(atPath: path)!
      if data[AcceleratorRegisters.status] == 1 { break }
      try await Task.sleep(for: .milliseconds(2))
    }
    run.cancel()
    let ran = await run.value
    #expect(ran < .seconds(30))
    #expect(card.commands == ["0:run:1:0"])
  }

  @Test func aWindowThatIsNotAnAcceleratorIsRefused() throws {
    let (card, path) = try firmware(slots: 1, magic: 0xdead_beef)
    defer { card.stop() }
    #expect {
      _ = try BARAcceleratorControl(path: path, slot: 0)
    } throws: { error in
      (error as! AgentError).message.contains("does not answer as an accelerator of this agent (magic deadbeef")
    }
    #expect {
      _ = try BARAcceleratorControl(path: path, slot: 3)
    } throws: { error in
      (error as! AgentError).message.contains("too small for slot 3")
    }
    #expect(throws: AgentError.self) { _ = try BARAcceleratorControl(path: path + ".missing", slot: 0) }
  }

  /// The scheduler's runner on the register-level control: two guests share slot 0.
  @Test func aRunnerSharesARegisterLevelAccelerator() async throws {
    let (card, path) = try firmware(slots: 1)
    defer { card.stop() }
    let runner = AcceleratorRunner(
      spec: AcceleratorSpec(
        id: "card-0000:3b/acc0", cardID: "card-0000:3b", nominalSwitchCost: .microseconds(200),
        policy: .init(slice: .milliseconds(2), overcommitLimit: 2)),
      control: try BARAcceleratorControl(path: path, slot: 0))
    try await runner.bind(guest: "a", context: "ctx-a", stateBytes: 1 << 16, weight: 1)
    try await runner.bind(guest: "b", context: "ctx-b", stateBytes: 1 << 16, weight: 1)
    let loop = Task { await runner.run() }
    defer { loop.cancel() }
    await runner.submit(guest: "a", work: .milliseconds(6))
    await runner.submit(guest: "b", work: .milliseconds(6))
    var view = await runner.view(rollWindow: false)
    for _ in 0..<500 where view.guests.contains(where: { $0.pending > .zero }) {
      try await Task.sleep(for: .milliseconds(10))
      view = await runner.view(rollWindow: false)
    }
    await runner.stop()
    #expect(view.guests.allSatisfy { $0.pending == .zero })
    #expect(view.control == "bar")
    let commands = card.commands
    #expect(commands.contains("0:load:1:65536") && commands.contains("0:load:2:65536"))
    // Both contexts ran, in slices (how many depends on how long the card's runs took).
    #expect(commands.contains("0:run:1:0") && commands.contains("0:run:2:0"))
    #expect(commands.filter { $0.hasPrefix("0:run") }.count >= 2)
  }
}
