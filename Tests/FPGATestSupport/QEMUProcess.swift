public import Foundation

/// A real `qemu-system-x86_64` for tests: q35 under TCG, stopped (`-S`), no guest OS, empty
/// PCIe root ports, QMP on a Unix socket in a temporary folder.
public final class QEMUProcess: @unchecked Sendable {
  public let socketPath: String
  /// A second QMP monitor for the test's own inspection (a QMP socket serves one client at a time).
  public let inspectionSocketPath: String
  public let directory: String
  public let process: Process

  public static var isAvailable: Bool { executable != nil }

  static var executable: String? {
    ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"].first {
      FileManager.default.isExecutableFile(atPath: $0)
    }
  }

  /// - Parameters:
  ///   - rootPorts: empty hot-pluggable root ports, named rp1, rp2, …
  ///   - nativeHotplug: native PCIe hot-plug (unplug completes at once on an unpowered slot);
  ///     false keeps q35's ACPI hot-plug, where an unplug waits for a guest that never answers.
  public init(rootPorts: Int = 2, nativeHotplug: Bool = true, extra: [String] = [], directory: String? = nil) throws {
    self.directory = directory ?? NSTemporaryDirectory() + "qemu-" + UUID().uuidString.prefix(8)
    try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
    socketPath = self.directory + "/qmp.sock"
    inspectionSocketPath = self.directory + "/inspect.sock"
    process = Process()
    process.executableURL = URL(fileURLWithPath: Self.executable ?? "/usr/bin/qemu-system-x86_64")
    var arguments = [
      "-machine", "q35", "-accel", "tcg", "-nodefaults", "-nographic", "-display", "none", "-m", "64", "-S",
    ]
    if nativeHotplug { arguments += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"] }
    for port in 1...max(rootPorts, 1) where rootPorts > 0 {
      arguments += ["-device", "pcie-root-port,id=rp\(port),chassis=\(port),slot=\(port)"]
    }
    arguments +=
      extra + [
        "-qmp", "unix:\(socketPath),server=on,wait=off", "-qmp", "unix:\(inspectionSocketPath),server=on,wait=off",
      ]
    process.arguments = arguments
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle(forWritingAtPath: "/dev/null")
    try process.run()
    for _ in 0..<500 where !FileManager.default.fileExists(atPath: inspectionSocketPath) || !process.isRunning {
      usleep(10_000)
    }
  }

  /// SIGKILL, as a crash would.
  public func kill() {
    if process.isRunning { Foundation.kill(process.processIdentifier, SIGKILL) }
    // Foundation's waitUntilExit can hang on Linux; poll instead (the child is reaped by Process).
    for _ in 0..<500 where process.isRunning { usleep(10_000) }
  }

  /// Keeps the folder when another QEMU will reuse it.
  public var keepDirectory = false

  deinit {
    kill()
    if !keepDirectory { try? FileManager.default.removeItem(atPath: directory) }
  }
}
