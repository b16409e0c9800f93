public import FPGALinux
import Foundation
import Synchronization

/// The card side of the accelerator register map, on a regular file mapped by both sides (as a
/// BAR is by the card and the host): a thread per slot polls the doorbell, carries out save,
/// load, run and stop with simulated times, and acknowledges each command.
public final class SimulatedFirmware: @unchecked Sendable {
  public let path: String
  public let slots: Int
  /// A save or load: fixed time plus state over bandwidth.
  public let fixed: Duration
  public let bytesPerSecond: Double
  private let base: UnsafeMutableRawPointer
  private let length: Int
  private let running = Atomic<Bool>(true)
  /// Commands carried out, e.g. "0:save:1:1048576".
  private let log = Mutex<[String]>([])

  public init(
    path: String, slots: Int, fixed: Duration = .microseconds(100), bytesPerSecond: Double = 4e9,
    magic: UInt32 = AcceleratorRegisters.magicValue
  ) throws {
    self.path = path
    self.slots = slots
    self.fixed = fixed
    self.bytesPerSecond = bytesPerSecond
    length = slots * AcceleratorRegisters.windowSize
    _ = FileManager.default.createFile(atPath: path, contents: Data(count: length))
    let fd = open(path, O_RDWR)
    guard fd >= 0, let mapped = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), mapped != MAP_FAILED
    else {
      throw CocoaError(.fileReadUnknown)
    }
    close(fd)
    base = mapped
    for slot in 0..<slots {
      write32(slot, AcceleratorRegisters.magic, magic)
      write32(slot, AcceleratorRegisters.version, 0x0001_0000)
      let thread = Thread { [self] in self.serve(slot) }
      thread.start()
    }
  }

  public var commands: [String] { log.withLock { $0 } }

  public func stop() { running.store(false, ordering: .relaxed) }

  deinit { munmap(base, length) }

  private func read32(_ slot: Int, _ offset: Int) -> UInt32 {
    atomicMemoryFence(ordering: .acquiring)
    return (base + slot * AcceleratorRegisters.windowSize).load(fromByteOffset: offset, as: UInt32.self)
  }

  private func read64(_ slot: Int, _ offset: Int) -> UInt64 {
    atomicMemoryFence(ordering: .acquiring)
    return (base + slot * AcceleratorRegisters.windowSize).load(fromByteOffset: offset, as: UInt64.self)
  }

  private func write32(_ slot: Int, _ offset: Int, _ value: UInt32) {
    (base + slot * AcceleratorRegisters.windowSize).storeBytes(of: value, toByteOffset: offset, as: UInt32.self)
    atomicMemoryFence(ordering: .releasing)
  }

  private func write64(_ slot: Int, _ offset: Int, _ value: UInt64) {
    (base + slot * AcceleratorRegisters.windowSize).storeBytes(of: value, toByteOffset: offset, as: UInt64.self)
    atomicMemoryFence(ordering: .releasing)
  }

  private func serve(_ slot: Int) {
    var done: UInt32 = 0
    while running.load(ordering: .relaxed) {
      let sequence = read32(slot, AcceleratorRegisters.sequence)
      let command = read32(slot, AcceleratorRegisters.command)
      guard sequence != done, command != 0 else {
        usleep(20)
        continue
      }
      write32(slot, AcceleratorRegisters.status, AcceleratorRegisters.Status.busy.rawValue)
      let handle = read32(slot, AcceleratorRegisters.contextHandle)
      let size = read64(slot, AcceleratorRegisters.stateSize)
      let began = ContinuousClock.now
      var error: UInt32 = 0
      switch AcceleratorRegisters.Command(rawValue: command) {
      case .save?, .load?:
        if handle == 0 {
          error = 2
        } else {
          sleepFor(fixed + .nanoseconds(Int64(Double(size) / bytesPerSecond * 1e9)))
        }
      case .run?:
        let budget = Duration.nanoseconds(Int64(read64(slot, AcceleratorRegisters.runBudget)))
        let end = began + budget
        while ContinuousClock.now < end {
          if read32(slot, AcceleratorRegisters.command) == AcceleratorRegisters.Command.stop.rawValue { break }
          usleep(100)
        }
      case .stop?: break
      case nil: error = 1
      }
      let elapsed = ContinuousClock.now - began
      let name = AcceleratorRegisters.Command(rawValue: command).map { "\($0)" } ?? "command \(command)"
      log.withLock { $0.append("\(slot):\(name):\(handle):\(size)") }
      write64(
        slot, AcceleratorRegisters.elapsed,
        UInt64(elapsed.components.seconds * 1_000_000_000 + elapsed.components.attoseconds / 1_000_000_000))
      write32(slot, AcceleratorRegisters.errorCode, error)
      write32(
        slot, AcceleratorRegisters.status,
        error == 0 ? AcceleratorRegisters.Status.done.rawValue : AcceleratorRegisters.Status.error.rawValue)
      write32(slot, AcceleratorRegisters.command, 0)
      write32(slot, AcceleratorRegisters.acknowledged, sequence)
      done = sequence
    }
  }

  private func sleepFor(_ duration: Duration) {
    let micros = duration.components.seconds * 1_000_000 + duration.components.attoseconds / 1_000_000_000_000
    usleep(useconds_t(max(0, micros)))
  }
}
