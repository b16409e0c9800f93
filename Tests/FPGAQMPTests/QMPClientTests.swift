import FPGAQMP
import FPGATestSupport
import Foundation
import Testing

/// The QMP client against a real QEMU (installed by the test setup; see scripts/install-test-deps).
@Suite(.enabled(if: QEMUProcess.isAvailable, "qemu-system-x86_64 is not installed: real-QEMU tests NOT RUN"))
struct QMPClientRealQEMUTests {
  @Test func handshakeAndAQuery() async throws {
    let qemu = try QEMUProcess()
    let client = try await QMPClient.connect(path: qemu.socketPath)
    #expect(client.version.hasPrefix("7.") || client.version.hasPrefix("8.") || client.version.hasPrefix("9."))
    let status = try await client.execute("query-status")
    #expect(status["status"]?.stringValue == "prelaunch")
    let commands = try await client.execute("query-commands").arrayValue ?? []
    #expect(commands.contains { $0["name"]?.stringValue == "device_add" })
  }

  @Test func hotplugAndUnplugAnEmulatedDevice() async throws {
    let qemu = try QEMUProcess()
    let client = try await QMPClient.connect(path: qemu.socketPath)
    _ = try await client.execute("device_add", ["driver": "edu", "id": "vf0", "bus": "rp1"])
    let peripherals = try await client.execute("qom-list", ["path": "/machine/peripheral"])
    #expect(peripherals.arrayValue?.contains { $0["name"]?.stringValue == "vf0" } == true)
    let deleted = client.expectEvent("DEVICE_DELETED") { $0["device"]?.stringValue == "vf0" }
    _ = try await client.execute("device_del", ["id": "vf0"])
    let data = try await deleted.wait(timeout: .seconds(10))
    #expect(data["path"]?.stringValue == "/machine/peripheral/vf0")
  }

  @Test func qemuErrorsKeepTheirClassAndText() async throws {
    let qemu = try QEMUProcess()
    let client = try await QMPClient.connect(path: qemu.socketPath)
    await #expect(throws: QMPError(.commandFailed, "Bus 'nosuchbus' not found", errorClass: "GenericError")) {
      try await client.execute("device_add", ["driver": "edu", "id": "x", "bus": "nosuchbus"])
    }
    await #expect(throws: QMPError(.commandFailed, "Device 'nosuch' not found", errorClass: "DeviceNotFound")) {
      try await client.execute("device_del", ["id": "nosuch"])
    }
    await #expect(
      throws: QMPError(.commandFailed, "'nosuchdev' is not a valid device model name", errorClass: "GenericError")
    ) {
      try await client.execute("device_add", ["driver": "nosuchdev", "id": "y", "bus": "rp1"])
    }
    _ = try await client.execute("device_add", ["driver": "edu", "id": "dup", "bus": "rp1"])
    await #expect(throws: QMPError(.commandFailed, "Duplicate device ID 'dup'", errorClass: "GenericError")) {
      try await client.execute("device_add", ["driver": "edu", "id": "dup", "bus": "rp2"])
    }
  }

  @Test func anUnplugTheGuestNeverAcknowledgesTimesOut() async throws {
    let qemu = try QEMUProcess(nativeHotplug: false)
    let client = try await QMPClient.connect(path: qemu.socketPath)
    _ = try await client.execute("device_add", ["driver": "edu", "id": "vf0", "bus": "rp1"])
    let deleted = client.expectEvent("DEVICE_DELETED") { $0["device"]?.stringValue == "vf0" }
    _ = try await client.execute("device_del", ["id": "vf0"])
    await #expect(throws: QMPError.self) { try await deleted.wait(timeout: .milliseconds(500)) }
    // The device is still there, and a second request says so.
    await #expect(
      throws: QMPError(.commandFailed, "Device vf0 is already in the process of unplug", errorClass: "GenericError")
    ) {
      try await client.execute("device_del", ["id": "vf0"])
    }
  }

  @Test func qemuKilledMidOperationFailsEverythingPending() async throws {
    let qemu = try QEMUProcess(nativeHotplug: false)
    let client = try await QMPClient.connect(path: qemu.socketPath)
    _ = try await client.execute("device_add", ["driver": "edu", "id": "vf0", "bus": "rp1"])
    let deleted = client.expectEvent("DEVICE_DELETED")
    _ = try await client.execute("device_del", ["id": "vf0"])
    qemu.kill()
    do {
      _ = try await deleted.wait(timeout: .seconds(10))
      Issue.record("expected a disconnection")
    } catch {
      #expect(error.kind == .disconnected)
    }
    do {
      _ = try await client.execute("query-status")
      Issue.record("expected a disconnection")
    } catch {
      #expect(error.kind == .disconnected)
    }
    #expect(!client.isConnected)
  }

  @Test func aMissingSocketIsAConnectFailure() async {
    do {
      _ = try await QMPClient.connect(path: "/nonexistent/qmp.sock")
      Issue.record("expected connectFailed")
    } catch {
      #expect(error.kind == .connectFailed)
      #expect(error.message == "cannot connect to QMP socket /nonexistent/qmp.sock: No such file or directory")
    }
  }
}

@Suite struct JSONValueTests {
  @Test func roundTrip() throws {
    let value: JSONValue = [
      "execute": "device_add", "arguments": ["driver": "vfio-pci", "x-req": true, "n": 3, "list": [1, "a"]],
    ]
    let text = String(decoding: value.serialized, as: UTF8.self)
    #expect(text == #"{"arguments":{"driver":"vfio-pci","list":[1,"a"],"n":3,"x-req":true},"execute":"device_add"}"#)
    #expect(try JSONValue.parse(value.serialized) == value)
    #expect(
      try JSONValue.parse(Data("{\"a\":false,\"b\":null,\"c\":1.5}".utf8)) == [
        "a": false, "b": .null, "c": .number(1.5),
      ])
  }
}
