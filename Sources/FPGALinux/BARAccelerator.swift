#if canImport(Glibc)
  @preconcurrency import Glibc
#elseif canImport(Darwin)
  import Darwin
#endif
public import FPGACore
import Synchronization

/// The register map of an accelerator slot in a PCI BAR (docs/accelerator-registers.md).
/// Each slot has a 4 KiB window at `slot × 0x1000`; registers are little-endian.
public enum AcceleratorRegisters {
  public static let windowSize = 0x1000
  /// "SVFF", read-only.
  public static let magic = 0x000
  public static let magicValue: UInt32 = 0x5356_4646
  /// Major << 16 | minor, read-only; this agent speaks major 1.
  public static let version = 0x004
  /// Command doorbell, written last: 1 save, 2 load, 3 run, 4 stop.
  public static let command = 0x008
  /// 0 idle, 1 busy, 2 done, 3 error; read-only.
  public static let status = 0x00C
  /// The context's handle (non-zero).
  public static let contextHandle = 0x010
  /// Bytes of state to save or load (64-bit).
  public static let stateSize = 0x018
  /// Longest a run may last, in nanoseconds (64-bit).
  public static let runBudget = 0x020
  /// How long the last command took, measured by the card, in nanoseconds (64-bit, read-only).
  public static let elapsed = 0x028
  /// Why the last command failed (read-only): 1 unknown command, 2 no such context, 3 busy.
  public static let errorCode = 0x030
  /// The host's sequence number of the command being written.
  public static let sequence = 0x034
  /// The sequence number of the last command the card finished (read-only).
  public static let acknowledged = 0x038

  public enum Command: UInt32, Sendable { case save = 1, load = 2, run = 3, stop = 4 }
  public enum Status: UInt32, Sendable { case idle = 0, busy = 1, done = 2, error = 3 }
}

/// An accelerator slot driven through its registers in a memory-mapped PCI BAR
/// (`/sys/bus/pci/devices/BDF/resourceN`). The context's state stays in the card's memory: the
/// host names the context by a handle and says how much state it has.
public final class BARAcceleratorControl: AcceleratorControl, @unchecked Sendable {
  public let kind = "bar"
  public let path: String
  public let slot: Int
  private let base: UnsafeMutableRawPointer
  private let length: Int
  /// Serializes commands: one at a time per slot.
  private let lock = Mutex<UInt32>(0)
  private let handles = Mutex<[String: UInt32]>([:])
  private let timeout: Duration

  /// Maps the BAR at `path` and checks the slot's magic and version.
  public init(path: String, slot: Int, timeout: Duration = .seconds(5)) throws(AgentError) {
    self.path = path
    self.slot = slot
    self.timeout = timeout
    let fd = open(path, O_RDWR | O_CLOEXEC | O_SYNC)
    guard fd >= 0 else {
      throw AgentError(.unavailable, "cannot open accelerator BAR \(path)", cause: String(cString: strerror(errno)))
    }
    defer { close(fd) }
    var info = stat()
    guard fstat(fd, &info) == 0 else {
      throw AgentError(.unavailable, "cannot stat accelerator BAR \(path)", cause: String(cString: strerror(errno)))
    }
    let needed = (slot + 1) * AcceleratorRegisters.windowSize
    guard slot >= 0, Int(info.st_size) >= needed else {
      throw AgentError(
        .failedPrecondition,
        "accelerator BAR \(path) is \(info.st_size) bytes: too small for slot \(slot) (needs \(needed))")
    }
    guard let mapped = mmap(nil, needed, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), mapped != MAP_FAILED else {
      throw AgentError(.unavailable, "cannot map accelerator BAR \(path)", cause: String(cString: strerror(errno)))
    }
    base = mapped
    length = needed
    let magic = read32(AcceleratorRegisters.magic)
    let version = read32(AcceleratorRegisters.version)
    guard magic == AcceleratorRegisters.magicValue, version >> 16 == 1 else {
      munmap(mapped, needed)
      throw AgentError(
        .failedPrecondition,
        "slot \(slot) of \(path) does not answer as an accelerator of this agent (magic \(hex(Int(magic), width: 8)), "
          + "version \(hex(Int(version), width: 8)); expected magic 53564646, version 1.x)")
    }
  }

  deinit { munmap(base, length) }

  // MARK: AcceleratorControl

  public func save(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration {
    try await execute(.save, context: context, stateBytes: stateBytes)
  }

  public func load(context: String, stateBytes: UInt64) async throws(AgentError) -> Duration {
    try await execute(.load, context: context, stateBytes: stateBytes)
  }

  public func run(context: String, for duration: Duration) async -> Duration {
    (try? await execute(.run, context: context, stateBytes: 0, budget: duration, preemptible: true)) ?? .zero
  }

  // MARK: Registers

  private var window: UnsafeMutableRawPointer { base + slot * AcceleratorRegisters.windowSize }

  private func read32(_ offset: Int) -> UInt32 {
    atomicMemoryFence(ordering: .acquiring)
    return UInt32(littleEndian: window.load(fromByteOffset: offset, as: UInt32.self))
  }

  private func read64(_ offset: Int) -> UInt64 {
    atomicMemoryFence(ordering: .acquiring)
    return UInt64(littleEndian: window.load(fromByteOffset: offset, as: UInt64.self))
  }

  private func write32(_ offset: Int, _ value: UInt32) {
    window.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self)
    atomicMemoryFence(ordering: .releasing)
  }

  private func write64(_ offset: Int, _ value: UInt64) {
    window.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt64.self)
    atomicMemoryFence(ordering: .releasing)
  }

  private func handle(for context: String) -> UInt32 {
    handles.withLock { handles in
      if let known = handles[context] { return known }
      let next = UInt32(handles.count + 1)
      handles[context] = next
      return next
    }
  }

  /// Writes the operands, then the sequence and the doorbell; polls until the card acknowledges
  /// that sequence. A cancelled preemptible run is stopped with the stop command.
  private func execute(
    _ command: AcceleratorRegisters.Command, context: String, stateBytes: UInt64, budget: Duration = .zero,
    preemptible: Bool = false
  ) async throws(AgentError) -> Duration {
    let sequence = lock.withLock { value -> UInt32 in
      value &+= 1
      return value
    }
    write32(AcceleratorRegisters.contextHandle, handle(for: context))
    write64(AcceleratorRegisters.stateSize, stateBytes)
    write64(
      AcceleratorRegisters.runBudget,
      UInt64(max(0, budget.components.seconds * 1_000_000_000 + budget.components.attoseconds / 1_000_000_000)))
    write32(AcceleratorRegisters.sequence, sequence)
    write32(AcceleratorRegisters.command, command.rawValue)
    let clock = ContinuousClock()
    let deadline = clock.now + timeout + budget
    var pause = Duration.microseconds(20)
    var stopped = false
    while read32(AcceleratorRegisters.acknowledged) != sequence {
      if preemptible && Task.isCancelled && !stopped {
        write32(AcceleratorRegisters.command, AcceleratorRegisters.Command.stop.rawValue)
        stopped = true
      }
      guard clock.now < deadline else {
        throw AgentError(
          .unavailable,
          "accelerator slot \(slot) of \(path) did not finish command \(command) within \(timeout + budget)")
      }
      // Not cancellable: a cancelled run still waits for the card to acknowledge its stop.
      let wait = pause
      await Task.detached { try? await Task.sleep(for: wait) }.value
      pause = min(pause * 2, .milliseconds(1))
    }
    let status = AcceleratorRegisters.Status(rawValue: read32(AcceleratorRegisters.status))
    guard status == .done else {
      let code = read32(AcceleratorRegisters.errorCode)
      let reason =
        switch code {
        case 1: "unknown command"
        case 2: "no such context"
        case 3: "busy"
        default: "error \(code)"
        }
      throw AgentError(.internal, "accelerator slot \(slot) of \(path) refused command \(command): \(reason)")
    }
    let nanos = read64(AcceleratorRegisters.elapsed)
    return .nanoseconds(Int64(min(nanos, UInt64(Int64.max))))
  }
}
