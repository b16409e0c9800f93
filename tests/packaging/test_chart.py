"""The Helm chart: rendered for several value sets with helm-python-sdk, linted strictly, checked
against values.schema.json, every object validated by kubernetes-validate --strict for each
supported Kubernetes version, the agent's configuration accepted by the agent itself, and
deploy/kubernetes/ equal to a fresh render."""
import copy
import subprocess

import pytest
import yaml

from packaging_support import CHART, ROOT, need_module, run
from packaging_support import binaries  # noqa: F401 (fixtures)

# The Kubernetes versions the chart supports (Chart.yaml kubeVersion: >=1.30).
KUBE_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"]
DIGEST = "sha256:" + "ab" * 32

VALUE_SETS = {
    "defaults": {},
    "simulated": {"platform": "simulated"},
    "tls-roles": {
        "tls": {"secretName": "fpga-agent-tls"},
        "auth": {"roles": {"spiffe://example.org/orchestrator": "operator", "cn:ops": "admin", "uid:1000": "viewer",
                           "gid:27": "operator"}, "plaintextRole": "none"},
        "orchestrator": {"address": "orchestrator.fpga-system.svc:50060", "serverName": "orchestrator"},
    },
    "metrics-digest": {
        "image": {"repository": "registry.example.org/fpga/fpga-agent", "digest": DIGEST, "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "metrics": {"enabled": True, "port": 9478, "insecure": True,
                    "serviceMonitor": {"skipCRDCheck": True, "labels": {"release": "kps"},
                                       "bearerTokenSecret": {"name": "fpga-agent-scrape", "key": "token"}},
                    "prometheusRule": {"skipCRDCheck": True, "labels": {"release": "kps"}}},
        "auth": {"tokenSecret": "fpga-agent-tokens", "roles": {"token:prometheus": "viewer"}},
    },
    "selectors-pools": {
        "linux": {"selectors": [{"vendors": ["10ee"], "devices": ["903f", "913f"], "drivers": ["qdma-pf"]},
                                {"pciAddresses": ["0000:3b:00.0"]}]},
        "devicePlugin": {"pools": [{"resource": "xilinx.com/qdma-vf-a", "pfs": ["0000:3b:00.0"]},
                                   {"resource": "xilinx.com/qdma-vf-b", "pfs": ["0000:3b:00.1"]}]},
        "updateStrategy": {"maxUnavailable": "20%"},
        "tolerations": [{"operator": "Exists"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": 1, "memory": "512Mi"}},
        "extraConfig": {"rescan_interval_seconds": 10, "sharing": {"slice_ms": 5}},
        "log": {"level": "debug", "format": "text"},
        "podAnnotations": {"example.org/team": "accelerators"},
    },
    # DRA beside the device plugin, another driver name, a kubelet with another root directory.
    "dra": {
        "dra": {"enabled": True, "driverName": "fpga.example.org"},
        "hostPaths": {"kubeletPluginsRegistry": "/var/lib/k0s/kubelet/plugins_registry",
                      "kubeletPlugins": "/var/lib/k0s/kubelet/plugins"},
    },
    # VMs managed by the node's libvirt.
    "libvirt": {"hypervisor": {"libvirt": {"enabled": True}}},
    # ... with VFIO pause through libvirt and only the tagged domains of some names.
    "libvirt-pause-filtered": {"hypervisor": {"libvirt": {
        "enabled": True, "qemuMonitorPause": True, "domains": ["instance-*", "vm-[ab]"],
        "metadataNamespace": "https://fpga-agent.example/serve"}}},
    "insecure-no-device-plugin": {
        "server": {"listen": "0.0.0.0:50051", "insecure": True},
        "devicePlugin": {"enabled": False},
        "hostNetwork": False,
        "fullnameOverride": "agent",
    },
}

BAD_VALUES = [
    ({"image": 5}, "/image"),
    ({"bogus": True}, "bogus"),
    ({"platform": "qemu"}, "/platform"),
    ({"image": {"repository": "fpga-agent", "digest": "sha256:1234"}}, "/image/digest"),
    ({"auth": {"roles": {"cn:ops": "root"}}}, "/auth/roles"),
    ({"auth": {"roles": {"ops": "admin"}}}, "propertyName 'ops'"),
    ({"updateStrategy": {"maxUnavailable": 0}}, "/updateStrategy/maxUnavailable"),
    ({"hostPaths": {"run": "run", "state": "/s", "kubeletDevicePlugins": "/k", "devVfio": "/d", "sys": "/sys"}},
     "/hostPaths/run"),
    ({"metrics": {"enabled": "yes"}}, "/metrics/enabled"),
    ({"metrics": {"prometheusRule": {"enabled": True, "bogus": 1}}}, "/metrics/prometheusRule"),
    ({"auth": {"tokenSecret": "Not_A_Name"}}, "/auth/tokenSecret"),
    ({"dra": {"enabled": "yes"}}, "/dra/enabled"),
    ({"dra": {"driverName": "Not_A_Domain"}}, "/dra/driverName"),
    ({"dra": {"driverName": "nodots"}}, "/dra/driverName"),
    ({"hostPaths": {"run": "/r", "state": "/s", "kubeletDevicePlugins": "/k", "devVfio": "/d", "sys": "/sys",
                    "cdi": "var/run/cdi"}}, "/hostPaths/cdi"),
    ({"hypervisor": {"libvirt": {"enabled": "yes"}}}, "/hypervisor/libvirt/enabled"),
    ({"hypervisor": {"libvirt": {"uri": "system"}}}, "/hypervisor/libvirt/uri"),
    ({"hypervisor": {"libvirt": {"socketDir": "run/libvirt"}}}, "/hypervisor/libvirt/socketDir"),
    ({"hypervisor": {"libvirt": {"qemuMonitorPause": "on"}}}, "/hypervisor/libvirt/qemuMonitorPause"),
    ({"hypervisor": {"libvirt": {"domains": [""]}}}, "/hypervisor/libvirt/domains/0"),
    ({"hypervisor": {"qmp": {}}}, "qmp"),
    ({"probes": {"liveness": {"periodSeconds": 10, "exec": {}}}}, "/probes"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
]


@pytest.fixture(scope="module")
def helm():
    return need_module("helm_python", "helm-python-sdk")


@pytest.fixture(scope="module")
def chart(helm):
    return helm.Chart.load(str(CHART))


def render(chart, values, name="fpga-agent", namespace="fpga-system"):
    files = chart.render(copy.deepcopy(values), name=name, namespace=namespace, is_install=True)
    docs = [doc for path, text in sorted(files.items()) if path.endswith((".yaml", ".yml")) and text.strip()
            for doc in yaml.safe_load_all(text) if doc]
    notes = next((text for path, text in files.items() if path.endswith("NOTES.txt")), "")
    return docs, notes


def kind(docs, wanted):
    return [d for d in docs if d["kind"] == wanted]


def pod_spec(docs):
    (daemonset,) = kind(docs, "DaemonSet")
    return daemonset["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", ["v" + v for v in KUBE_VERSIONS])
def test_lint_strict(helm, version):
    report = helm.lint(str(CHART), strict=True, kube_version=version)
    assert not report["errors"], report
    # Severity 2 is a warning, 3 an error (strict turns warnings into failures).
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_value_sets_pass_the_schema_and_render(chart, name):
    chart.validate_schema(VALUE_SETS[name])
    docs, notes = render(chart, VALUE_SETS[name])
    assert {d["kind"] for d in docs} >= {"DaemonSet", "ConfigMap", "ServiceAccount"}
    assert "fpga-agent" in notes


@pytest.mark.parametrize("values,where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_refuses_bad_values(helm, chart, values, where):
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema(values)
    assert where in str(refused.value), str(refused.value)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name="fpga-agent", namespace="fpga-system", is_install=True)


def test_every_value_is_in_the_schema(chart):
    """values.schema.json covers values.yaml: every key of the defaults is a declared property."""
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def resolve(node):
        while "$ref" in node:
            node = schema["definitions"][node["$ref"].split("/")[-1]]
        return node

    def walk(values, node, path):
        node = resolve(node)
        if not isinstance(values, dict) or node.get("type") != "object" or "properties" not in node:
            return
        assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
        for key, value in values.items():
            assert key in node["properties"], f"{path}/{key} is not in values.schema.json"
            walk(value, node["properties"][key], f"{path}/{key}")

    walk(defaults, schema, "")


def test_plaintext_off_loopback_is_refused_at_render(helm, chart):
    with pytest.raises(helm.HelmRenderError, match="server.listen 0.0.0.0:50051 is not loopback"):
        chart.render({"server": {"listen": "0.0.0.0:50051"}}, name="fpga-agent", namespace="fpga-system")


def test_defaults_are_production_linux(chart):
    docs, _ = render(chart, {})
    (config_map,) = kind(docs, "ConfigMap")
    config = yaml.safe_load(config_map["data"]["fpga-agent.yaml"])
    assert config["platform"] == "linux"
    assert config["server"]["listen"] == "127.0.0.1:50051"
    assert config["kubernetes"]["device_plugin"] is True
    spec = pod_spec(docs)
    (daemonset,) = kind(docs, "DaemonSet")
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                                   "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert spec["automountServiceAccountToken"] is False
    assert {"key": "fpga.example.com/qdma", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    (container,) = spec["containers"]
    assert container["image"] == "localhost/fpga-agent:0.1.0"
    assert container["securityContext"]["privileged"] is True
    assert spec["securityContext"]["runAsUser"] == 0
    assert container["resources"]["limits"]["memory"] == "256Mi"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "fpgactl status --server unix:/run/fpga-agent/agent.sock" in " ".join(container[probe]["exec"]["command"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts >= {"/sys", "/dev/vfio", "/var/lib/kubelet/device-plugins", "/run/fpga-agent", "/var/lib/fpga-agent"}
    assert not any("--http-listen" in a for a in container["args"])
    assert not kind(docs, "ServiceMonitor") and not kind(docs, "Service") and not kind(docs, "PrometheusRule")
    # The agent's own HTTP listener (127.0.0.1:50080 by default) is off too.
    assert config["http"] == {"listen": ""}
    (daemonset,) = kind(docs, "DaemonSet")
    assert not any(k.startswith("prometheus.io/") for k in daemonset["spec"]["template"]["metadata"]["annotations"])


def test_simulated_runs_unprivileged(chart):
    docs, notes = render(chart, {"platform": "simulated"})
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 65534
    assert container["securityContext"] == {"privileged": False, "allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}
    assert not any("hostPath" in v for v in spec["volumes"])
    assert "hostPID" not in spec and "hostNetwork" not in spec
    assert "SIMULATED" in notes


def test_tls_from_secret(chart):
    docs, _ = render(chart, VALUE_SETS["tls-roles"])
    (container,) = pod_spec(docs)["containers"]
    args = container["args"]
    for flag, file in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-client-ca", "ca.crt")):
        assert args[args.index(flag) + 1] == f"/etc/fpga-agent/tls/{file}"
    assert {"name": "tls", "mountPath": "/etc/fpga-agent/tls", "readOnly": True} in container["volumeMounts"]
    assert {"name": "tls", "secret": {"secretName": "fpga-agent-tls", "defaultMode": 0o400}} in pod_spec(docs)["volumes"]
    config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
    assert config["server"]["listen"] == "0.0.0.0:50051"
    assert config["auth"]["roles"]["cn:ops"] == "admin"
    assert config["auth"]["plaintext_role"] == "none"
    assert config["orchestrator"]["tls"]["cert"] == "/etc/fpga-agent/tls/tls.crt"


def test_metrics_and_service_monitor(chart):
    docs, _ = render(chart, VALUE_SETS["metrics-digest"])
    (container,) = pod_spec(docs)["containers"]
    assert container["image"] == f"registry.example.org/fpga/fpga-agent@{DIGEST}"
    assert container["args"][-2:] == ["--http-listen", "0.0.0.0:9478"]
    assert {"name": "metrics", "containerPort": 9478, "protocol": "TCP"} in container["ports"]
    (service,) = kind(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    (monitor,) = kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["authorization"] == {
        "type": "Bearer", "credentials": {"name": "fpga-agent-scrape", "key": "token"}}
    # Annotations for a Prometheus that discovers pods.
    (daemonset,) = kind(docs, "DaemonSet")
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9478", "prometheus.io/path": "/metrics"}
    # The listener off loopback: plaintext allowed explicitly, callers with tokens from the Secret.
    config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
    assert config["http"] == {"listen": "0.0.0.0:9478", "insecure": True}
    assert config["auth"]["token_file"] == "/etc/fpga-agent/auth/tokens"
    assert config["auth"]["roles"] == {"token:prometheus": "viewer"}
    assert {"name": "tokens", "mountPath": "/etc/fpga-agent/auth", "readOnly": True} in container["volumeMounts"]
    assert {"name": "tokens", "secret": {"secretName": "fpga-agent-tokens", "defaultMode": 0o400,
                                         "items": [{"key": "tokens", "path": "tokens"}]}} in pod_spec(docs)["volumes"]
    # The alert rules, the same as deploy/prometheus/fpga-agent-rules.yaml.
    (rule,) = kind(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "fpga-agent-rules.yaml").read_text())
    # Without the Prometheus operator's CRD (an offline render has none) there is no ServiceMonitor
    # and no PrometheusRule.
    values = copy.deepcopy(VALUE_SETS["metrics-digest"])
    values["metrics"]["serviceMonitor"]["skipCRDCheck"] = False
    values["metrics"]["prometheusRule"]["skipCRDCheck"] = False
    docs, _ = render(chart, values)
    assert not kind(docs, "ServiceMonitor") and not kind(docs, "PrometheusRule") and kind(docs, "Service")


def test_metrics_off_loopback_needs_insecure(helm, chart):
    with pytest.raises(helm.HelmRenderError, match="metrics.address 0.0.0.0 is not loopback"):
        chart.render({"metrics": {"enabled": True}}, name="fpga-agent", namespace="fpga-system")
    docs, _ = render(chart, {"metrics": {"enabled": True, "address": "127.0.0.1"}})
    config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
    assert config["http"] == {"listen": "127.0.0.1:50080"}
    docs, _ = render(chart, {"metrics": {"enabled": True, "address": "::", "insecure": True}})
    (container,) = pod_spec(docs)["containers"]
    assert container["args"][-2:] == ["--http-listen", "[::]:50080"]


def test_chart_rules_are_the_deploy_rules():
    """charts/fpga-agent/files/ holds a copy of deploy/prometheus/fpga-agent-rules.yaml (Helm reads
    only files inside the chart): cp deploy/prometheus/fpga-agent-rules.yaml charts/fpga-agent/files/."""
    deployed = (ROOT / "deploy" / "prometheus" / "fpga-agent-rules.yaml").read_text()
    assert (CHART / "files" / "fpga-agent-rules.yaml").read_text() == deployed


def test_dra_objects(chart):
    """dra.enabled: the agent's configuration, the token, the kubelet's directories and /var/run/cdi
    at the node's paths, RBAC for the chart's service account, the node policy, the DeviceClasses."""
    docs, notes = render(chart, VALUE_SETS["dra"])
    config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
    # Node name and API server: the agent's defaults (the node id, from spec.nodeName; in-cluster).
    assert config["kubernetes"]["dra"] == {
        "enabled": True, "driver_name": "fpga.example.org", "registry_dir": "/var/lib/k0s/kubelet/plugins_registry",
        "plugins_dir": "/var/lib/k0s/kubelet/plugins", "cdi_dir": "/var/run/cdi"}
    assert "api" not in config["kubernetes"]
    assert config["kubernetes"]["device_plugin"] is True  # both can be on
    spec = pod_spec(docs)
    assert spec["automountServiceAccountToken"] is True
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FPGA_AGENT_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v.get("hostPath") for v in spec["volumes"]}
    for name, path in (("kubelet-plugins-registry", "/var/lib/k0s/kubelet/plugins_registry"),
                       ("kubelet-plugins", "/var/lib/k0s/kubelet/plugins"), ("cdi", "/var/run/cdi")):
        assert mounts[name] == path and volumes[name] == {"path": path, "type": "DirectoryOrCreate"}
    (role,) = kind(docs, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"],
         "verbs": ["get", "list", "watch", "create", "update", "delete"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims/status"], "verbs": ["update", "patch"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims/driver"], "resourceNames": ["fpga.example.org"],
         "verbs": ["associated-node:update", "associated-node:patch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    (binding,) = kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": "fpga-system"}]
    (policy,) = kind(docs, "ValidatingAdmissionPolicy")
    assert policy["spec"]["matchConditions"][0]["expression"] == \
        'request.userInfo.username == "system:serviceaccount:fpga-system:fpga-agent"'
    assert policy["spec"]["failurePolicy"] == "Fail"
    (policy_binding,) = kind(docs, "ValidatingAdmissionPolicyBinding")
    assert policy_binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    classes = {c["metadata"]["name"]: c["spec"]["selectors"] for c in kind(docs, "DeviceClass")}
    assert classes == {
        "qdma-vf": [{"cel": {"expression":
                             'device.driver == "fpga.example.org" && device.attributes["fpga.example.org"].kind == "vf"'}}],
        "qdma-accelerator": [{"cel": {"expression": 'device.driver == "fpga.example.org" && '
                                                    'device.attributes["fpga.example.org"].kind == "accelerator"'}}]}
    assert "driver fpga.example.org" in notes
    # Without the policy and the classes (a second release in the cluster).
    values = copy.deepcopy(VALUE_SETS["dra"])
    values["dra"].update(deviceClasses=False, nodeRestrictionPolicy=False)
    docs, _ = render(chart, values)
    assert not kind(docs, "DeviceClass") and not kind(docs, "ValidatingAdmissionPolicy") and kind(docs, "ClusterRole")
    # Off (the default): no token, no RBAC, no kubelet plugin directories.
    docs, _ = render(chart, {})
    assert not any(kind(docs, k) for k in ("ClusterRole", "ClusterRoleBinding", "DeviceClass", "ValidatingAdmissionPolicy"))
    assert pod_spec(docs)["automountServiceAccountToken"] is False
    assert "dra" not in yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])["kubernetes"]


def libvirt_mounts(docs):
    spec = pod_spec(docs)
    (container,) = spec["containers"]
    return ([m for m in container["volumeMounts"] if m["name"] == "libvirt-sockets"],
            [v for v in spec["volumes"] if v["name"] == "libvirt-sockets"])


def test_libvirt_values(helm, chart):
    """hypervisor.libvirt.enabled: the agent's configuration names the backend and the URI, and the
    node's libvirt socket directory (libvirt-sock, virtqemud-sock) is mounted read-only at its
    path; disabled (the default), neither."""
    docs, _ = render(chart, VALUE_SETS["libvirt"])
    config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
    assert config["hypervisor"] == "libvirt" and config["libvirt"] == {"uri": "qemu:///system"}
    mounts, volumes = libvirt_mounts(docs)
    assert mounts == [{"name": "libvirt-sockets", "mountPath": "/run/libvirt", "readOnly": True}]
    assert volumes == [{"name": "libvirt-sockets", "hostPath": {"path": "/run/libvirt", "type": "DirectoryOrCreate"}}]
    # Another URI and socket directory.
    docs, _ = render(chart, {"hypervisor": {"libvirt": {"enabled": True, "uri": "qemu+ssh://hv/system",
                                                        "socketDir": "/var/run/libvirt"}}})
    config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
    assert config["libvirt"] == {"uri": "qemu+ssh://hv/system"}
    mounts, volumes = libvirt_mounts(docs)
    assert mounts[0]["mountPath"] == "/var/run/libvirt" and volumes[0]["hostPath"]["path"] == "/var/run/libvirt"
    # VFIO pause through libvirt (opt-in) and the domain filters reach the configuration.
    docs, _ = render(chart, {"hypervisor": {"libvirt": {
        "enabled": True, "qemuMonitorPause": True, "domains": ["instance-*"],
        "metadataNamespace": "https://fpga-agent.example/serve"}}})
    config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
    assert config["libvirt"] == {"uri": "qemu:///system", "qemu_monitor_pause": True, "domains": ["instance-*"],
                                 "metadata_namespace": "https://fpga-agent.example/serve"}
    # Disabled: nothing of libvirt, whatever its other values.
    for values in ({}, {"hypervisor": {"libvirt": {"enabled": False, "uri": "qemu+ssh://hv/system"}}}):
        docs, _ = render(chart, values)
        config = yaml.safe_load(kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"])
        assert "hypervisor" not in config and "libvirt" not in config
        assert libvirt_mounts(docs) == ([], [])
    # A simulated node has nothing for libvirt's domains.
    with pytest.raises(helm.HelmRenderError, match="hypervisor.libvirt.enabled needs platform: linux"):
        chart.render({"platform": "simulated", "hypervisor": {"libvirt": {"enabled": True}}}, name="fpga-agent",
                     namespace="fpga-system")


def test_dra_needs_linux_and_kubernetes_1_34(helm, chart, capfd):
    with pytest.raises(helm.HelmRenderError, match="dra.enabled needs platform: linux"):
        chart.render({"platform": "simulated", "dra": {"enabled": True}}, name="fpga-agent", namespace="fpga-system")
    # resource.k8s.io/v1 is 1.34+. helm-python-sdk renders only for its own default version
    # (1.36), so the check is seen through lint, which reports a template's fail() as a log line.
    capfd.readouterr()
    helm.lint(str(CHART), {"dra": {"enabled": True}}, strict=True, kube_version="v1.33.0")
    assert "dra.enabled needs Kubernetes 1.34 or later" in capfd.readouterr().err
    report = helm.lint(str(CHART), {"dra": {"enabled": True}}, strict=True, kube_version="v1.34.0")
    assert "dra.enabled needs" not in capfd.readouterr().err
    assert not report["errors"] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


# resource.k8s.io/v1 exists from Kubernetes 1.34: older schemas know no DeviceClass.
DRA_VALUE_SETS = {name for name, values in VALUE_SETS.items() if values.get("dra", {}).get("enabled")}


@pytest.fixture(scope="module")
def rendered_files(chart, tmp_path_factory):
    """Each value set rendered to a file of its own: {name: path}."""
    directory = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, values in VALUE_SETS.items():
        docs, _ = render(chart, values)
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        files[name] = path
    return files


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_kubernetes_validate_strict(rendered_files, version):
    need_module("kubernetes_validate", "kubernetes-validate")
    dra_ok = tuple(map(int, version.split("."))) >= (1, 34, 0)
    chosen = [path for name, path in rendered_files.items() if dra_ok or name not in DRA_VALUE_SETS]
    files = chosen + sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    result = run(["kubernetes-validate", "--strict", "--quiet", "-k", version, *files], check=False, env=None)
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the ServiceMonitor and the PrometheusRule (CRDs' kinds) may be unknown to kubernetes-validate
    # (so the DeviceClasses, the RBAC and the admission policy are checked for 1.34).
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("WARN"):
            assert "servicemonitor" in line.lower() or "prometheusrule" in line.lower(), line


def test_agent_accepts_every_rendered_configuration(chart, binaries, tmp_path):
    """The ConfigMap's file, with the container's flags, passes `fpga-agent --check-config`."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=fpga-test", "-keyout", tmp_path / "tls.key", "-out", tmp_path / "tls.crt"],
                   check=True, capture_output=True)
    (tmp_path / "ca.crt").write_bytes((tmp_path / "tls.crt").read_bytes())
    (tmp_path / "tokens").write_text("0123456789abcdef0123,prometheus\n")
    for name, values in VALUE_SETS.items():
        docs, _ = render(chart, values)
        text = kind(docs, "ConfigMap")[0]["data"]["fpga-agent.yaml"].replace("/etc/fpga-agent/tls", str(tmp_path))
        text = text.replace("/etc/fpga-agent/auth", str(tmp_path))
        config = tmp_path / f"{name}.yaml"
        config.write_text(text)
        (container,) = pod_spec(docs)["containers"]
        args = [a.replace("/etc/fpga-agent/tls", str(tmp_path)) for a in container["args"]]
        args[args.index("--config") + 1] = str(config)
        if "--http-listen" in args:  # the HTTP listener is checked once the agent has it
            at = args.index("--http-listen")
            if "--http-listen" not in run([binaries / "fpga-agent", "help", "serve"], env=None).stdout:
                del args[at:at + 2]
        result = run([binaries / "fpga-agent", *args, "--check-config"], check=False, env=None)
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


def test_deploy_kubernetes_agrees_with_the_chart(helm):
    result = run([ROOT / "scripts" / "render-manifests", "--check"], check=False, env=None)
    assert result.returncode == 0, "deploy/kubernetes/ is stale, run scripts/render-manifests:\n" + result.stdout[-3000:]
