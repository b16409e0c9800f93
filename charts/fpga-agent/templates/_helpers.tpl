{{/* The chart's name, overridable. */}}
{{- define "fpga-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Objects' name: the release name, with the chart's appended unless it already contains it. */}}
{{- define "fpga-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "fpga-agent.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fpga-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fpga-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fpga-agent.labels" -}}
{{ include "fpga-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* repository@digest when a digest is given, else repository:tag (tag defaults to appVersion). */}}
{{- define "fpga-agent.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{- define "fpga-agent.linux" -}}
{{- if eq .Values.platform "linux" -}}true{{- end -}}
{{- end -}}

{{/* The TCP listen address: server.listen, else loopback (0.0.0.0 with TLS) on server.port. */}}
{{- define "fpga-agent.listen" -}}
{{- if .Values.server.listen -}}
{{- .Values.server.listen -}}
{{- else if .Values.tls.secretName -}}
{{- printf "0.0.0.0:%d" (int .Values.server.port) -}}
{{- else -}}
{{- printf "127.0.0.1:%d" (int .Values.server.port) -}}
{{- end -}}
{{- end -}}

{{- define "fpga-agent.socket" -}}/run/fpga-agent/agent.sock{{- end -}}

{{/* The HTTP listener's HOST:PORT (an IPv6 address in brackets). */}}
{{- define "fpga-agent.httpListen" -}}
{{- if contains ":" .Values.metrics.address -}}
{{- printf "[%s]:%d" .Values.metrics.address (int .Values.metrics.port) -}}
{{- else -}}
{{- printf "%s:%d" .Values.metrics.address (int .Values.metrics.port) -}}
{{- end -}}
{{- end -}}

{{/* Whether the Prometheus operator's CRDs are served, or a check is skipped (offline rendering). */}}
{{- define "fpga-agent.monitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/* The agent's configuration file (docs/operations.md lists every key). */}}
{{- define "fpga-agent.config" -}}
{{- $listen := include "fpga-agent.listen" . -}}
{{- $host := regexReplaceAll ":[0-9]+$" $listen "" | trimPrefix "[" | trimSuffix "]" -}}
{{- if not (or .Values.tls.secretName .Values.server.insecure (has $host (list "127.0.0.1" "::1" "localhost"))) -}}
{{- fail (printf "server.listen %s is not loopback: set tls.secretName (mTLS) or server.insecure: true" $listen) -}}
{{- end -}}
{{- $server := dict "listen" $listen "unix_socket" (include "fpga-agent.socket" .) -}}
{{- if .Values.server.insecure -}}{{- $_ := set $server "insecure" true -}}{{- end -}}
{{- $auth := dict "plaintext_role" .Values.auth.plaintextRole "root_is_admin" .Values.auth.rootIsAdmin -}}
{{- if .Values.auth.roles -}}{{- $_ := set $auth "roles" .Values.auth.roles -}}{{- end -}}
{{- if .Values.auth.tokenSecret -}}{{- $_ := set $auth "token_file" "/etc/fpga-agent/auth/tokens" -}}{{- end -}}
{{- /* The HTTP listener: off unless metrics.enabled; plaintext off loopback only with metrics.insecure. */ -}}
{{- $http := dict "listen" "" -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $http "listen" (include "fpga-agent.httpListen" .) -}}
{{- if not (has .Values.metrics.address (list "127.0.0.1" "::1" "localhost")) -}}
{{- if not .Values.metrics.insecure -}}
{{- fail (printf "metrics.address %s is not loopback and the HTTP listener has no TLS: set metrics.insecure: true (plaintext on the node's network; callers need a token from auth.tokenSecret) or metrics.address: 127.0.0.1" .Values.metrics.address) -}}
{{- end -}}
{{- $_ := set $http "insecure" true -}}
{{- end -}}
{{- end -}}
{{- $config := dict "server" $server "http" $http "platform" .Values.platform "state_dir" "/var/lib/fpga-agent/state" "auth" $auth "log" (dict "level" .Values.log.level "format" .Values.log.format) -}}
{{- if include "fpga-agent.linux" . -}}
{{- if .Values.linux.selectors -}}
{{- $selectors := list -}}
{{- range .Values.linux.selectors -}}
{{- $s := dict -}}
{{- with .vendors }}{{ $_ := set $s "vendors" . }}{{ end -}}
{{- with .devices }}{{ $_ := set $s "devices" . }}{{ end -}}
{{- with .drivers }}{{ $_ := set $s "drivers" . }}{{ end -}}
{{- with .pciAddresses }}{{ $_ := set $s "pci_addresses" . }}{{ end -}}
{{- $selectors = append $selectors $s -}}
{{- end -}}
{{- $_ := set $config "linux" (dict "selectors" $selectors) -}}
{{- end -}}
{{- $kubernetes := dict -}}
{{- if .Values.devicePlugin.enabled -}}
{{- $pools := list -}}
{{- range .Values.devicePlugin.pools -}}
{{- $p := dict "resource" .resource -}}
{{- with .pfs }}{{ $_ := set $p "pfs" . }}{{ end -}}
{{- $pools = append $pools $p -}}
{{- end -}}
{{- $kubernetes = dict "device_plugin" true "kubelet_dir" "/var/lib/kubelet/device-plugins" "pools" $pools -}}
{{- end -}}
{{- if .Values.dra.enabled -}}
{{- /* The node name defaults to the node id (FPGA_AGENT_NODE_ID, the pod's spec.nodeName); the API
     server, token and CA to the pod's in-cluster ones. */ -}}
{{- $_ := set $kubernetes "dra" (dict "enabled" true "driver_name" .Values.dra.driverName "registry_dir" .Values.hostPaths.kubeletPluginsRegistry "plugins_dir" .Values.hostPaths.kubeletPlugins "cdi_dir" .Values.hostPaths.cdi) -}}
{{- end -}}
{{- if $kubernetes -}}
{{- $_ := set $config "kubernetes" $kubernetes -}}
{{- end -}}
{{- else if .Values.dra.enabled -}}
{{- fail "dra.enabled needs platform: linux (a simulated node has no devices to publish to a cluster)" -}}
{{- end -}}
{{- if .Values.hypervisor.libvirt.enabled -}}
{{- if not (include "fpga-agent.linux" .) -}}
{{- fail "hypervisor.libvirt.enabled needs platform: linux (a simulated node has no VFs for libvirt's domains)" -}}
{{- end -}}
{{- $_ := set $config "hypervisor" "libvirt" -}}
{{- $libvirt := dict "uri" .Values.hypervisor.libvirt.uri -}}
{{- if .Values.hypervisor.libvirt.qemuMonitorPause }}{{ $_ := set $libvirt "qemu_monitor_pause" true }}{{ end -}}
{{- with .Values.hypervisor.libvirt.domains }}{{ $_ := set $libvirt "domains" . }}{{ end -}}
{{- with .Values.hypervisor.libvirt.metadataNamespace }}{{ $_ := set $libvirt "metadata_namespace" . }}{{ end -}}
{{- $_ := set $config "libvirt" $libvirt -}}
{{- end -}}
{{- if .Values.orchestrator.address -}}
{{- $o := dict "address" .Values.orchestrator.address -}}
{{- with .Values.orchestrator.serverName }}{{ $_ := set $o "server_name" . }}{{ end -}}
{{- if .Values.orchestrator.insecure }}{{ $_ := set $o "insecure" true }}{{ end -}}
{{- if .Values.tls.secretName -}}
{{- $_ := set $o "tls" (dict "cert" "/etc/fpga-agent/tls/tls.crt" "key" "/etc/fpga-agent/tls/tls.key" "ca" "/etc/fpga-agent/tls/ca.crt") -}}
{{- end -}}
{{- $_ := set $config "orchestrator" $o -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $config (deepCopy .Values.extraConfig)) -}}
{{- end -}}

{{/* DRA: resource.k8s.io/v1 needs Kubernetes 1.34 (an offline render, without a cluster, passes). */}}
{{- define "fpga-agent.draCheck" -}}
{{- if and .Values.dra.enabled (semverCompare "<1.34.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "dra.enabled needs Kubernetes 1.34 or later (resource.k8s.io/v1), this cluster is %s: use the device plugin" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}
