"""QEMU's VFIO pause and resume (qemu/vfio-pause) with a real VF, in the nested real-kernel guest.

The guest (L1, a Debian kernel under QEMU TCG with an emulated IOMMU and an NVMe SR-IOV PF, see
test_real_kernel.py) runs guest-vfio-pause.sh: a nested QEMU (L2) built by
scripts/build-qemu-vfio-pause holds VF 0000:01:00.1 through vfio-pci.

- direct: the VF cold-plugged on L2's command line (its BARs assigned by L2's firmware), then
  x-vfio-pause, the PF's VFs removed and re-created underneath, x-vfio-resume;
- agent: the agent in L1 hot-plugs the VF into L2 and reconfigures the PF 2 -> 3 with strategy
  pause.

About 2-3 minutes. Needs the patched QEMU: built (or reused from the cache) by the build script,
or given with QEMU_VFIO_PAUSE_BIN.
"""
import json
import os
import re
import subprocess

import pytest

from test_real_kernel import ROOT, run_scenario, section

FIRMWARE = ["/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/kvmvapic.bin"]
VF = "0000:01:00.1"


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


@pytest.fixture(scope="module")
def paused():
    missing = [path for path in FIRMWARE if not os.path.exists(path)]
    if missing:
        pytest.skip(f"L2 firmware missing ({', '.join(missing)}): VFIO pause test NOT RUN")
    qemu = patched_qemu()
    return run_scenario("guest-vfio-pause.sh", [qemu, *FIRMWARE], replace={"PAUSE_QEMU": qemu})


def answers(text):
    """[(command, arguments, answer)] for every `qmp` call the guest script made in TEXT."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("QMP> "):
            command, _, arguments = line[5:].partition(" ")
            answer = next((json.loads(l) for l in lines[i + 1:i + 3] if l.startswith("{")), None)
            out.append((command, arguments.strip(), answer))
    return out


def answer(text, command, arguments=None, index=0):
    found = [a for c, args, a in answers(text) if c == command and (arguments is None or args == arguments)]
    assert len(found) > index, f"no answer to {command} {arguments or ''} (#{index}) in:\n{text}"
    return found[index]


def events(text):
    start, end = text.index("EVENTS-BEGIN"), text.index("EVENTS-END")
    return [json.loads(l)["event"] for l in text[start:end].splitlines() if l.startswith("{")]


def device(query_pci, qdev_id):
    for bus in query_pci["return"]:
        for dev in bus["devices"]:
            for d in [dev] + dev.get("pci_bridge", {}).get("devices", []):
                if d.get("qdev_id") == qdev_id:
                    return d
    return None


def where(d):
    return (d["bus"], d["slot"], d["function"], d["qdev_id"], [(r["bar"], r["address"], r["size"]) for r in d["regions"]])


def test_the_patched_qemu_offers_pause_and_refuses_what_it_cannot_pause(paused):
    text = section(paused, "direct: L2 with the VF cold-plugged")
    assert '"name": "x-vfio-pause"' in text and '"name": "x-vfio-resume"' in text
    errors = section(paused, "direct: errors")
    assert answer(errors, "x-vfio-pause")["error"] == {"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"}
    assert answer(errors, "x-vfio-pause", '{"id": "rp1"}')["error"]["desc"] == "Device 'rp1' is not a vfio-pci device"
    assert answer(errors, "x-vfio-resume", '{"id": "rp1"}')["error"]["desc"] == "Device 'rp1' is not a vfio-pci device"


def test_pause_releases_the_vf_and_the_kernel_removes_it_without_a_device_request(paused):
    before = section(paused, "direct: L2 with the VF cold-plugged")
    assert "vfio fds of L2: 2" in before  # the group and the device
    pause = section(paused, "direct: pause")
    assert answer(pause, "x-vfio-pause", index=0) == {"return": {}, "id": answer(pause, "x-vfio-pause", index=0)["id"]}
    assert "return" in answer(pause, "x-vfio-pause", index=1)  # pausing a paused device succeeds
    assert "paused: vfio fds of L2: 0" in pause
    recreate = section(paused, "direct: the VFs re-created")
    assert re.search(r"write 0 rc=0 from", recreate)
    assert "relayed device requests during the write: 0" in recreate


def test_guest_accesses_trap_while_paused_and_reach_the_new_vf_after_resume(paused):
    before = section(paused, "direct: L2 with the VF cold-plugged")
    match = re.search(r"BAR0 of vf0 at (\d+)", before)
    assert match, before
    def words(text):
        out = answer(text, "human-monitor-command")["return"]
        return out.split(":", 1)[1].split()
    running = words(before)
    assert running != ["0xffffffff", "0xffffffff"], running  # the NVMe VF's CAP register
    assert words(section(paused, "direct: pause")) == ["0xffffffff", "0xffffffff"]  # reads all ones
    assert words(section(paused, "direct: resume")) == running


def test_resume_fails_cleanly_while_the_vf_is_missing_or_not_bound_to_vfio_pci(paused):
    recreate = section(paused, "direct: the VFs re-created")
    missing = answer(recreate, "x-vfio-resume", index=0)["error"]["desc"]
    assert "host device /sys/bus/pci/devices/0000:01:00.1 is missing; the device stays paused" in missing, missing
    unbound = answer(recreate, "x-vfio-resume", index=1)["error"]["desc"]
    assert "cannot resume from /sys/bus/pci/devices/0000:01:00.1; the device stays paused" in unbound, unbound
    assert f"VF {VF} is bound to vfio-pci" in recreate


def test_resume_takes_the_new_vf_and_the_guest_keeps_its_device(paused):
    before = section(paused, "direct: L2 with the VF cold-plugged")
    old_group = re.search(r"group of 0000:01:00.1: (\d+)", section(paused, "prepare")).group(1)
    recreate = section(paused, "direct: the VFs re-created")
    new_group = re.search(r"group of 0000:01:00.1: (\d+)", recreate).group(1)
    resume = section(paused, "direct: resume")
    assert "return" in answer(resume, "x-vfio-resume", index=0)
    assert "return" in answer(resume, "x-vfio-resume", index=1)  # resuming a running device succeeds
    assert "resumed: vfio fds of L2: 2" in resume
    assert f"fd -> /dev/vfio/{new_group}" in resume
    vf0 = [device(answer(text, "query-pci"), "vf0") for text in (before, section(paused, "direct: pause"), resume)]
    assert vf0[0] is not None and vf0[0]["bus"] == 1
    assert where(vf0[0]) == where(vf0[1]) == where(vf0[2])
    assert events(resume) == ["VFIO_DEVICE_PAUSED", "VFIO_DEVICE_RESUMED"]  # once each; no DEVICE_DELETED
    assert old_group  # recorded for the report
    assert "SHUTDOWN" not in resume


def test_the_agent_reconfigures_under_a_paused_device(paused):
    attach = section(paused, "agent: L2 with an empty root port")
    assert "is device alloc-" in attach and "in VM l2, root port rp1" in attach
    plan = section(paused, "agent: reconfigure 2 -> 3")
    assert "kept-paused" in plan
    steps = plan.split("RC=", 1)[1]  # the real run, after the dry run
    for step in ["[succeeded] pause device alloc-", "[succeeded] write 0", "[succeeded] write 3",
                 "[succeeded] resume device alloc-", "[succeeded] commit"]:
        assert step in steps, step
    assert "[succeeded] detach" not in steps and "re-attach" not in steps
    assert "sriov_numvfs=3" in plan
    assert "relayed device requests during the operation: 0" in plan
    # L2 held no fd of the VF while paused (the kernel's write of 0 alone takes about 1 s)
    assert int(re.search(r"paused samples without vfio fds: (\d+)", plan).group(1)) > 0
    new_group = re.search(r"group of 0000:01:00.1: (\d+)", plan).group(1)
    assert f"fd -> /dev/vfio/{new_group}" in plan
    assert "resumed: vfio fds of L2: 2" in plan
    old = device(answer(attach, "query-pci"), next(iter(re.findall(r"(alloc-[0-9a-f]+)", attach))))
    new = device(answer(plan, "query-pci"), old["qdev_id"]) if old else None
    assert old is not None and new is not None and where(old)[:4] == where(new)[:4]
    assert events(plan) == ["VFIO_DEVICE_PAUSED", "VFIO_DEVICE_RESUMED"]  # no DEVICE_DELETED
    assert "END-OF-SCENARIO" in paused
    alloc = re.findall(r"(alloc-[0-9a-f]+)", attach)[0]
    assert re.search(alloc + r"\s.*\spaused \(op-[0-9a-f]+\)", plan), plan  # LAST RE-LAYOUT


def test_a_sigkill_while_paused_is_rolled_forward_and_the_guest_keeps_its_device(paused):
    text = section(paused, "agent: SIGKILL while the device is paused")
    assert "AGENT-KILLED=137" in text
    # Killed with the device paused: L2 held no fd of the VF, the resume had not happened.
    assert re.search(r"killed: paused 1 resumed 0, vfio fds of L2: 0", text), text
    assert "was unfinished at start-up: rolling forward" in text
    watch = text
    assert "[succeeded] resume device alloc-" in watch and "[succeeded] commit" in watch
    assert "[failed]" not in watch
    assert "after the restart: paused 1 resumed 1" in text
    assert "sriov_numvfs=2" in text
    new_group = re.search(r"group of 0000:01:00.1: (\d+)", text).group(1)
    assert f"fd -> /dev/vfio/{new_group}" in text and "resumed: vfio fds of L2: 2" in text
    alloc = re.findall(r"(alloc-[0-9a-f]+)", section(paused, "agent: L2 with an empty root port"))[0]
    before = device(answer(section(paused, "agent: L2 with an empty root port"), "query-pci"), alloc)
    after = device(answer(text, "query-pci"), alloc)
    assert before is not None and after is not None and where(before)[:4] == where(after)[:4]


def test_a_refused_resume_falls_back_to_a_replug_of_that_device(paused):
    text = section(paused, "agent: a refused resume falls back")
    assert "injected crash before step" in text and "(resume)" in text
    assert "crashed: paused 1 resumed 0" in text
    assert "unbound 0000:01:00.1 from vfio-pci rc=0" in text
    # QEMU refused the resume (the VF is not bound to vfio-pci); the agent replugged that device.
    assert re.search(r"\[failed\] resume device alloc-\S+.*cannot resume from /sys/bus/pci/devices/0000:01:00.1", text), text
    for step in ["[succeeded] fall back: detach alloc-", "[succeeded] fall back: bind VF 0000:01:00.1",
                 "[succeeded] fall back: re-attach alloc-", "[succeeded] commit"]:
        assert step in text, step
    assert "after the fallback: paused 1 resumed 0 deleted 1" in text
    assert "sriov_numvfs=3" in text and "driver of 0000:01:00.1: vfio-pci" in text
    assert "replugged: vfio fds of L2: 2" in text
    alloc = re.findall(r"(alloc-[0-9a-f]+)", section(paused, "agent: L2 with an empty root port"))[0]
    assert device(answer(text, "query-pci"), alloc) is not None  # back in L2 under the same id
    assert re.search(alloc + r"\s.*\sreplugged-after-refused-resume \(op-[0-9a-f]+\)", text), text
    assert "AGENT-EXIT=0" in paused
