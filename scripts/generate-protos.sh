#!/usr/bin/env bash
# Regenerates the committed Swift code from Protos/. Run after editing a .proto; commit the result.
# Needs protoc (apt-get install protobuf-compiler). Builds the two protoc plugins once, from the
# pinned swift-protobuf and grpc-swift-protobuf versions, in scripts/protoc-plugins/.build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
plugins="$root/scripts/protoc-plugins"
tools="${PROTOC_PLUGIN_DIR:-$plugins/.build/release}"

if [[ ! -x "$tools/protoc-gen-swift" || ! -x "$tools/protoc-gen-grpc-swift-2" ]]; then
  (cd "$plugins" && swift build -c release --product protoc-gen-swift \
    && swift build -c release --product protoc-gen-grpc-swift-2)
fi

generate() { # OUT_DIR PROTO...
  local out="$1"; shift
  mkdir -p "$out"
  rm -f "$out"/*.pb.swift "$out"/*.grpc.swift
  protoc --proto_path="$root/Protos" \
    --plugin=protoc-gen-swift="$tools/protoc-gen-swift" --swift_out="$out" \
    --swift_opt=Visibility=Public --swift_opt=FileNaming=PathToUnderscores --swift_opt=UseAccessLevelOnImports=true \
    --plugin=protoc-gen-grpc-swift-2="$tools/protoc-gen-grpc-swift-2" --grpc-swift-2_out="$out" \
    --grpc-swift-2_opt=Visibility=Public --grpc-swift-2_opt=FileNaming=PathToUnderscores --grpc-swift-2_opt=UseAccessLevelOnImports=true \
    --grpc-swift-2_opt=Server=true,Client=true \
    "$@"
}

cd "$root/Protos"
generate "$root/Sources/FPGAAgentAPI/Generated" fpga/agent/v1/agent.proto grpc/health/v1/health.proto \
  fpga/orchestrator/v1/orchestrator.proto
generate "$root/Benchmarks/FPGAAgentBenchmarks/Generated" fpga/bench/v1/echo.proto
generate "$root/Sources/FPGADevicePlugin/Generated" k8s/deviceplugin/v1beta1/api.proto
# The kubelet's DRA contract (module FPGADRA): plugin registration, DRAPlugin v1 and v1beta1, and
# DRAResourceHealth v1alpha1 and v1. Their Swift prefixes differ (Pluginregistration_,
# K8s_Io_Kubelet_Pkg_Apis_Dra_V1_, ..._V1beta1_, V1alpha1_, V1_), so the files generate side by side.
generate "$root/Sources/FPGADRA/Generated" k8s/pluginregistration/v1/api.proto k8s/dra/v1/api.proto \
  k8s/dra/v1beta1/api.proto k8s/drahealth/v1alpha1/api.proto k8s/drahealth/v1/api.proto
echo "generated Swift code from Protos/"
