"""The systemd unit: its offline security score (at most 4.0), `systemd-analyze verify`, and the
unit started for real by systemd in a podman container: ready through sd_notify, serving on its
socket, stopped cleanly."""
import os
import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from packaging_support import BASE_IMAGE, ROOT, UNIT, need_tool, podman, run, wait_for
from packaging_support import agent_image, binaries, container_name, podman_ready  # noqa: F401 (fixtures)

SYSTEMD_IMAGE = "localhost/fpga-agent-systemd:test"


def score(output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


def test_security_score_at_most_4():
    need_tool("systemd-analyze", "systemd")
    # --threshold counts in tenths: 40 is 4.0, the top of the "OK" band.
    result = run(["systemd-analyze", "security", "--offline=yes", "--threshold=40", UNIT], check=False, env=None)
    print(f"\nsystemd-analyze security --offline=yes: {score(result.stdout)}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert score(result.stdout) <= 4.0


def test_unit_verifies(binaries, tmp_path):
    need_tool("systemd-analyze", "systemd")
    # verify wants ExecStart's binary to exist: point it at the one under test.
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/fpga-agent", f"ExecStart={binaries / 'fpga-agent'}")
    assert str(binaries) in text
    unit = tmp_path / "fpga-agent.service"
    unit.write_text(text)
    result = run(["systemd-analyze", "verify", unit], check=False, env=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_unit_is_notify_with_watchdog():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s", "Restart=on-failure",
                 "ProtectSystem=strict", "ReadWritePaths=/sys/bus/pci /sys/devices", "StateDirectoryMode=0700"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line


def test_unit_orders_after_libvirt_without_pulling_it_in():
    """hypervisor: libvirt: started after libvirtd or virtqemud (ordering only); nothing in the
    sandbox stands between the agent and their sockets (AF_UNIX allowed, connect(2) works through
    the read-only /run, no InaccessiblePaths= or TemporaryFileSystem= over /run)."""
    text = UNIT.read_text()
    after = re.search(r"^After=(.*)$", text, re.M).group(1).split()
    assert {"libvirtd.service", "virtqemud.service"} <= set(after), after
    wants = " ".join(re.findall(r"^Wants=(.*)$", text, re.M))
    assert "libvirtd" not in wants and "virtqemud" not in wants, wants
    assert "AF_UNIX" in re.search(r"^RestrictAddressFamilies=(.*)$", text, re.M).group(1)
    assert not re.search(r"^(InaccessiblePaths|TemporaryFileSystem|BindPaths|ProtectSystem=full)", text, re.M)
    assert not re.search(r"^PrivateNetwork=yes", text, re.M)


def agent_notifies(binary: Path) -> bool:
    """Whether this fpga-agent sends READY=1 to NOTIFY_SOCKET (sd_notify support)."""
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o700)
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(path)
            s.settimeout(15)
            agent = subprocess.Popen([binary, "--state-dir", f"{directory}/state", "--listen", "",
                                      "--unix-socket", f"{directory}/agent.sock"],
                                     env=dict(os.environ, NOTIFY_SOCKET=path), stderr=subprocess.DEVNULL)
            try:
                return b"READY=1" in s.recv(4096)
            except TimeoutError:
                return False
            finally:
                agent.terminate()
                agent.wait(timeout=20)


@pytest.fixture(scope="module")
def systemd_image(agent_image, tmp_path_factory):
    context = tmp_path_factory.mktemp("systemd-image")
    (context / "fpga-agent.service").write_text(UNIT.read_text())
    (context / "fpga-agent.yaml").write_text((ROOT / "deploy" / "fpga-agent.yaml").read_text())
    started = time.monotonic()
    podman("build", "--quiet", "--pull=never", "--layers", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
           "--build-arg", f"AGENT_IMAGE={agent_image}", "-f", Path(__file__).parent / "systemd.Containerfile",
           "-t", SYSTEMD_IMAGE, context, timeout=600)
    print(f"\nbuilt {SYSTEMD_IMAGE} in {time.monotonic() - started:.1f} s")
    return SYSTEMD_IMAGE


def show(name, *properties, check=True) -> dict:
    args = [f"-p{p}" for p in properties]
    out = podman("exec", name, "systemctl", "show", "fpga-agent.service", *args, check=check).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_unit_runs_under_systemd(systemd_image, binaries, container_name):
    if not agent_notifies(binaries / "fpga-agent"):
        pytest.skip("this fpga-agent sends no READY=1 to NOTIFY_SOCKET (no sd_notify support yet): the unit "
                    "is Type=notify and would never become ready: NOT RUN")
    name = container_name("fpga-systemd")
    podman("run", "-d", "--name", name, "--systemd=always", systemd_image)
    # Type=notify: active only once the agent said READY=1 (serving on both listeners).
    # (systemd itself needs a moment before its bus answers.)
    state = wait_for(lambda: (s := show(name, "ActiveState", check=False)).get("ActiveState") in ("active", "failed") and s,
                     60, "fpga-agent.service to become active")
    properties = show(name, "ActiveState", "SubState", "StatusText", "WatchdogUSec", "NRestarts", "Type")
    journal = podman("exec", name, "journalctl", "-u", "fpga-agent", "--no-pager", check=False).stdout
    assert state["ActiveState"] == "active", f"{properties}\n{journal[-3000:]}"
    assert properties["Type"] == "notify" and properties["SubState"] == "running"
    assert properties["StatusText"], properties  # the agent's STATUS= line
    assert properties["WatchdogUSec"] == "30s" and properties["NRestarts"] == "0"

    status = podman("exec", name, "fpgactl", "status", "--server", "unix:/run/fpga-agent/agent.sock").stdout
    assert re.search(r"^health\s+SERVING$", status, re.M), status
    assert podman("exec", name, "stat", "-c", "%a", "/var/lib/fpga-agent").stdout.strip() == "700"
    # The hardening holds under systemd itself (here in a container: some namespaces are skipped).
    online = podman("exec", name, "systemd-analyze", "security", "fpga-agent.service", check=False).stdout
    print(f"\nsystemd-analyze security (inside the container): {score(online)}")
    assert score(online) <= 4.0
    # The watchdog is armed (the agent keeps it alive every WATCHDOG_USEC / 2).
    assert show(name, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != "0"

    started = time.monotonic()
    podman("exec", name, "systemctl", "stop", "fpga-agent.service", timeout=60)
    stopped = show(name, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert stopped["ActiveState"] == "inactive" and stopped["Result"] == "success", stopped
    assert stopped["ExecMainStatus"] == "0", stopped
    assert time.monotonic() - started < 15
    journal = podman("exec", name, "journalctl", "-u", "fpga-agent", "--no-pager").stdout
    assert "fpga-agent stopped" in journal, journal[-3000:]
    assert podman("exec", name, "test", "-e", "/run/fpga-agent/agent.sock", check=False).returncode != 0
    podman("stop", "-t", "10", name)


PROBE = r"""
check() { if test -w "$1"; then echo "RW $1"; else echo "RO $1"; fi; }
for f in /sys/bus/pci/drivers_probe /sys/bus/pci/rescan /sys/bus/pci/devices/*/driver_override \
         /var/lib/fpga-agent /etc/passwd /proc/sys/kernel/hostname /sys/kernel/mm/transparent_hugepage/enabled; do
  [ -e "$f" ] && check "$(readlink -f "$f")"
done
# libvirt's socket directory: seen, read-only (sockets are reached through it; see the unit).
[ -d /run/libvirt ] && check /run/libvirt
"""


def test_unit_sandbox_keeps_pci_sysfs_writable(systemd_image, container_name, tmp_path):
    """The unit's sandbox on a real /sys (a privileged container): the PCI trees the agent writes
    stay writable, kernel tunables and the rest of the system do not. Only access(2) is asked:
    nothing is written."""
    text = UNIT.read_text()
    text = re.sub(r"^ExecStart=.*$", "ExecStart=/bin/sh /usr/local/bin/sandbox-probe", text, flags=re.M)
    text = re.sub(r"^(Type=notify|NotifyAccess=.*|WatchdogSec=.*|Restart=.*)\n", "", text, flags=re.M)
    text = text.replace("[Service]\n", "[Service]\nType=oneshot\n")
    (tmp_path / "probe.service").write_text(text)
    (tmp_path / "probe.sh").write_text(PROBE)
    name = container_name("fpga-sandbox")
    podman("run", "-d", "--name", name, "--privileged", "--systemd=always", systemd_image)
    wait_for(lambda: podman("exec", name, "systemctl", "is-system-running", check=False).stdout.strip()
             in ("running", "degraded"), 60, "systemd in the container")
    podman("cp", tmp_path / "probe.service", f"{name}:/etc/systemd/system/sandbox-probe.service")
    podman("cp", tmp_path / "probe.sh", f"{name}:/usr/local/bin/sandbox-probe")
    podman("exec", name, "mkdir", "-p", "/run/libvirt")
    podman("exec", name, "systemctl", "daemon-reload")
    podman("exec", name, "systemctl", "start", "sandbox-probe.service", timeout=60)
    out = podman("exec", name, "journalctl", "-u", "sandbox-probe", "--no-pager", "-o", "cat").stdout
    seen = dict(reversed(line.split(" ", 1)) for line in out.splitlines() if line.startswith(("RW /", "RO /")))
    for path in ("/sys/bus/pci/drivers_probe", "/sys/bus/pci/rescan", "/var/lib/fpga-agent"):
        assert seen.get(path) == "RW", (path, out)
    overrides = [p for p in seen if p.startswith("/sys/devices/") and p.endswith("/driver_override")]
    assert all(seen[p] == "RW" for p in overrides), out
    # libvirt's socket directory is there in the sandbox, as on the host (connect(2) to a socket
    # in it needs no write access, whether the sandbox's /run is writable or not)
    assert seen.get("/run/libvirt") in ("RO", "RW"), out
    for path in ("/etc/passwd", "/proc/sys/kernel/hostname", "/sys/kernel/mm/transparent_hugepage/enabled"):
        assert seen.get(path, "RO") == "RO", (path, out)
    podman("stop", "-t", "10", name)
