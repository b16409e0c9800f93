"""The VFIO pause patch (qemu/vfio-pause) on the host, without a VFIO device: the patched QEMU
built by scripts/build-qemu-vfio-pause (or given with QEMU_VFIO_PAUSE_BIN) offers the commands
and events, and refuses clearly what it cannot pause. The real pause and resume of a VF run in
the nested real-kernel guest (tests/real_kernel/test_vfio_pause.py). A few seconds once the
patched QEMU is built (a cold build takes some minutes)."""
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def patched_qemu():
    if os.environ.get("QEMU_VFIO_PAUSE_BIN"):
        return os.environ["QEMU_VFIO_PAUSE_BIN"]
    result = subprocess.run([str(ROOT / "scripts" / "build-qemu-vfio-pause")], capture_output=True, text=True)
    if result.returncode != 0:
        if os.geteuid() != 0:  # the build dependencies are installed only as root
            pytest.skip("scripts/build-qemu-vfio-pause failed and this is not root: VFIO pause test NOT RUN\n"
                        + result.stderr[-1000:])
        pytest.fail("scripts/build-qemu-vfio-pause failed:\n" + result.stderr[-3000:])
    return result.stdout.strip().splitlines()[-1]


class QMP:
    def __init__(self, path, deadline=60):
        end = time.monotonic() + deadline
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(60)
        self.file = self.sock.makefile("rw")
        self.greeting = json.loads(self.file.readline())
        self.events = []
        assert "return" in self.execute("qmp_capabilities")

    def execute(self, command, **arguments):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                self.events.append(reply)
            elif "return" in reply or "error" in reply:
                return reply


@pytest.fixture(scope="module")
def qmp():
    binary = patched_qemu()
    with tempfile.TemporaryDirectory(prefix="fpga-vfio-pause-") as work:
        sock = Path(work) / "qmp.sock"
        process = subprocess.Popen(
            [binary, "-L", "/usr/share/seabios", "-L", "/usr/share/qemu", "-accel", "tcg", "-machine", "q35",
             "-nodefaults", "-display", "none", "-m", "64", "-S",
             "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
             "-device", "pcie-root-port,id=rp1,chassis=1,slot=1", "-device", "pcie-root-port,id=rp2,chassis=2,slot=2",
             "-device", "edu,id=edu0,bus=rp1", "-qmp", f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            yield QMP(sock)
        finally:
            process.terminate()
            process.wait(timeout=60)


def test_the_patched_qemu_offers_the_commands(qmp):
    names = {c["name"] for c in qmp.execute("query-commands")["return"]}
    assert {"x-vfio-pause", "x-vfio-resume"} <= names


def test_the_commands_and_events_are_in_the_schema_as_unstable(qmp):
    schema = qmp.execute("query-qmp-schema")["return"]
    by_name = {entry["name"]: entry for entry in schema}
    for name in ["x-vfio-pause", "x-vfio-resume", "VFIO_DEVICE_PAUSED", "VFIO_DEVICE_RESUMED"]:
        assert name in by_name, name
        assert by_name[name].get("features") == ["unstable"], by_name[name]
    assert by_name["x-vfio-pause"]["meta-type"] == "command"
    assert by_name["VFIO_DEVICE_PAUSED"]["meta-type"] == "event"


@pytest.mark.parametrize("command", ["x-vfio-pause", "x-vfio-resume"])
def test_an_unknown_id_is_device_not_found(qmp, command):
    reply = qmp.execute(command, id="nosuch")
    assert reply["error"] == {"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"}


@pytest.mark.parametrize("command", ["x-vfio-pause", "x-vfio-resume"])
@pytest.mark.parametrize("device", ["edu0", "rp2", "/machine/peripheral/edu0"])
def test_a_device_that_is_not_vfio_pci_is_refused(qmp, command, device):
    reply = qmp.execute(command, id=device)
    assert reply["error"] == {"class": "GenericError", "desc": f"Device '{device}' is not a vfio-pci device"}


def test_the_id_is_required(qmp):
    reply = qmp.execute("x-vfio-pause")
    assert reply["error"]["class"] == "GenericError" and "'id'" in reply["error"]["desc"]


def test_vfio_pci_without_a_host_device_is_refused_as_before(qmp):
    reply = qmp.execute("device_add", driver="vfio-pci", host="0000:7f:1f.7", id="vf9", bus="rp2")
    assert "no such host device" in reply["error"]["desc"]
    assert "return" in qmp.execute("query-status")
    assert not [e for e in qmp.events if e["event"].startswith("VFIO_")]
