"""The agent's Linux platform against a real Linux kernel's SR-IOV and VFIO, and a real VF
plugged into a nested QEMU through vfio-pci.

A Debian kernel boots under QEMU (TCG) with an emulated Intel IOMMU and QEMU's NVMe controller as
an SR-IOV PF (tests/real_kernel/tools/run-in-guest.sh); guest-agent.sh runs the agent's binaries
inside: discovery, VF count changes, vfio-pci binding, the daemon serving the inventory, and the
kernel's own EBUSY/ERANGE/ENOENT. About 30 s.
"""
import os
import shutil
import subprocess
import tempfile
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


def run_scenario(guest_script, extra_files=()):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): real-kernel test NOT RUN")
    with tempfile.TemporaryDirectory(prefix="fpga-real-kernel-") as work:
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
        script.write_text((HERE / guest_script).read_text().replace("AGENT_BIN", str(binaries)))
        env = dict(os.environ, MEM="1024", QEMU_TIMEOUT="600")
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
    assert "rescanned: changes found" in rescan
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
