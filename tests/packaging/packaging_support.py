"""Helpers and fixtures for the packaging tests: the Helm chart, the systemd unit and the container
image. (No conftest.py: tests/interop has one, and pytest would confuse the two in one run; the test
modules import the fixtures from here.)

Tools: helm-python-sdk and kubernetes-validate (PyPI), systemd-analyze, podman (with runc),
debootstrap the first time the base image is made. scripts/install-test-deps installs them.
A missing tool skips its tests with a message saying so, except in CI (CI set), where it fails.

The image is built once per session by scripts/build-image from the binaries in
FPGA_AGENT_BIN_DIR (default: `swift build --show-bin-path`), debug or release.
"""
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "fpga-agent"
UNIT = ROOT / "deploy" / "fpga-agent.service"
IN_CI = bool(os.environ.get("CI"))
IMAGE = "localhost/fpga-agent:test"
BASE_IMAGE = "localhost/fpga-agent-base:bookworm"
ENGINE_ENV = dict(os.environ, CONTAINERS_CONF=os.environ.get("CONTAINERS_CONF", str(ROOT / "deploy" / "containers.conf")))


def missing(what: str):
    """Skips (on a developer's machine) or fails (in CI) for a missing tool."""
    message = f"{what}: NOT RUN (scripts/install-test-deps installs it)"
    if IN_CI:
        pytest.fail(message + " - CI must have it", pytrace=False)
    pytest.skip(message)


def need_tool(name: str, package: str):
    if shutil.which(name) is None:
        missing(f"{name} is missing (apt-get install {package})")


def need_module(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        missing(f"Python module {module} is missing (pip install {package})")


def bin_dir() -> Path:
    if os.environ.get("FPGA_AGENT_BIN_DIR"):
        return Path(os.environ["FPGA_AGENT_BIN_DIR"])
    out = subprocess.run(["swift", "build", "--show-bin-path"], cwd=ROOT, capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def binaries() -> Path:
    directory = bin_dir()
    for name in ("fpga-agent", "fpgactl"):
        if not os.access(directory / name, os.X_OK):
            missing(f"{directory / name} is not built (swift build, or set FPGA_AGENT_BIN_DIR)")
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, timeout=120, check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                            env=env or ENGINE_ENV, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def podman(*args, timeout=120, check=True) -> subprocess.CompletedProcess:
    return run(["podman", *args], timeout=timeout, check=check)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def container_name(request):
    """A unique container name, removed (with its container) after the test."""
    names = []

    def make(prefix="fpga-test"):
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield make
    for name in names:
        subprocess.run(["podman", "rm", "-f", "-t", "2", name], capture_output=True, env=ENGINE_ENV, timeout=60)


@pytest.fixture(scope="session")
def podman_ready():
    need_tool("podman", "podman")
    need_tool("runc", "runc")
    if os.geteuid() != 0:
        missing("the image tests run podman as root (privileged containers, debootstrap), and this is not root")
    return True


@pytest.fixture(scope="session")
def agent_image(podman_ready, binaries) -> str:
    """localhost/fpga-agent:test, built by scripts/build-image from the binaries under test."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        need_tool("debootstrap", "debootstrap")
    started = time.monotonic()
    result = run([ROOT / "scripts" / "build-image", "--bin-dir", binaries, "--tag", IMAGE], timeout=900)
    print(f"\n{result.stdout.strip().splitlines()[-1]} ({time.monotonic() - started:.1f} s)")
    return IMAGE
