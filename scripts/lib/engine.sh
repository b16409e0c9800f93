# Sourced by the image scripts: picks the container engine and makes podman usable here.
# Sets $engine to podman or docker (CONTAINER_ENGINE overrides; podman first when both exist).
# For podman, CONTAINERS_CONF points at deploy/containers.conf unless already set: runc and
# ulimits inside the hard limits, which machines without CAP_SYS_RESOURCE or with hybrid cgroups
# need (see docs/operations.md, "Building the image").
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
engine="${CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
  if command -v podman >/dev/null; then engine=podman
  elif command -v docker >/dev/null; then engine=docker
  else echo "neither podman nor docker is installed" >&2; exit 1
  fi
fi
if [ "$engine" = podman ]; then
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$repo_root/deploy/containers.conf}"
fi
