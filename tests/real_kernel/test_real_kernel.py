"""The agent's Linux platform against a real Linux kernel's SR-IOV and VFIO, and a real VF
plugged into a nested QEMU through vfio-pci.

A Debian kernel boots under QEMU (TCG) with an emulated Intel IOMMU and QEMU's NVMe controller as
an SR-IOV PF (tests/real_kernel/tools/run-in-guest.sh); guest-agent.sh runs the agent's binaries
inside: discovery, VF count changes, vfio-pci binding, the daemon serving the inventory, and the
kernel's own EBUSY/ERANGE/ENOENT. About 30 s.

The health test (guest-health.sh) drives the outer QEMU from here over QMP while the agent runs in
the guest: a PCIe AER error injected with pcie_aer_inject_error, the SR-IOV PF removed with
device_del while one of its VFs is allocated, then added back with device_add; then the agent
restarted on the same state directory keeps the judgement until `fpgactl health clear`. About 75 s.

The reboot test (guest-reboot.sh) boots the guest twice in one QEMU (a machine reset) with the
agent's state carried on a raw virtio-blk disk: the recorded layout, the allocation and its VF's
vfio-pci binding restored, a second PF whose restore fails reported. About 80 s.
"""
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def bin_dir():
    if os.environ.get("FPGA_AGENT_BIN_DIR"):
        return Path(os.environ["FPGA_AGENT_BIN_DIR"])
    out = subprocess.run(["swift", "build", "--show-bin-path"], cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


# Host files a nested QEMU (L2) needs inside the guest.
NESTED_QEMU_FILES = [
    "/usr/bin/qemu-system-x86_64", "/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
    "/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/kvmvapic.bin",
]


# Host files libvirtd needs inside the guest to run a nested QEMU as a domain (guest-libvirt.sh):
# the daemons and virsh (their libraries, libvirt.so.0 among them, come with them through ldd),
# the QEMU connection driver (loaded by libvirtd as a module, with its own libraries) and the CPU
# map the QEMU driver reads when it probes the emulator. The configuration is the guest script's.
LIBVIRT_PROGRAMS = [
    "/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/bin/virsh",
    "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so",
]
LIBVIRT_DATA_DIRS = ["/usr/share/libvirt/cpu_map"]


def libvirt_files():
    """LIBVIRT_PROGRAMS and every file under LIBVIRT_DATA_DIRS; (files, missing)."""
    missing = [path for path in LIBVIRT_PROGRAMS + LIBVIRT_DATA_DIRS if not os.path.exists(path)]
    files = [path for path in LIBVIRT_PROGRAMS if os.path.exists(path)]
    for directory in LIBVIRT_DATA_DIRS:
        if os.path.isdir(directory):
            files += sorted(str(f) for f in Path(directory).rglob("*") if f.is_file())
    return files, missing


def require_qemu():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): real-kernel test NOT RUN")


def prepare_guest(work, guest_script, replace=None):
    """Copies (stripped) the agent's binaries into WORK/bin, so a rebuild during the run does not
    matter, and writes the guest script pointing at them (and with `replace`'s other
    placeholders filled in); returns (binaries, script)."""
    binaries = Path(work) / "bin"
    binaries.mkdir()
    for name in ["fpga-agent", "fpgactl"]:
        source = bin_dir() / name
        target = binaries / name
        if shutil.which("strip"):
            subprocess.run(["strip", "-o", str(target), str(source)], check=True)
        else:
            shutil.copy(source, target)
    script = Path(work) / "guest.sh"
    text = (HERE / guest_script).read_text().replace("AGENT_BIN", str(binaries))
    for placeholder, value in (replace or {}).items():
        text = text.replace(placeholder, str(value))
    script.write_text(text)
    return binaries, script


def run_scenario(guest_script, extra_files=(), env_extra=None, replace=None):
    require_qemu()
    with tempfile.TemporaryDirectory(prefix="fpga-real-kernel-") as work:
        binaries, script = prepare_guest(work, guest_script, replace)
        env = dict(os.environ, MEM="1024", QEMU_TIMEOUT="600", RUN_DIR=str(Path(work) / "run"))
        env.update(env_extra or {})  # may override the defaults above (MEM, QEMU_TIMEOUT)
        result = subprocess.run(
            ["bash", str(HERE / "tools" / "run-in-guest.sh"), str(script), str(binaries / "fpga-agent"),
             str(binaries / "fpgactl"), *extra_files],
            capture_output=True, text=True, timeout=900, env=env)
        output = result.stdout
        print(output[output.find("\n== "):])
        assert result.returncode == 0, result.stderr[-3000:] + output[-3000:]
        return output


@pytest.fixture(scope="module")
def scenario():
    return run_scenario("guest-agent.sh")


@pytest.fixture(scope="module")
def nested():
    missing = [path for path in NESTED_QEMU_FILES if not os.path.exists(path)]
    if missing:
        pytest.skip(f"nested QEMU files missing ({', '.join(missing)}): nested real-VF test NOT RUN")
    return run_scenario("guest-nested-agent.sh", NESTED_QEMU_FILES)


def section(output, title):
    start = output.index("== " + title)
    end = output.find("\n== ", start + 3)
    return output[start:end if end > 0 else len(output)]


def test_discovery_finds_the_pf_by_selector(scenario):
    text = section(scenario, "discover")
    assert "IOMMU yes, vfio-pci loaded" in text
    assert "would manage 1 PF:" in text
    assert "PF 0000:01:00.0  1b36:0010  driver nvme  VFs 0/4  offset 1 stride 1  autoprobe 1" in text
    assert "RC=0" in text


def test_vf_count_changes_through_the_agent(scenario):
    two = section(scenario, "agent: set-vfs 2")
    assert "PF 0000:01:00.0 has 2 VFs" in two and "numvfs=2 autoprobe=0" in two
    three = section(scenario, "agent: set-vfs 3")
    assert "PF 0000:01:00.0 has 3 VFs" in three and "numvfs=3" in three
    five = section(scenario, "agent: set-vfs 5")
    assert "invalidArgument: PF 0000:01:00.0 supports at most 4 VFs (sriov_totalvfs); 5 asked" in five
    assert "RC=1" in five


def test_the_kernel_refuses_as_the_fake_tree_does(scenario):
    assert "Device or resource busy" in section(scenario, "kernel: raw write of 3")
    assert "Numerical result out of range" in section(scenario, "kernel: raw write of 5")
    no_driver = section(scenario, "agent: set-vfs 2 with no PF driver")
    assert "failedPrecondition: PF 0000:01:00.0 has no driver bound" in no_driver
    assert "returned ENOENT (errno 2)" in no_driver


def test_binding_to_vfio_pci(scenario):
    bind = section(scenario, "agent: bind-vfio 0000:01:00.2")
    assert "VF 0000:01:00.2 is bound to vfio-pci: /dev/vfio/" in bind
    assert "driver=vfio-pci" in bind
    assert "is not a VF" in section(scenario, "agent: bind-vfio of the PF")


def test_the_daemon_serves_the_real_inventory(scenario):
    daemon = section(scenario, "daemon on the linux platform")
    assert "0000:01:00.2  0000:01:00.0  1      1b36:0010  vfio-pci" in daemon
    assert "allocated alloc-" in daemon and "VF 0000:01:00.2" in daemon  # vfio-pci-bound first
    assert "health    SERVING" in daemon
    assert "devices   1 cards, 1 PFs, 3/4 VFs enabled, 1 allocated, 2 free" in daemon
    rescan = section(scenario, "rescan after the VFs change behind the agent")
    # The kernel's uevents made the agent rescan already: the explicit rescan finds the new
    # layout in place (or picks it up itself if the events were still on their way).
    assert "rescanned: changes found" in rescan or "rescanned: no changes" in rescan
    assert "nvme    1/4" in rescan
    assert "AGENT-EXIT=0" in rescan
    assert "END-OF-SCENARIO" in scenario


def test_a_real_vf_is_attached_to_a_nested_qemu_through_vfio_pci(nested):
    assert "VF 0000:01:00.1 is bound to vfio-pci: /dev/vfio/" in section(nested, "prepare")
    attach = section(nested, "attach")
    assert "is device alloc-" in attach and "in VM l2, root port rp1" in attach
    assert "l2  prelaunch  0/1         no          0000:01:00.1  /tmp/l2.sock" in attach
    refused = section(nested, "unbind refused while held")
    assert "VF 0000:01:00.1 is in use: /dev/vfio/" in refused and "held open by qemu-system-x86" in refused
    detach = section(nested, "detach")
    assert "left its VM" in detach
    assert "l2  prelaunch  1/1         no          -    /tmp/l2.sock" in detach
    assert "END-OF-SCENARIO" in nested


def test_reconfiguring_a_pf_whose_vf_a_nested_qemu_holds(nested):
    """detach-reattach on a hot-plugged VF: unplugged, VFs re-created, rebound, replugged; the
    dry run said so, and said that strategy pause must refuse (no pause in a stock QEMU)."""
    plan = section(nested, "reconfigure detach-reattach: dry run")
    assert "(VF 0000:01:00.1 in VM l2): kept-reattached, guest sees unplug and replug" in plan
    assert "strategy pause refuses this reconfiguration of PF 0000:01:00.0: VM l2 holds" in plan
    run = section(nested, "reconfigure detach-reattach: run")
    for step in ["2/8 [succeeded] detach", "3/8 [succeeded] write 0", "4/8 [succeeded] write 3",
                 "6/8 [succeeded] bind VF 0000:01:00.1 to vfio-pci", "7/8 [succeeded] re-attach", "8/8 [succeeded] commit"]:
        assert step in run, step
    assert "succeeded" in run.split("operation op-")[-1]
    assert "sriov_numvfs=3" in run and "driver of 0000:01:00.1: vfio-pci" in run
    assert "vfio fds of L2: 2" in run
    assert "l2  prelaunch  0/1         no          0000:01:00.1  /tmp/l2.sock" in run


def test_a_cold_plugged_holder_blocks_the_write_and_the_agent_reports_it(nested):
    """A VF on an unmanaged QEMU's command line: the dry run names it, the kernel blocks the
    write of 0, the agent keeps answering and says who holds what, and finishes once it exits."""
    plan = section(nested, "cold-plugged holder: dry run")
    assert "the kernel will block it until VF 0000:01:00.2 is released by qemu-system-x86 (pid" in plan
    blocked = section(nested, "cold-plugged holder: the write blocks")
    assert "[running] write 0 to sriov_numvfs of 0000:01:00.0" in blocked
    assert "waiting: the kernel blocks the write of 0 to sriov_numvfs of 0000:01:00.0 until its VFs are released: " \
        "VF 0000:01:00.2 held by qemu-system-x86 (pid" in blocked
    assert "health    SERVING" in blocked  # still answering while the write is blocked
    assert "agent process: State:\tS (sleeping)" in blocked
    done = section(nested, "cold-plugged holder lets go")
    assert "[succeeded] commit" in done and "operation op-" in done and "succeeded" in done.split("[succeeded] commit")[-1]
    assert "sriov_numvfs=1" in done
    assert "l2  prelaunch  0/1         no          0000:01:00.1  /tmp/l2.sock" in done
    assert "is free" in done and "AGENT-EXIT=0" in done


# ---- device health: QEMU driven over QMP while the guest script runs ---------------------------

NUMVFS_MAX = 4
# The NVMe PF exactly as run-in-guest.sh plugs it, for device_add after device_del.
NVME_PF = {"driver": "nvme", "id": "nvme0", "bus": "rp1", "serial": "deadbeef", "subsys": "subsys0",
           "sriov_max_vfs": NUMVFS_MAX, "sriov_vq_flexible": 2 * NUMVFS_MAX, "sriov_vi_flexible": NUMVFS_MAX}
# QEMU 7.2's NVMe controller has no AER capability: errors are injected into a virtio-rng-pci with
# aer=on on a second root port, which the guest binds to vfio-pci (its error handler makes the
# kernel's AER recovery send the PCI "change" uevent) and the agent manages as a PF without VFs.
HEALTH_QEMU_EXTRA = "-device pcie-root-port,id=rp2,chassis=2,slot=2 -device virtio-rng-pci,id=err0,bus=rp2,aer=on"
HEALTH_MODULES = "nvme vfio-pci vfio_iommu_type1"


class QMP:
    """A minimal QMP client: commands and their answers in order, events kept with the host time."""

    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rw")
        self.events = []
        self.greeting = json.loads(self.file.readline())
        self.execute("qmp_capabilities")

    def _read(self):
        message = json.loads(self.file.readline())
        if "event" in message:
            self.events.append((time.monotonic(), message))
        return message

    def execute(self, command, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            message = self._read()
            if "return" in message or "error" in message:
                return message

    def hmp(self, command_line):
        return self.execute("human-monitor-command", **{"command-line": command_line})

    def wait_event(self, name, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for at, event in self.events:
                if event["event"] == name:
                    return at, event
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no QMP event {name} in {timeout} s")
            self._read()

    def close(self):
        self.sock.close()


def run_health_scenario(deadline_seconds=240):
    """Boots the guest with QMP on a host socket, runs guest-health.sh, and acts on its
    HEALTH-READY-* markers: AER -> inject an error, DEL -> device_del the PF, ADD -> device_add it.
    Returns the serial output followed by a section of what the host did."""
    require_qemu()
    with tempfile.TemporaryDirectory(prefix="fpga-real-kernel-health-") as work:
        binaries, script = prepare_guest(work, "guest-health.sh")
        qmp_socket = Path(work) / "qmp.sock"
        env = dict(os.environ, MEM="1024", QEMU_TIMEOUT=str(deadline_seconds), RUN_DIR=str(Path(work) / "run"),
                   QMP_SOCKET=str(qmp_socket), NUMVFS_MAX=str(NUMVFS_MAX), MODULES=HEALTH_MODULES,
                   QEMU_EXTRA=HEALTH_QEMU_EXTRA)
        stderr = open(Path(work) / "run-in-guest.err", "w+")
        guest = subprocess.Popen(
            ["bash", str(HERE / "tools" / "run-in-guest.sh"), str(script), str(binaries / "fpga-agent"),
             str(binaries / "fpgactl")],
            stdout=subprocess.PIPE, stderr=stderr, text=True, errors="replace", env=env, start_new_session=True)
        lines = queue.Queue()

        def pump():
            for line in guest.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        output, host, qmp = [], [], None
        started = time.monotonic()

        def note(text):
            host.append(f"[host {time.monotonic() - started:7.3f}s] {text}")

        try:
            while True:
                remaining = deadline_seconds + 30 - (time.monotonic() - started)
                line = lines.get(timeout=max(1, remaining))
                if line is None:
                    break
                output.append(line)
                marker = re.search(r"HEALTH-READY-(AER|DEL|ADD)", line)
                if not marker:
                    continue
                if qmp is None:
                    qmp = QMP(qmp_socket)
                    note(f"QMP connected: QEMU {qmp.greeting['QMP']['version']['qemu']}")
                if marker.group(1) == "AER":
                    answer = qmp.hmp("pcie_aer_inject_error err0 POISON_TLP")
                    note(f"pcie_aer_inject_error err0 POISON_TLP -> {answer}")
                elif marker.group(1) == "DEL":
                    sent = time.monotonic()
                    note(f"device_del nvme0 -> {qmp.execute('device_del', id='nvme0')}")
                    at, event = qmp.wait_event("DEVICE_DELETED")
                    note(f"DEVICE_DELETED {event['data']} {1000 * (at - sent):.0f} ms after device_del")
                else:
                    note(f"device_add {json.dumps(NVME_PF)} -> {qmp.execute('device_add', **NVME_PF)}")
        finally:
            if qmp is not None:
                qmp.close()
            try:
                guest.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(guest.pid, signal.SIGKILL)  # run-in-guest.sh and its QEMU (own session)
                guest.wait()
        text = "".join(output) + "\n== host\n" + "\n".join(host) + "\n"
        print(text[text.find("\n== "):])
        stderr.seek(0)
        errors = stderr.read()
        stderr.close()
        assert guest.returncode == 0, errors[-3000:] + text[-3000:]
        return text


@pytest.fixture(scope="module")
def health():
    return run_health_scenario()


def delays(text):
    return {name: int(value) for name, value in re.findall(r"^delay (.+): (-?\d+) ms$", text, re.M)}


def assert_prompt(text, event, watched):
    """The done-criterion of issue 16: the kernel's uevent, not the periodic rescan (every 30 s),
    brings the change in: the agent's rescan and a watching client have it about a second after
    the kernel, a polling `fpgactl status` (1-2 s per call under TCG) a few seconds after. The
    bounds stay well under the 30 s period, with room for a loaded 2-core machine (seen: 6.4 s
    for the polled status while other guests and builds ran)."""
    measured = delays(text)
    assert 0 <= measured[f"{event} -> agent rescan applied it"] <= 10000, measured
    assert 0 <= measured[f"{event} -> watch delta '{watched}'"] <= 10000, measured
    assert 0 <= measured[f"{event} -> fpgactl status shows it"] <= 20000, measured


def test_an_injected_aer_error_marks_the_function_unhealthy(health):
    setup = section(health, "setup")
    assert re.search(r"_OSC: OS now controls \[[^]]*\bAER\b", setup)  # native AER, no kernel parameter
    assert "0000:01:00.0 0x1b36:0x0010 driver=nvme aer_files=0" in setup  # QEMU 7.2's NVMe: no AER
    assert "0000:02:00.0 0x1af4:0x1044 driver=vfio-pci aer_files=3 devctl=0x000f" in setup
    assert "pcie_aer_inject_error err0 POISON_TLP -> {'return': 'OK id: err0" in section(health, "host")
    aer = section(health, "uncorrectable non-fatal error injected")
    assert "AER: Uncorrected (Non-Fatal) error message received from 0000:02:00.0" in aer
    assert "kernel counted it: TOTAL_ERR_NONFATAL 1" in aer
    assert re.search(r"problem +PF 0000:02:00\.0 is unhealthy since \S+: aer-nonfatal: 1 uncorrectable non-fatal error \(AER\)",
                     aer), aer
    assert re.search(r"^0000:02:00\.0 +card-0000:02 +1af4:1044 +vfio-pci .* unhealthy$", aer, re.M)  # HEALTH column
    assert "0000:02:00.0 unhealthy: aer-nonfatal: 1 uncorrectable non-fatal error (AER)" in aer
    assert "uevent fpga.action=change fpga.device=0000:02:00.0" in aer  # AER recovery's uevent woke the agent
    assert aer.rstrip().endswith("RC=1")  # allocate --pf of the unhealthy function: refused
    assert_prompt(aer, "AER error", "PF 0000:02:00.0 updated")
    # After the error the kernel reads LNKCAP as 0 and says max_link_width 255 (its
    # PCIE_LNK_WIDTH_UNKNOWN) and max_link_speed "Unknown": an unknown maximum, not a degraded link.
    assert "of x255" not in aer, "max_link_width 255 (PCIE_LNK_WIDTH_UNKNOWN) reported as a degraded link:\n" + aer


def test_a_removed_pf_ends_its_allocation_and_the_agent_keeps_serving(health):
    assert re.search(r"DEVICE_DELETED \{'device': 'nvme0'", section(health, "host"))
    removed = section(health, "PF 0000:01:00.0 removed")
    assert "gone from sysfs at" in removed
    assert re.search(r"problem +PF 0000:01:00\.0 is gone from the PCI bus since \S+: its VFs and their allocations ended",
                     removed)
    assert "RC=1" not in removed and removed.count("RC=0") == 3  # status, inventory, status: still serving
    assert "PF 0000:01:00.0 removed" in removed  # watch delta
    assert_prompt(removed, "PF removal", "PF 0000:01:00.0 removed")
    # The allocation held on one of its VFs ended, with the reason, in the inventory.
    allocated = re.search(r"^allocation: (alloc-[0-9a-f]+) of VF (0000:01:00\.[1-4])$", section(health, "setup"), re.M)
    assert allocated, "no VF of the NVMe PF could be allocated:\n" + section(health, "setup")
    allocation, vf = allocated.groups()
    ended = re.search(rf"^{allocation} +health-test +{re.escape(vf)} +\S+ +(.*)$", removed, re.M)  # ENDED table
    assert ended, removed
    assert ended.group(1) == f"PF 0000:01:00.0 is gone from the PCI bus (surprise removal or hot-unplug); VF {vf} went with it"
    assert f"allocation {allocation} ended" in removed


def test_the_pf_added_back_is_managed_again(health):
    added = section(health, "PF 0000:01:00.0 added back")
    assert "back in sysfs at" in added and "driver=nvme sriov_totalvfs=4" in added
    assert "not enumerated by hotplug" not in added  # ACPI hotplug enumerated it
    assert not re.search(r"problem +PF 0000:01:00\.0 is gone", added)  # (the ENDED table keeps its history)
    assert re.search(r"^0000:01:00\.0 +card-0000:01 +1b36:0010 +nvme +0/4 .* healthy$", added, re.M)
    assert_prompt(added, "PF added", "PF 0000:01:00.0 updated")
    # Managed again: VFs enabled through the agent, one allocated.
    assert "[succeeded] commit" in added and "sriov_numvfs=2" in added, added
    assert re.search(r"allocated alloc-[0-9a-f]+: VF 0000:01:00\.[12]", added), added
    assert "AGENT-EXIT=0" in section(health, "end") and "END-OF-SCENARIO" in health


def test_an_unhealthy_function_stays_so_across_an_agent_restart_until_cleared(health):
    """Issue 23: the judgement and its counter baseline are kept in the state directory; the
    restarted agent reads the same kernel counters (TOTAL_ERR_NONFATAL 1) and keeps the PF
    unhealthy, with the same reason and since, until `fpgactl health clear` (audited)."""
    restarted = section(health, "agent restarted on the same state directory")
    assert "AGENT-EXIT=0" in restarted and "TOTAL_ERR_NONFATAL 1" in restarted
    assert "judgement kept: same line" in restarted, restarted
    assert re.search(r"problem +PF 0000:02:00\.0 is unhealthy since \S+: aer-nonfatal: 1 uncorrectable non-fatal error \(AER\)",
                     restarted), restarted
    assert re.search(r"^health +DEGRADED$", restarted, re.M), restarted
    # fpgactl health: the PF and its reason.
    assert re.search(r"^0000:02:00\.0 +unhealthy +\d{4}-\d\d-\d\dT\S+ +aer-nonfatal: 1 uncorrectable non-fatal error \(AER\)$", restarted,
                     re.M), restarted
    assert "aer-history" not in restarted  # not taken for errors from before the agent first saw it
    # Still refused (it has no VFs either: QEMU 7.2 has no SR-IOV model with AER; see README.md).
    assert restarted.rstrip().endswith("RC=1") and "RESOURCE_EXHAUSTED" in restarted.split("allocate")[-1]
    cleared = section(health, "health clear of 0000:02:00.0")
    reason = "poisoned TLP injected by the real-kernel test"
    assert re.search(r"^cleared 0000:02:00\.0: healthy \(revision \d+\)$", cleared, re.M), cleared
    audit = [line for line in cleared.splitlines() if "ClearDeviceHealth" in line]
    assert audit and reason in audit[-1] and "0000:02:00.0" in audit[-1], cleared
    assert "every device is healthy" in cleared, cleared
    assert not re.search(r"problem +PF 0000:02:00\.0", cleared) and re.search(r"^health +SERVING$", cleared, re.M), cleared
    assert re.search(r"^0000:02:00\.0 +card-0000:02 +1af4:1044 +vfio-pci .* healthy$", cleared, re.M), cleared
    assert "RC=1" not in cleared, cleared


# --- DRA on a real kernel (issue 17) -------------------------------------------------------------

DRA_DRIVER = "qdma.xilinx.com"
DRA_VF = "0000:01:00.1"
DRA_MODULES = "nvme vfio-pci vfio_iommu_type1 virtio_pci virtio_net"
# QEMU's user network: the guest reaches the host's loopback at 10.0.2.2 (the fake API server).
DRA_QEMU_EXTRA = "-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile="


def dra_claim(uid, vf=DRA_VF):
    """A ResourceClaim the scheduler allocated: VF `vf` (0000:01:00.1) of the guest's pool."""
    device = "vf-" + vf.replace(":", "-").replace(".", "-")
    return {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": "vf-claim", "namespace": "default", "uid": uid},
        "spec": {"devices": {"requests": [
            {"name": "vf", "exactly": {"deviceClassName": "qdma-vf", "allocationMode": "ExactCount", "count": 1}}]}},
        "status": {
            "allocation": {
                "devices": {"results": [{"request": "vf", "device": device, "driver": DRA_DRIVER, "pool": "guest"}]},
                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": ["guest"]}]}]},
                "allocationTimestamp": "2026-11-30T12:00:00Z",
            },
            "reservedFor": [{"resource": "pods", "name": "vf-claim-pod", "uid": str(uuid.uuid4())}],
        },
    }


@pytest.fixture(scope="module")
def dra():
    """Runs guest-dra.sh against the fake API server; returns (output, the slices seen, the fake)."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "interop"))
    from fake_kube_api import FakeKubeAPI

    missing = [path for path in NESTED_QEMU_FILES if not os.path.exists(path)]
    if missing:
        pytest.skip(f"nested QEMU files missing ({', '.join(missing)}): real-kernel DRA test NOT RUN")
    with tempfile.TemporaryDirectory(prefix="fpga-real-kernel-dra-") as directory:
        api = FakeKubeAPI(directory, node="guest", driver=DRA_DRIVER).start()
        uid = str(uuid.uuid4())
        api.put_claim(dra_claim(uid))
        seen, stop = {}, threading.Event()

        def watch():  # the pool as the API server holds it, while the guest runs
            while not stop.wait(0.5):
                for obj in api.slice_list():
                    for device in obj["spec"].get("devices", []):
                        seen[device["name"]] = device

        threading.Thread(target=watch, daemon=True).start()
        try:
            output = run_scenario(
                "guest-dra.sh", [str(api.token_file), str(api.ca_file), *NESTED_QEMU_FILES],
                env_extra={"MODULES": DRA_MODULES, "QEMU_EXTRA": DRA_QEMU_EXTRA},
                replace={"API_PORT": api.port, "TOKEN_FILE": api.token_file, "CA_FILE": api.ca_file, "CLAIM_UID": uid})
        finally:
            stop.set()
            api.stop()
        return output, seen, api, uid


def test_dra_slices_from_a_real_kernel(dra):
    output, seen, api, _ = dra
    assert "DRA-SERVING" in output
    assert re.search(r"^type +DRAPlugin$", output, re.M) and re.search(r"^name +qdma\.xilinx\.com$", output, re.M)
    assert re.search(r"^versions +v1\.DRAPlugin, v1beta1\.DRAPlugin", output, re.M)
    assert not api.problems, api.problems  # every stored slice passed kubernetes-validate --strict and the limits
    assert not api.unauthorized, api.unauthorized
    device = seen.get("vf-0000-01-00-1")
    assert device, f"VF {DRA_VF} never published: {sorted(seen)}"
    attributes = device["attributes"]
    assert attributes["resource.kubernetes.io/pciBusID"] == {"string": DRA_VF}
    group = re.search(r"kernel group=(\d+)", output)
    assert group, output[-3000:]
    values = {key: next(iter(value.values())) for key, value in attributes.items()}
    assert str(values.get(f"{DRA_DRIVER}/iommuGroup")) == group.group(1), attributes
    assert values.get(f"{DRA_DRIVER}/pf") == "0000:01:00.0", attributes


def test_dra_prepare_binds_vfio_and_the_cdi_spec_names_the_real_group(dra):
    output, _, api, uid = dra
    prepared = section(output, "prepare the claim")
    assert f"prepared default/vf-claim ({uid})" in prepared, prepared
    assert re.search(rf"vf: guest/vf-0000-01-00-1 cdi k8s\.{re.escape(DRA_DRIVER)}/vf={uid}-vf-0000-01-00-1", prepared)
    named = section(output, "what the spec names")
    found = re.search(r"spec BDF=(\S+) group=(\d+); kernel group=(\d+) driver=(\S+)", named)
    assert found, named
    assert found.groups() == (DRA_VF, found.group(3), found.group(3), "vfio-pci")
    assert f"metadata names {DRA_VF}" in named
    assert "DRA-FAIL" not in output, output[output.find("DRA-FAIL") - 3000:]
    # The agent fetched the claim over TLS with the token.
    assert any(m == "GET" and p.endswith("/namespaces/default/resourceclaims/vf-claim") for _, m, p, _ in api.log)


def test_dra_claim_status_names_the_real_vf_then_is_withdrawn(dra):
    output, _, api, _ = dra
    applies = [sent for (claim, manager, sent) in api.applied if claim == ("default", "vf-claim") and manager == DRA_DRIVER]
    assert len(applies) == 2 and applies[1] == [], f"want the report at prepare and its withdrawal at unprepare: {applies}"
    (entry,) = applies[0]
    group = re.search(r"kernel group=(\d+)", output).group(1)
    assert (entry["driver"], entry["pool"], entry["device"]) == (DRA_DRIVER, "guest", "vf-0000-01-00-1")
    assert entry["data"]["pciBusID"] == DRA_VF and entry["data"]["vfioDevice"] == f"/dev/vfio/{group}", entry
    assert entry["conditions"][0]["type"] == "Ready" and entry["conditions"][0]["status"] == "True"
    assert api.device_status("default", "vf-claim") == []
    assert not api.problems, api.problems  # every apply passed the API server's checks


def test_dra_nested_qemu_opens_the_prepared_vf(dra):
    output, _, _, _ = dra
    nested = section(output, "L2 QEMU opens the VF")
    held = re.search(r"L2 holds /dev/vfio/(\d+): (\d+) fd", nested)
    assert held and int(held.group(2)) >= 1, nested


def test_dra_unprepare_releases_and_a_stale_prepare_is_refused(dra):
    output, _, _, uid = dra
    unprepared = section(output, "unprepare")
    assert f"unprepared default/vf-claim ({uid})" in unprepared and "RC=0" in unprepared
    assert "CDI specs left: 0; metadata left: 0" in unprepared
    assert f"claim:default/vf-claim/{uid}" not in unprepared  # the allocation is gone from the inventory
    stale = section(output, "a stale prepare")
    assert "RC=1" in stale, stale
    unknown = section(output, "unprepare of an unknown claim")
    assert "RC=0" in unknown
    assert "DRA-DONE" in output and "agent exit 0" in output


# --- layouts across a host reboot (issue 23) -----------------------------------------------------

# A second SR-IOV PF (nvme1, 0000:02:00.0) whose restore fails, a raw disk (virtio-blk, /dev/vda
# in the guest) that carries the agent's state directory from one boot to the next, and the user
# network to the host's fake API server (the agent is the node's DRA driver too).
REBOOT_MODULES = "nvme vfio-pci vfio_iommu_type1 virtio_pci virtio_blk virtio_net"
REBOOT_PF2 = ("-device pcie-root-port,id=rp2,chassis=2,slot=2 -device nvme-subsys,id=subsys1 "
              f"-device nvme,id=nvme1,bus=rp2,serial=cafe0001,subsys=subsys1,sriov_max_vfs={NUMVFS_MAX},"
              f"sriov_vq_flexible={2 * NUMVFS_MAX},sriov_vi_flexible={NUMVFS_MAX}")
REBOOT_CLAIM_VF = "0000:01:00.2"


@pytest.fixture(scope="module")
def reboot():
    """Runs guest-reboot.sh in a guest that reboots once (REBOOT=1: the first boot ends with
    `reboot -f`, QEMU resets the machine and boots it again) with the agent's state carried on a
    raw disk; returns the serial output of the first boot and of the second, the fake API server
    and the claim's uid."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "interop"))
    from fake_kube_api import FakeKubeAPI

    require_qemu()
    with tempfile.TemporaryDirectory(prefix="fpga-real-kernel-reboot-") as work:
        disk = Path(work) / "state.img"
        with open(disk, "wb") as image:
            image.truncate(16 << 20)
        api = FakeKubeAPI(work, node="guest", driver=DRA_DRIVER).start()
        uid = str(uuid.uuid4())
        api.put_claim(dra_claim(uid, REBOOT_CLAIM_VF))
        extra = (f"-drive file={disk},format=raw,if=none,id=state0 -device virtio-blk-pci,drive=state0 "
                 f"{DRA_QEMU_EXTRA} {REBOOT_PF2}")
        try:
            output = run_scenario(
                "guest-reboot.sh", [str(api.token_file), str(api.ca_file)],
                env_extra={"MODULES": REBOOT_MODULES, "QEMU_EXTRA": extra, "REBOOT": "1"},
                replace={"API_PORT": api.port, "TOKEN_FILE": api.token_file, "CA_FILE": api.ca_file, "CLAIM_UID": uid})
        finally:
            api.stop()
        assert "== boot (second)" in output, output[-3000:]
        split = output.index("== boot (second)")
        return output[:split], output[split:], api, uid


def layout_restored(text):
    """The requests of the LayoutRestored entries of the audit trail (STATE_DIR/audit.log, JSON
    lines) in `text`, by PF, with the entry's status."""
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{") and "LayoutRestored" in line]
    return {entry["request"]["pfBdf"]: dict(entry["request"], status=entry["status"])
            for entry in entries if entry.get("rpc") == "LayoutRestored" and entry.get("identity") == "agent"}


def boot_id(output):
    return re.search(r"^boot_id (\S+)$", output, re.M).group(1)


def test_the_first_boot_records_the_layout_and_the_allocations(reboot):
    first, _, api, uid = reboot
    assert "REBOOT-FAIL" not in first, first[first.find("REBOOT-FAIL") - 3000:]
    assert section(first, "first boot: agent").count("[succeeded] commit") == 2, first
    allocated = re.search(r"^allocation: alloc-[0-9a-f]+ of VF (0000:01:00\.1)$", first, re.M)
    assert allocated, first
    text = section(first, "first boot: the other VF allocated")
    assert re.search(rf"^  VF {re.escape(allocated.group(1))} driver=vfio-pci group=\d+$", text, re.M), text
    assert re.search(r"^0000:01:00\.0 driver=nvme sriov_numvfs=2$", text, re.M)
    assert re.search(r"^0000:02:00\.0 driver=nvme sriov_numvfs=1$", text, re.M)
    assert "AGENT-EXIT=0" in text
    claim = section(first, "first boot: the DRA claim prepared")
    assert f"prepared default/vf-claim ({uid})" in claim and "RC=0" in claim, claim
    spec = re.search(r"BDF=(\S+) group=(\d+); kernel group=(\d+) driver=(\S+)", claim)
    assert spec and spec.groups() == (REBOOT_CLAIM_VF, spec.group(3), spec.group(3), "vfio-pci"), claim
    saved = section(first, "state onto /dev/vda, then reboot")
    assert re.search(r"state saved: .*state/state\.sqlite", saved), saved
    assert not api.problems and not api.unauthorized, (api.problems, api.unauthorized)


def test_after_a_reboot_the_pf_gets_its_vfs_back_and_the_allocations_their_vfs(reboot):
    first, second, _, uid = reboot
    assert "REBOOT-FAIL" not in second, second[second.find("REBOOT-FAIL") - 3000:]
    allocation, vf = re.search(r"^allocation: (alloc-[0-9a-f]+) of VF (\S+)$", first, re.M).groups()
    old, new = boot_id(first), boot_id(second)
    assert old != new
    found = section(second, "second boot")
    assert f"first boot: allocation {allocation} of VF {vf}; claim on VF {REBOOT_CLAIM_VF}" in found, found
    assert re.search(r"^0000:01:00\.0 driver=nvme sriov_numvfs=0$", found, re.M), found  # as the kernel booted
    after = section(second, "after the restore")
    # The kernel: 2 VFs again, both allocated VFs on vfio-pci, the fpgactl one with its /dev/vfio/N.
    assert re.search(r"^0000:01:00\.0 driver=nvme sriov_numvfs=2$", after, re.M), after
    assert re.search(rf"^  VF {re.escape(REBOOT_CLAIM_VF)} driver=vfio-pci group=\d+$", after, re.M), after
    bound = re.search(rf"^allocated VF {re.escape(vf)}: driver=vfio-pci group=(\d+) (.*)$", after, re.M)
    assert bound and bound.group(2).startswith("crw") and f"/dev/vfio/{bound.group(1)}" in bound.group(2), after
    # The agent: the same allocations on the same VFs, the boot and restore rows, the finding.
    assert re.search(rf"^{allocation} +{re.escape(vf)} +0000:01:00\.0 +reboot-test ", after, re.M), after
    assert re.search(rf"^alloc-[0-9a-f]+ +{re.escape(REBOOT_CLAIM_VF)} +0000:01:00\.0 +claim:default/vf-claim/{uid} ",
                     after, re.M), after
    assert re.search(rf"^{re.escape(vf)} +0000:01:00\.0 .* vfio-pci .*{allocation}", after, re.M), after
    assert re.search(rf"^boot +host rebooted before this start \(boot {new}\); layout restore on$", after, re.M), after
    restored = re.search(r"^restore +PF 0000:01:00\.0 restored 2 VFs \(found 0\), 2 allocations kept, 2 bound to vfio-pci, "
                         r"(op-[0-9a-f]+)$", after, re.M)
    assert restored, after
    assert f"the host rebooted since the last run (boot id {old} → {new}): PF 0000:01:00.0 restored to 2 VFs (found 0), " \
           f"2 allocations kept, 2 VFs bound to vfio-pci ({restored.group(1)})" in after, after
    operation = after[after.index(f"operation: {restored.group(1)}"):]
    assert f"operation {restored.group(1)} (restore 0000:01:00.0, started by agent): succeeded" in operation, operation
    assert "[succeeded] commit" in operation, operation
    for bound_vf in (vf, REBOOT_CLAIM_VF):
        assert f"[succeeded] bind VF {bound_vf} to vfio-pci" in operation, operation
    assert {"pfBdf": "0000:01:00.0", "result": "restored", "allocationsKept": 2, "vfsBound": 2,
            "operationId": restored.group(1)}.items() <= layout_restored(after)["0000:01:00.0"].items(), after


def test_after_a_reboot_the_kubelet_prepares_the_claim_again_on_the_same_vf(reboot):
    """The CDI folder is a tmpfs on a real host (/var/run/cdi): gone after the reboot. The agent
    writes the prepared claim's spec again at its start, and the kubelet's prepare of the claim
    again answers with it: it names the same VF and, from the kernel, its IOMMU group, which is
    the group it had before the reboot."""
    first, second, api, uid = reboot
    before = re.search(r"claim on VF (\S+), group (\d+)", section(second, "second boot")).groups()
    again = section(second, "the kubelet prepares the claim again")
    assert f"prepared default/vf-claim ({uid})" in again and "RC=0" in again, again
    assert re.search(rf"vf: guest/vf-0000-01-00-2 cdi k8s\.{re.escape(DRA_DRIVER)}/vf={uid}-vf-0000-01-00-2", again), again
    specs = re.findall(r"BDF=(\S+) group=(\d+); kernel group=(\d+) driver=(\S+)", again)
    assert specs and all(spec == (before[0], before[1], before[1], "vfio-pci") for spec in specs), (before, again)
    assert not api.problems and not api.unauthorized, (api.problems, api.unauthorized)


def test_a_pf_whose_restore_fails_is_reported_while_the_other_is_restored(reboot):
    _, second, _, _ = reboot
    after = section(second, "after the restore")
    assert re.search(r"^restore +PF 0000:02:00\.0 failed: 0 of 1 VFs \(PF 0000:02:00\.0 has no driver bound", after, re.M), after
    assert re.search(r"^problem +.*0000:02:00\.0", after, re.M), after
    assert "PF 0000:02:00.0 could not be restored to 1 VFs: PF 0000:02:00.0 has no driver bound" in after, after
    assert re.search(r"^0000:02:00\.0 driver=none sriov_numvfs=0$", after, re.M), after
    assert layout_restored(after)["0000:02:00.0"]["result"] == "failed", after
    assert "health    SERVING" in after or "health    DEGRADED" in after  # still serving


def test_with_restore_on_boot_off_the_pf_stays_as_found_and_the_allocations_end(reboot):
    first, second, _, uid = reboot
    allocation, vf = re.search(r"^allocation: (alloc-[0-9a-f]+) of VF (\S+)$", first, re.M).groups()
    off = section(second, "another boot with layout.restore_on_boot=false")
    assert re.search(r"^boot +host rebooted before this start \(boot \S+\); layout restore off$", off, re.M), off
    assert re.search(r"^restore +PF 0000:01:00\.0 skipped: 0 of 2 VFs \(layout\.restore_on_boot is off\)$", off, re.M), off
    assert re.search(r"^0000:01:00\.0 driver=nvme sriov_numvfs=0$", off, re.M), off
    assert f"allocation {allocation} (owner reboot-test) was on VF {vf}, which no longer exists: ended" in off, off
    assert f"(owner claim:default/vf-claim/{uid}) was on VF {REBOOT_CLAIM_VF}, which no longer exists: ended" in off, off
    assert off.count("AGENT-EXIT=0") == 2 and "END-OF-SCENARIO" in second
