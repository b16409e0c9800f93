"""The container image, built by scripts/build-image and run with podman: simulated through a
published port, linux mode privileged with the host's /sys read-only, a graceful stop, and the
chart's DaemonSet pod under `podman kube play`."""
import copy
import json
import re
import shutil
import subprocess
import tarfile

import pytest
import yaml

from packaging_support import CHART, ROOT, UNIT, free_port, need_module, podman, run, wait_for
from packaging_support import agent_image, binaries, container_name, podman_ready  # noqa: F401 (fixtures)


def inspect(image) -> dict:
    return json.loads(podman("image", "inspect", image).stdout)[0]


def test_image_metadata(agent_image, binaries):
    info = inspect(agent_image)
    config = info["Config"]
    assert config["User"] == "65534:65534"
    assert config["Entrypoint"] == ["/usr/local/bin/fpga-agent"]
    assert "Healthcheck" not in config or not config["Healthcheck"]
    version = run([binaries / "fpga-agent", "--version"], env=None).stdout.strip()
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == version
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", labels["org.opencontainers.image.revision"])
    assert labels["org.opencontainers.image.source"]
    print(f"\n{agent_image}: {info['Size'] / 1e6:.1f} MB")
    # fpgactl beside the agent, and every library both need resolves.
    out = podman("run", "--rm", "--entrypoint", "/bin/sh", agent_image, "-c",
                 "fpgactl --version && ldd /usr/local/bin/fpga-agent /usr/local/bin/fpgactl").stdout
    assert "not found" not in out and out.startswith(version)
    # libvirt.so.0 (loaded with hypervisor: libvirt) and everything it needs.
    out = podman("run", "--rm", "--entrypoint", "/bin/sh", agent_image, "-c",
                 "ldconfig -p | grep -F libvirt.so.0 && ldd \"$(ldconfig -p | sed -n 's/.*libvirt.so.0 .*=> //p')\"").stdout
    assert "libvirt.so.0" in out and "not found" not in out, out


def host_status(server: str, binaries, json_output=False):
    args = [binaries / "fpgactl", "status", "--server", server, "--timeout", "3"] + (["--json"] if json_output else [])
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)


def stop_gracefully(name):
    podman("stop", "-t", "15", name, timeout=60)
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state
    logs = podman("logs", name).stderr + podman("logs", name).stdout
    assert "fpga-agent stopped" in logs, logs[-2000:]


def test_simulated_serves_through_a_published_port(agent_image, binaries, container_name):
    name = container_name("fpga-sim")
    port = free_port()
    # Inside the container the listener must be 0.0.0.0 for the published port to reach it: plaintext
    # off loopback is allowed only with server.insecure (FPGA_AGENT_INSECURE). Plaintext callers are viewers.
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:50051", "-e", "FPGA_AGENT_INSECURE=true",
           agent_image, "--listen", "0.0.0.0:50051")
    result = wait_for(lambda: (r := host_status(f"127.0.0.1:{port}", binaries)).returncode == 0 and r, 30,
                      "fpgactl status through the published port")
    assert re.search(r"^health\s+SERVING$", result.stdout, re.M), result.stdout
    assert re.search(r"^devices\s+2 cards, 8 PFs", result.stdout, re.M), result.stdout
    whoami = subprocess.run([str(binaries / "fpgactl"), "whoami", "--server", f"127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=30)
    assert whoami.stdout.split()[-1] == "viewer", whoami
    # Inside, as the image's user (nobody), on the Unix socket: admin.
    assert podman("exec", name, "fpgactl", "whoami").stdout.strip() == "uid:65534 admin"
    stop_gracefully(name)


def test_linux_mode_reports_the_missing_hardware(agent_image, container_name):
    name = container_name("fpga-linux")
    podman("run", "-d", "--name", name, "--user", "0", "--privileged", "-v", "/sys:/sys:ro", agent_image,
           "--platform", "linux")
    status = wait_for(lambda: (r := podman("exec", name, "fpgactl", "status", "--json", check=False)).returncode == 0
                      and json.loads(r.stdout), 30, "the linux-mode agent to answer")
    assert status["capabilities"]["platform"] == "linux"
    # No QDMA card here (nor, on most machines, an IOMMU or vfio-pci): each is a problem, with what to do.
    assert status.get("problems"), status
    text = podman("exec", name, "fpgactl", "status").stdout
    assert re.search(r"^problem\s+\S", text, re.M), text
    stop_gracefully(name)


def pod_from_chart(values, scratch):
    """The chart's DaemonSet as a Pod for podman kube play (which knows no DaemonSet), with its
    ConfigMap. As the kubelet would: the node's name filled in, no nodeSelector; and hostPaths
    remapped to scratch directories (except /sys). podman refuses ports with hostNetwork."""
    helm = need_module("helm_python", "helm-python-sdk")
    files = helm.Chart.load(str(CHART)).render(values, name="kp", namespace="default", is_install=True)
    docs = [d for path, text in files.items() if path.endswith(".yaml") and text.strip()
            for d in yaml.safe_load_all(text) if d]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    spec = copy.deepcopy(daemonset["spec"]["template"]["spec"])
    spec.pop("nodeSelector", None)
    for container in spec["containers"]:
        if spec.get("hostNetwork"):
            container.pop("ports", None)
        for env in container.get("env", []):
            if env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
                del env["valueFrom"]
                env["value"] = "kube-play-node"
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"fpga-kp-{values['platform']}", "labels": daemonset["spec"]["template"]["metadata"]["labels"]},
           "spec": spec}
    path = scratch / "pod.yaml"
    path.write_text(yaml.safe_dump_all([config_map, pod]))
    return path, pod


@pytest.mark.parametrize("platform", ["linux", "simulated"])
def test_chart_pod_runs_under_kube_play(agent_image, binaries, tmp_path, platform):
    repository, tag = agent_image.rsplit(":", 1)
    host = {key: tmp_path / key for key in ("run", "state", "plugins", "vfio")}
    for directory in host.values():
        directory.mkdir()
    values = {"platform": platform, "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
              "hostPaths": {"run": str(host["run"]), "state": str(host["state"]),
                            "kubeletDevicePlugins": str(host["plugins"]), "devVfio": str(host["vfio"]), "sys": "/sys"}}
    manifest, pod = pod_from_chart(values, tmp_path)
    container = f"{pod['metadata']['name']}-fpga-agent"
    podman("kube", "play", manifest, timeout=120)
    try:
        def answers():
            r = podman("exec", container, "fpgactl", "status", "--json", check=False)
            return r.returncode == 0 and json.loads(r.stdout)

        status = wait_for(answers, 30, "the pod's agent to answer")
        assert status["nodeId"] == "kube-play-node"
        info = json.loads(podman("inspect", container).stdout)[0]
        # The exec probes the chart declares, run as the kubelet would.
        probes = pod["spec"]["containers"][0]
        live = podman("exec", container, *probes["livenessProbe"]["exec"]["command"], check=False)
        ready = podman("exec", container, *probes["readinessProbe"]["exec"]["command"], check=False)
        assert live.returncode == 0, live
        if platform == "linux":
            assert info["HostConfig"]["Privileged"] is True
            assert info["HostConfig"]["NetworkMode"] == "host"
            # The agent serves on the host's directory (as it would for fpgactl on the node).
            assert (host["run"] / "agent.sock").is_socket()
            assert (host["state"] / "state" / "state.sqlite").exists()
            assert oct((host["state"] / "state").stat().st_mode & 0o777) == "0o700"
            on_host = host_status(f"unix:{host['run'] / 'agent.sock'}", binaries, json_output=True)
            assert on_host.returncode == 0, on_host
            assert status["capabilities"]["platform"] == "linux"
            # Nothing to manage here: NOT_SERVING, so the pod is unready, not restarted.
            expected_ready = status["health"] != "NODE_HEALTH_NOT_SERVING"
            assert (ready.returncode == 0) == expected_ready, (status["health"], ready)
        else:
            assert info["HostConfig"]["Privileged"] is False
            assert info["Config"]["User"] in ("65534", "65534:65534")
            assert status["health"] == "NODE_HEALTH_SERVING"
            assert ready.returncode == 0, ready
            assert podman("exec", container, "fpgactl", "whoami").stdout.strip() == "uid:65534 admin"
        # Memory limit from the chart's resources.
        assert info["HostConfig"]["Memory"] == 256 * 1024 * 1024
    finally:
        podman("kube", "down", manifest, timeout=120, check=False)


def test_release_artifacts(agent_image, binaries, tmp_path):
    """scripts/release: the image as an OCI archive, the binaries' tarball with the unit, the
    default configuration and the --help texts, the chart, and checksums that verify."""
    dist = tmp_path / "dist"
    run([ROOT / "scripts" / "release", "--bin-dir", binaries, "--image", agent_image, "--dist", dist,
         "--allow-dynamic"], timeout=600)
    version = run([binaries / "fpga-agent", "--version"], env=None).stdout.strip()
    names = sorted(p.name for p in dist.iterdir())
    tarball = next(n for n in names if n.endswith(".tar.gz"))
    assert f"fpga-agent-{version}-image.oci.tar" in names and "SHA256SUMS" in names
    assert any(n.startswith("fpga-agent-chart-") and n.endswith(".tgz") for n in names)
    run(["sha256sum", "-c", "SHA256SUMS"], cwd=dist, env=None)
    with tarfile.open(dist / tarball) as archive:
        members = set(archive.getnames())
        top = f"fpga-agent-{version}"
        for path in ("bin/fpga-agent", "bin/fpgactl", "systemd/fpga-agent.service", "etc/fpga-agent.yaml",
                     "doc/fpga-agent.txt", "doc/fpgactl.txt", "INSTALL"):
            assert f"{top}/{path}" in members, path
        help_text = archive.extractfile(f"{top}/doc/fpgactl.txt").read().decode()
        assert "fpgactl status" in help_text and "fpgactl reconfigure" in help_text
        assert archive.extractfile(f"{top}/systemd/fpga-agent.service").read() == UNIT.read_bytes()
    if shutil.which("skopeo"):
        manifest = json.loads(run(["skopeo", "inspect", f"oci-archive:{dist}/fpga-agent-{version}-image.oci.tar"]).stdout)
        assert manifest["Labels"]["org.opencontainers.image.version"] == version
