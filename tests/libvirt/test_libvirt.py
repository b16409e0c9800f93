"""The libvirt backend (`hypervisor: libvirt`) against a real libvirtd on this machine (Debian's
libvirt-daemon-system, started without systemd as `virtlogd -d; libvirtd -d`): TCG domains
(`type='qemu'`, q35, two pcie-root-ports) started paused, one persistent and one transient.
The agent runs the simulated platform, so an allocation exists to attach. Covered: discovery
with root ports, lifecycle events (destroy, start) reaching the VM list with periodic rescans
off, a libvirtd restart (VMs unreachable, then back, events again; `fpga_hypervisor_connected`
0 then 1 and `fpga_hypervisor_reconnects_total` grown, scraped from the agent's /metrics), the
precise error of an attach on this host (no VFIO: libvirt refuses the passthrough) and its entry
in the audit trail, the flags `--hypervisor` and `--libvirt-uri`, and the start on a host
without libvirt.so.0. VFIO pause through libvirt (`libvirt.qemu_monitor_pause`): a third,
transient domain run by the QEMU built with qemu/vfio-pause; only the opted-in agent asks
`query-commands` (PAUSE yes there, no for Debian's QEMU), only it makes libvirt log the
`custom-monitor` taint, and /metrics says so. The filters: `libvirt.domains` leaves a domain out;
`libvirt.metadata_namespace` serves only the tagged domain, refuses an attach to another naming
what it serves, and takes in a domain tagged at run time (METADATA_CHANGE, rescans off). Not
covered here: a real VF attached, detached or paused, which needs the nested real-kernel guest.

Needs root (libvirtd, qemu:///system); skipped with a message otherwise, failed under CI=true."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
IN_CI = os.environ.get("CI") == "true"
PREFIX = f"fpga-lvt-{os.getpid()}"
PERSISTENT = PREFIX + "-p"
TRANSIENT = PREFIX + "-t"


def unavailable(reason):
    if IN_CI:
        pytest.fail("libvirt tests cannot run in CI: " + reason)
    pytest.skip("libvirt tests NOT RUN: " + reason)


def bin_dir():
    if os.environ.get("FPGA_AGENT_BIN_DIR"):
        return Path(os.environ["FPGA_AGENT_BIN_DIR"])
    out = subprocess.run(["swift", "build", "--show-bin-path"], cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


BIN = bin_dir()


def tool(name):
    """A program from PATH or the sbin directories (libvirtd, virtlogd: /usr/sbin)."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def virsh(*args, check=True):
    result = subprocess.run([tool("virsh") or "virsh", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def wait_for(condition, what, deadline=90):
    """Polls until `condition()` is truthy; generous deadline (a shared 2-core machine)."""
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        last = condition()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def libvirtd_pid():
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 else None


def start_libvirtd():
    if not subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True).returncode == 0:
        subprocess.run([tool("virtlogd"), "-d"], check=True)
    if libvirtd_pid() is None:
        subprocess.run([tool("libvirtd"), "-d"], check=True)
    wait_for(lambda: virsh("version", check=False).returncode == 0, "libvirtd to answer")


def domain_xml(name, usb=True):
    # pcie-root + 2 root ports; with usb=True libvirt puts its qemu-xhci controller on the first
    # port's bus (so one port is free), with usb=False both ports are free.
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>{tool('qemu-system-x86_64')}</emulator>
    <controller type='pci' model='pcie-root'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    {'' if usb else "<controller type='usb' model='none'/>"}
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def libvirtd():
    if os.geteuid() != 0:
        unavailable("not root (libvirtd and qemu:///system need root)")
    for name in ["virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "unshare"]:
        if tool(name) is None:
            unavailable(f"{name} is missing (scripts/install-test-deps installs libvirt-daemon-system, libvirt-clients)")
    try:
        start_libvirtd()
    except (subprocess.CalledProcessError, AssertionError) as error:
        unavailable(f"libvirtd cannot start: {error}")
    with tempfile.TemporaryDirectory(prefix="fpga-libvirt-") as work:
        persistent = Path(work) / "persistent.xml"
        persistent.write_text(domain_xml(PERSISTENT, usb=True))
        transient = Path(work) / "transient.xml"
        transient.write_text(domain_xml(TRANSIENT, usb=False))
        virsh("define", str(persistent))
        try:
            virsh("start", "--paused", PERSISTENT)
            virsh("create", "--paused", str(transient))
            yield work
        finally:
            start_libvirtd()
            for name in [PERSISTENT, TRANSIENT]:
                virsh("destroy", name, check=False)
            virsh("undefine", PERSISTENT, check=False)


class Agent:
    def __init__(self, directory, process, socket_path, http_port=None):
        self.directory = directory
        self.process = process
        self.socket_path = socket_path
        self.http_port = http_port

    def ctl(self, *args):
        return subprocess.run([str(BIN / "fpgactl"), "--server", f"unix:{self.socket_path}", *args],
                              capture_output=True, text=True, timeout=120)

    def vms(self):
        """{name: (state, free/total, endpoint or error)} of `fpgactl vms`."""
        out = self.ctl("vms")
        assert out.returncode == 0, out.stderr
        rows = {}
        for line in out.stdout.splitlines()[1:]:
            parts = line.split(None, 5)
            if len(parts) == 6:
                rows[parts[0]] = (parts[1], parts[2], parts[5])
        return rows

    def log(self):
        return Path(self.directory, "agent.log").read_text()

    def metrics(self):
        """{(name, ((label, value), ...)): value} of the agent's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=60) as response:
            assert response.status == 200
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            match = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
            if match:
                labels = tuple(sorted(re.findall(r'([a-z_]+)="([^"]*)"', match.group(2) or "")))
                samples[(match.group(1), labels)] = float(match.group(3))
        return samples

    def hypervisor(self):
        """(fpga_hypervisor_connected, fpga_hypervisor_reconnects_total) for libvirt at URI."""
        labels = (("backend", "libvirt"), ("uri", URI))
        samples = self.metrics()
        return samples.get(("fpga_hypervisor_connected", labels)), \
            samples.get(("fpga_hypervisor_reconnects_total", labels))

    def monitor_pause(self):
        """fpga_hypervisor_qemu_monitor_pause for libvirt at URI."""
        return self.metrics().get(("fpga_hypervisor_qemu_monitor_pause", (("backend", "libvirt"), ("uri", URI))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(directory, *settings, flags=(), http=False, env=None, preexec=None):
    socket_path = os.path.join(directory, "agent.sock")
    log = open(os.path.join(directory, "agent.log"), "w")
    http_port = free_port() if http else None
    process = subprocess.Popen(
        [*(preexec or []), str(BIN / "fpga-agent"), "--listen", f"127.0.0.1:{free_port()}",
         "--unix-socket", socket_path, "--state-dir", os.path.join(directory, "state"), "--node-id", "libvirt",
         "--http-listen", f"127.0.0.1:{http_port}" if http else "", *flags,
         *[arg for s in settings for arg in ("--set", s)]],
        stdout=log, stderr=subprocess.STDOUT, env=None if env is None else {**os.environ, **env})
    return Agent(directory, process, socket_path, http_port)


def wait_healthy(agent):
    def ready():
        if agent.process.poll() is not None:
            raise AssertionError("fpga-agent exited:\n" + agent.log())
        return agent.ctl("status").returncode == 0
    wait_for(ready, "the agent to serve")


@pytest.fixture(scope="module")
def agent(libvirtd):
    with tempfile.TemporaryDirectory(prefix="fpga-libvirt-agent-") as directory:
        # Periodic rescans off: whatever the VM list learns comes from libvirt's events. The backend
        # chosen by its flags; the HTTP listener on for /metrics.
        agent = start_agent(directory, "rescan_interval_seconds=0", flags=("--hypervisor", "libvirt", "--libvirt-uri", URI),
                            http=True)
        try:
            wait_healthy(agent)
            yield agent
        finally:
            agent.process.send_signal(signal.SIGTERM)
            try:
                agent.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.process.kill()


def ensure_running(name, xml_path=None):
    state = virsh("domstate", name, check=False).stdout.strip()
    if state == "shut off":
        virsh("start", "--paused", name)
    elif state == "" and xml_path:
        virsh("create", "--paused", xml_path)


def test_discovery_of_a_persistent_and_a_transient_domain_with_their_root_ports(agent):
    vms = wait_for(lambda: (lambda v: v if PERSISTENT in v and TRANSIENT in v else None)(agent.vms()),
                   "both domains in fpgactl vms")
    # The persistent domain: libvirt put its USB controller on pci.1's bus, so one port of two is free.
    assert vms[PERSISTENT] == ("paused", "1/2", URI)
    assert vms[TRANSIENT] == ("paused", "2/2", f"{URI} (transient)")
    out = agent.ctl("vms").stdout
    assert out.splitlines()[0].split() == ["VM", "STATE", "FREE", "PORTS", "VFIO", "PAUSE", "VFS", "LIBVIRT", "URI",
                                           "/", "ERROR"]


def test_lifecycle_events_update_the_vms_without_a_rescan(agent, libvirtd):
    ensure_running(PERSISTENT)
    wait_for(lambda: PERSISTENT in agent.vms(), "the persistent domain listed")
    virsh("destroy", PERSISTENT)
    wait_for(lambda: PERSISTENT not in agent.vms(), "the destroyed domain to leave the VM list")
    virsh("start", "--paused", PERSISTENT)
    vms = wait_for(lambda: (lambda v: v if PERSISTENT in v else None)(agent.vms()), "the started domain back")
    assert vms[PERSISTENT][:2] == ("paused", "1/2")
    # A transient domain destroyed is gone from libvirt altogether; created again, it is back.
    virsh("destroy", TRANSIENT)
    wait_for(lambda: TRANSIENT not in agent.vms(), "the transient domain to leave the VM list")
    virsh("create", "--paused", str(Path(libvirtd) / "transient.xml"))
    wait_for(lambda: TRANSIENT in agent.vms(), "the transient domain back")
    assert "libvirt event: rescan found changes" in agent.log()


def test_a_libvirtd_restart_makes_the_vms_unreachable_then_brings_them_back(agent, libvirtd):
    ensure_running(PERSISTENT)
    ensure_running(TRANSIENT, str(Path(libvirtd) / "transient.xml"))
    wait_for(lambda: {PERSISTENT, TRANSIENT} <= set(agent.vms()), "both domains listed")
    connected, reconnects_before = wait_for(lambda: (h := agent.hypervisor())[0] == 1 and h,
                                            "fpga_hypervisor_connected 1 while libvirtd runs")
    assert reconnects_before is not None
    pid = libvirtd_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: libvirtd_pid() is None, "libvirtd to stop")
    # The connection's state on /metrics: 0 while libvirtd is away (the agent keeps retrying).
    wait_for(lambda: agent.hypervisor()[0] == 0, "fpga_hypervisor_connected 0 while libvirtd is stopped")

    def unreachable():
        vms = agent.vms()
        return vms if all(vms.get(n, ("",))[0] == "unreachable" for n in [PERSISTENT, TRANSIENT]) else None
    vms = wait_for(unreachable, "the VMs to become unreachable")
    assert "libvirt at qemu:///system is unreachable" in vms[PERSISTENT][2] \
        or "connection to libvirt at qemu:///system was lost" in vms[PERSISTENT][2], vms
    # The node's problems say so while it lasts.
    status = agent.ctl("status").stdout
    assert "its VMs are unreachable until the agent reconnects" in status, status
    start_libvirtd()  # the domains' QEMUs kept running: libvirtd reconnects to them

    def back():
        vms = agent.vms()
        return vms if all(vms.get(n, ("",))[0] == "paused" for n in [PERSISTENT, TRANSIENT]) else None
    vms = wait_for(back, "the VMs back after libvirtd restarted")
    assert vms[PERSISTENT][1] == "1/2" and vms[TRANSIENT][1] == "2/2"
    connected, reconnects = wait_for(lambda: (h := agent.hypervisor())[0] == 1 and h,
                                     "fpga_hypervisor_connected 1 after libvirtd is back")
    assert reconnects > reconnects_before, (reconnects_before, reconnects)
    # The log says what happened, with libvirt's reason.
    log = agent.log()
    assert "lost the connection to libvirt: its VMs are unreachable until the agent reconnects" in log, log[-3000:]
    assert "reconnected to libvirt: its VMs are reachable again" in log, log[-3000:]
    assert "its VMs are unreachable" not in agent.ctl("status").stdout
    # The new connection carries events again.
    virsh("destroy", PERSISTENT)
    wait_for(lambda: PERSISTENT not in agent.vms(), "an event on the new connection")
    virsh("start", "--paused", PERSISTENT)
    wait_for(lambda: PERSISTENT in agent.vms(), "the domain back")


def test_attaching_a_vf_on_a_host_without_vfio_is_refused_with_libvirts_reason(agent):
    ensure_running(PERSISTENT)
    wait_for(lambda: agent.vms().get(PERSISTENT, ("",))[0] == "paused", "the persistent domain listed")
    out = agent.ctl("allocate", "--owner", "libvirt-test", "--vm", PERSISTENT, "--key", f"{PREFIX}-attach")
    assert out.returncode == 0, out.stderr
    allocation = out.stdout.split()[2].rstrip(":") if out.stdout.startswith("already") else out.stdout.split()[1].rstrip(":")
    vf = out.stdout.split("VF ")[1].split()[0]
    refused = agent.ctl("attach", allocation, PERSISTENT)
    assert refused.returncode == 1, refused
    assert refused.stderr.strip() == (
        f"error: FAILED_PRECONDITION: libvirt refused the attach of VF {vf} into pci.2 in VM {PERSISTENT}: "
        "unsupported configuration: host doesn't support passthrough of host PCI devices (libvirt error 67 (domain 10))"
    ), refused.stderr
    # Nothing changed: the port is still free, the allocation is not attached, the domain holds nothing.
    assert agent.vms()[PERSISTENT][:2] == ("paused", "1/2")
    assert "ua-alloc" not in virsh("dumpxml", PERSISTENT).stdout
    # The refusal is in the audit trail (the agent's own user on the socket is admin).
    trail = agent.ctl("audit", "-n", "50", "--json")
    assert trail.returncode == 0, trail.stderr
    entries = [json.loads(line) for line in trail.stdout.splitlines()]
    refusal = [e for e in entries
               if e["rpc"] == "AttachVF" and json.loads(e["requestJson"]).get("allocationId") == allocation]
    assert len(refusal) == 1, entries
    assert refusal[0]["status"] == "failedPrecondition", refusal  # the trail spells gRPC codes so
    assert json.loads(refusal[0]["requestJson"])["vm"] == PERSISTENT and refusal[0]["transport"] == "unix", refusal
    released = agent.ctl("release", allocation)
    assert released.returncode == 0, released.stderr


def test_the_dashboard_shows_the_backend_and_the_domain_state(agent):
    """The VMs panel in headless Chromium: libvirt, the URI and the domain's state per VM."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or shutil.which("chromedriver") is None:
        unavailable("chromium or chromedriver is missing (scripts/install-test-deps installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    ensure_running(PERSISTENT)
    wait_for(lambda: {PERSISTENT, TRANSIENT} <= set(agent.vms()), "both domains listed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]:
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"http://127.0.0.1:{agent.http_port}/")

        def backend(name):
            return driver.execute_script(
                "const e = document.querySelector(`.vm[data-vm='${arguments[0]}'] .vm-backend`);"
                "return e ? [e.textContent, e.dataset.backend, e.dataset.status] : null", name)
        seen = wait_for(lambda: (b := (backend(PERSISTENT), backend(TRANSIENT)))[0] and b[1] and b,
                        "the VMs panel with both domains")
        assert seen[0] == [f"libvirt {URI} · domain paused", "libvirt", "paused"], seen
        assert seen[1] == [f"libvirt {URI} (transient) · domain paused", "libvirt", "paused"], seen
    finally:
        driver.quit()


def test_without_libvirt_so_the_libvirt_backend_refuses_to_start_and_qmp_starts(libvirtd):
    library = next((line.split("=>")[1].strip() for line in
                    subprocess.run([tool("ldconfig"), "-p"], capture_output=True, text=True).stdout.splitlines()
                    if line.strip().startswith("libvirt.so.0 ")), None)
    assert library, "ldconfig does not list libvirt.so.0"
    # A private mount namespace where libvirt.so.0 is an empty file: as on a host without libvirt.
    hide = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'mount --bind /dev/null {library} && exec "$@"',
            "hide-libvirt"]
    with tempfile.TemporaryDirectory(prefix="fpga-libvirt-missing-") as directory:
        agent = start_agent(directory, "hypervisor=libvirt", preexec=hide)
        code = agent.process.wait(timeout=120)
        assert code != 0
        log = agent.log()
        assert "hypervisor: libvirt needs libvirt's client library libvirt.so.0, which cannot be loaded" in log, log
        assert "install libvirt0 / libvirt-clients" in log, log
    with tempfile.TemporaryDirectory(prefix="fpga-libvirt-missing-") as directory:
        agent = start_agent(directory, preexec=hide)
        try:
            wait_healthy(agent)
            assert agent.ctl("vms").returncode == 0
        finally:
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=60)


PAUSABLE = PREFIX + "-q"
NAMESPACE = "https://fpga-agent.example/serve"


def patched_qemu_for_libvirt(directory):
    """The QEMU built with qemu/vfio-pause (scripts/build-qemu-vfio-pause, cached), copied where
    libvirt's QEMU user can run it; None (and a skip, a failure in CI) when it cannot be built."""
    built = os.environ.get("QEMU_VFIO_PAUSE_BIN")
    if not built:
        result = subprocess.run([str(ROOT / "scripts" / "build-qemu-vfio-pause")], capture_output=True, text=True)
        if result.returncode != 0:
            unavailable("scripts/build-qemu-vfio-pause failed:\n" + result.stderr[-2000:])
        built = result.stdout.strip().splitlines()[-1]
    target = Path(directory) / "qemu-system-x86_64"
    shutil.copy(built, target)
    os.chmod(directory, 0o755)
    os.chmod(target, 0o755)
    return str(target)


def pausable_xml(name, emulator):
    """A domain run by the patched QEMU (whose firmware path is its build tree's: -L points at
    Debian's), tagged with the serve namespace in its <metadata>."""
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <metadata><fpga:agent xmlns:fpga='{NAMESPACE}'/></metadata>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>{emulator}</emulator>
    <controller type='pci' model='pcie-root'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-L'/><qemu:arg value='/usr/share/seabios'/>
    <qemu:arg value='-L'/><qemu:arg value='/usr/share/qemu'/>
  </qemu:commandline>
</domain>
"""


def taints(name):
    """The taints libvirt logged for domain NAME (its /var/log/libvirt/qemu/NAME.log)."""
    path = Path("/var/log/libvirt/qemu") / f"{name}.log"
    return set(re.findall(r"is tainted: ([a-z-]+)", path.read_text())) if path.exists() else set()


@pytest.fixture(scope="module")
def pausable(libvirtd):
    with tempfile.TemporaryDirectory(prefix="fpga-libvirt-pause-") as directory:
        xml = Path(directory) / "pausable.xml"
        xml.write_text(pausable_xml(PAUSABLE, patched_qemu_for_libvirt(directory)))
        virsh("create", "--paused", str(xml))
        try:
            yield PAUSABLE
        finally:
            virsh("destroy", PAUSABLE, check=False)


def run_configured_agent(config_text, http=False):
    """An agent (libvirt backend, periodic rescans off: libvirt's events only) with CONFIG_TEXT as
    its configuration file."""
    directory = tempfile.mkdtemp(prefix="fpga-libvirt-configured-")
    config = Path(directory) / "agent.yaml"
    config.write_text("hypervisor: libvirt\nrescan_interval_seconds: 0\n" + config_text)
    agent = start_agent(directory, flags=("--config", str(config)), http=http)
    wait_healthy(agent)
    return agent


def stop(agent):
    agent.process.send_signal(signal.SIGTERM)
    try:
        agent.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        agent.process.kill()
    shutil.rmtree(agent.directory, ignore_errors=True)


def pause_column(agent):
    """{name: the PAUSE column} of `fpgactl vms`."""
    out = agent.ctl("vms")
    assert out.returncode == 0, out.stderr
    return {line.split()[0]: line.split()[3] for line in out.stdout.splitlines()[1:] if len(line.split()) > 3}


def test_monitor_pause_is_opt_in_finds_the_patched_qemu_and_libvirt_marks_the_taint(agent, pausable):
    # The module's agent (no opt-in) has listed every domain: libvirt logged no custom-monitor taint.
    wait_for(lambda: {PERSISTENT, PAUSABLE} <= set(agent.vms()), "the domains listed by the default agent")
    assert pause_column(agent)[PAUSABLE] == "no"
    assert "custom-monitor" not in taints(PAUSABLE) | taints(PERSISTENT)
    assert agent.monitor_pause() == 0
    opted = run_configured_agent(
        f"qemu:\n  pause_commands: [x-vfio-pause, x-vfio-resume]\n"
        f"libvirt:\n  qemu_monitor_pause: true\n  domains: ['{PAUSABLE}', '{PREFIX}-p']\n", http=True)
    try:
        columns = wait_for(lambda: (lambda c: c if {PAUSABLE, PERSISTENT} <= set(c) else None)(pause_column(opted)),
                           "both domains listed by the opted-in agent")
        # query-commands through libvirt: the patched QEMU has the pause commands, Debian's does not.
        assert columns[PAUSABLE] == "yes" and columns[PERSISTENT] == "no", columns
        # libvirt.domains leaves the transient domain out.
        assert TRANSIENT not in columns, columns
        # What the opt-in costs, as libvirt logs it (once per domain start).
        assert "custom-monitor" in taints(PAUSABLE) and "custom-monitor" in taints(PERSISTENT)
        assert "custom-monitor" not in taints(TRANSIENT)
        # /metrics says the opt-in is on.
        assert opted.monitor_pause() == 1
        # The node's own capability: every VM it serves must be able to pause.
        assert "VFIO pause no" in opted.ctl("status").stdout
    finally:
        stop(opted)


def test_the_metadata_filter_serves_only_tagged_domains_and_refuses_others_precisely(pausable):
    served = run_configured_agent(f"libvirt:\n  metadata_namespace: '{NAMESPACE}'\n")
    try:
        vms = wait_for(lambda: (lambda v: v if PAUSABLE in v else None)(served.vms()), "the tagged domain listed")
        assert set(vms) == {PAUSABLE} | {n for n in vms if not n.startswith(PREFIX)}, vms
        assert PERSISTENT not in vms and TRANSIENT not in vms, vms
        out = served.ctl("allocate", "--owner", "libvirt-filter", "--key", f"{PREFIX}-filter")
        assert out.returncode == 0, out.stderr
        allocation = re.search(r"(alloc-[0-9a-f]+)", out.stdout).group(1)
        refused = served.ctl("attach", allocation, PERSISTENT)
        assert refused.returncode == 1, refused
        # Refused before libvirt is asked, saying which domains the agent serves.
        assert refused.stderr.strip() == (
            f"error: NOT_FOUND: VM {PERSISTENT} is not known to this agent, which serves the running and paused "
            f"libvirt domains at {URI} (libvirt.metadata_namespace: {NAMESPACE}); `fpgactl vms` lists them"
        ), refused.stderr
        # Tagged at run time (live metadata): libvirt's METADATA_CHANGE event brings it in.
        virsh("metadata", PERSISTENT, NAMESPACE, "--key", "fpga", "--set", "<agent/>", "--live")
        wait_for(lambda: PERSISTENT in served.vms(), "the newly tagged domain listed")
        assert served.ctl("release", allocation).returncode == 0
    finally:
        virsh("metadata", PERSISTENT, NAMESPACE, "--remove", "--live", check=False)
        stop(served)


def test_a_wrong_uri_is_reported_in_the_log_and_the_nodes_problems(libvirtd):
    with tempfile.TemporaryDirectory(prefix="fpga-libvirt-uri-") as directory:
        agent = start_agent(directory, flags=("--hypervisor", "libvirt", "--libvirt-uri", "qemu:///nonexistent"))
        try:
            wait_healthy(agent)
            log = wait_for(lambda: (lambda t: t if "cannot connect to libvirt" in t else None)(agent.log()),
                           "the failed connection in the log")
            # libvirt's own reason, which names the fix.
            assert "unexpected qemu URI path '/nonexistent', try qemu:///system" in log, log
            status = agent.ctl("status").stdout
            assert "libvirt at qemu:///nonexistent is unreachable" in status, status
            vms = agent.ctl("vms")
            assert vms.returncode == 0 and "libvirtd is unreachable" in vms.stdout, vms
        finally:
            agent.process.send_signal(signal.SIGTERM)
            agent.process.wait(timeout=60)


def test_a_domain_whose_name_the_agent_cannot_serve_is_listed_with_the_reason(agent, libvirtd):
    name = PREFIX + "-ünï"
    xml = Path(libvirtd) / "unicode.xml"
    xml.write_text(domain_xml(name, usb=False))
    virsh("create", "--paused", str(xml))
    try:
        vms = wait_for(lambda: (lambda v: v if name in v else None)(agent.vms()), "the domain listed")
        state, ports, why = vms[name]
        assert state == "other" and ports == "0/2", vms[name]
        assert why == "the agent serves VM names of 1-64 of A-Z a-z 0-9 . _ -: rename the domain, or leave it out " \
                      "with libvirt.domains", why
    finally:
        virsh("destroy", name, check=False)
