# Runs inside the real-kernel guest (busybox sh): DRA grow on demand (issue 27) on a real kernel.
# The agent is the node's DRA driver against the host's fake API server (as in guest-dra.sh) with
# kubernetes.dra.grow_on_demand on for the NVMe PF; `fpga-agent dra prepare` is the kubelet's
# NodePrepareResources. The host answers on a small TCP gate (GATE_PORT, through QEMU's user
# network at 10.0.2.2): the guest sends what it waits for, the host checks the slices the agent
# published, puts the claim allocated to a potential VF and answers `ok UID` (or `fail WHY`).
# Placeholders: AGENT_BIN, API_PORT, TOKEN_FILE, CA_FILE, GATE_PORT.
#
#   grow     PF at 2 VFs, no holder: a claim for VF index 2 (0000:01:00.3, created: false) grows
#            the PF to 3 and is prepared on the new VF (vfio-pci, CDI spec with its group); timed
#   held     the PF back at 2, VF .1 hot-plugged into a nested QEMU (L2) through the agent's QMP
#            backend; with grow_allow_replug off the PF is not offered and a Prepare is refused
#            naming the holder
#   replug   agent restarted with grow_allow_replug on: the growth detaches VF .1 from L2,
#            re-creates the VFs and plugs the new .1 back (stock QEMU cannot pause)
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0
D=/sys/bus/pci/devices
DRIVER=qdma.xilinx.com
S="--server unix:/tmp/agent.sock --timeout 120"
CFG="--config /tmp/agent.yaml"
step() { echo; echo "== $* [uptime $(ms) ms]"; }
run() { "$@"; echo "RC=$?"; }
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
fail() { echo "GROW-FAIL: $*"; }
drv() { if [ -e $D/$1/driver ]; then basename "$(readlink $D/$1/driver)"; else echo none; fi; }
grp() { basename "$(readlink $D/$1/iommu_group)"; }
layout() {
  echo "$PF driver=$(drv $PF) sriov_numvfs=$(cat $D/$PF/sriov_numvfs)"
  for vf in $(ls $D | grep -E '^0000:01:00\.[1-9]$'); do echo "  VF $vf driver=$(drv $vf) group=$(grp $vf)"; done
}
# gate REQUEST: asks the host; prints its answer line ("ok UID" or "fail WHY").
gate() { echo "$1" | nc 10.0.2.2 GATE_PORT; }
# The operations in the agent's state (its HTTP API, as the dashboard reads it).
state() { wget -qO- http://127.0.0.1:8080/api/state; }
ops() { state | grep -o '"id":"op-[0-9a-f]*"' | cut -d'"' -f4 | sort -u; }
config() {  # $1: grow_allow_replug
  cat > /tmp/agent.yaml <<EOF
kubernetes:
  dra:
    enabled: true
    node_name: guest
    registry_dir: /tmp/registry
    plugins_dir: /tmp/plugins
    cdi_dir: /tmp/cdi
    grow_on_demand: true
    grow_pfs: ["$PF"]
    grow_allow_replug: $1
  api:
    server: https://10.0.2.2:API_PORT
    token_file: TOKEN_FILE
    ca_file: CA_FILE
EOF
}
start_agent() {
  rm -f /tmp/agent.sock
  $A --platform linux $SEL $CFG --qmp-socket l2=/tmp/l2.sock --listen "" --http-listen 127.0.0.1:8080 \
    --unix-socket /tmp/agent.sock --state-dir /tmp/state --node-id guest --log-level debug >> /tmp/agent.log 2>&1 &
  AGENT=$!
  i=0; while { [ ! -S /tmp/plugins/$DRIVER/dra.sock ] || [ ! -S /tmp/agent.sock ]; } && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
  [ -S /tmp/agent.sock ] || { tail -30 /tmp/agent.log; fail "agent did not start"; exit 1; }
}
stop_agent() { kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"; }
# The agent logs wall-clock times: one uptime reading at a second boundary relates the two.
calibrate() {
  s=$(date +%s); while w=$(date +%s); [ "$w" = "$s" ]; do :; done
  u=$(ms); echo "clock: wall $w at uptime $u ms"
}
# prepare NAME UID: the kubelet's Prepare, timed in ms (uptime) around the call.
prepare() {
  before=$(ops)
  calibrate
  t0=$(ms)
  OUT=$($A dra prepare default/$1 $2 $CFG 2>&1); RC=$?
  t1=$(ms)
  echo "$OUT"; echo "RC=$RC"
  echo "prepare call: sent at $t0 ms, answered at $t1 ms: $((t1 - t0)) ms"
  OP=""
  for op in $(ops); do echo "$before" | grep -qx "$op" || OP=$op; done
  echo "operation: ${OP:-none}"
  grep -E "growing a PF|claim prepared|claim preparation failed" /tmp/agent.log | grep "$2" | sed 's/^/log: /'
}

step "network to the host"
ip link set lo up
ETH=$(ls /sys/class/net | grep -v '^lo$' | head -1)
ip link set "$ETH" up && ip addr add 10.0.2.15/24 dev "$ETH" && ip route add default via 10.0.2.2
echo "interface $ETH: $(cat /sys/class/net/$ETH/operstate)"

step "2 VFs on the PF"
run $A sriov set-vfs $PF 2 $SEL
echo "sriov_offset=$(cat $D/$PF/sriov_offset) sriov_stride=$(cat $D/$PF/sriov_stride) sriov_totalvfs=$(cat $D/$PF/sriov_totalvfs)"
layout

step "L2 QEMU with one empty root port"
qemu-system-x86_64 -accel tcg -machine q35 -nodefaults -display none -m 64 -S \
  -global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off \
  -device pcie-root-port,id=rp1,chassis=1,slot=1 \
  -qmp unix:/tmp/l2.sock,server=on,wait=off > /tmp/l2.err 2>&1 &
L2=$!
i=0; while [ ! -S /tmp/l2.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "L2 pid $L2"

step "agent with DRA and grow on demand (grow_allow_replug off)"
config false
start_agent

step "grow: the host sees the potential VFs and allocates index 2"
ANSWER=$(gate offered); echo "host: $ANSWER"
UID1=$(echo "$ANSWER" | sed -n 's/^ok //p')
[ -n "$UID1" ] || { fail "host: $ANSWER"; exit 1; }

step "grow: the kubelet prepares the claim"
prepare grow-claim $UID1
GROW_OP=$OP
[ "$RC" = 0 ] || { tail -40 /tmp/agent.log; fail "prepare"; }

step "grow: what the kernel and the spec say"
layout
VF=0000:01:00.3
SPEC=$(grep -l "$UID1" /tmp/cdi/*.json | head -1)
echo "CDI spec $SPEC:"; cat "$SPEC"; echo
BDF=$(sed -n 's/.*PCI_RESOURCE_[A-Z_]*_VF=\([0-9a-f:.]*\).*/\1/p' "$SPEC" | head -1)
SPEC_GROUP=$(grep -o '"/dev/vfio/[0-9][0-9]*"' "$SPEC" | head -1 | tr -dc 0-9)
echo "spec BDF=$BDF group=$SPEC_GROUP; kernel group=$(grp $VF) driver=$(drv $VF) numvfs=$(cat $D/$PF/sriov_numvfs)"
ls -l /dev/vfio/$SPEC_GROUP
echo "growth operation: $GROW_OP"
run $C $S operation $GROW_OP
echo "STATE-JSON $(state)"
echo "METRICS $(wget -qO- http://127.0.0.1:8080/metrics | grep -E '^fpga_dra_growth' | tr '\n' ' ')"

step "grow: unprepare, the PF back at 2 VFs"
run $A dra unprepare default/grow-claim $UID1 $CFG
run $C $S reconfigure $PF 2
layout

step "held: VF .1 hot-plugged into L2"
run $A sriov bind-vfio 0000:01:00.1 $SEL
i=0; while ! $C $S inventory --vfs 2>/dev/null | grep -q '^0000:01:00.1 .*vfio-pci' && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
ALLOC=$($C $S allocate --owner nested --vm l2 --pf $PF | sed -n 's/^allocated \(alloc-[0-9a-f]*\): VF \([0-9a-f:.]*\).*/\1 \2/p')
echo "allocation: $ALLOC"
ALLOC_ID=${ALLOC%% *}
run $C $S attach $ALLOC_ID l2
run $C $S vms
echo "L2 holds $(ls -l /proc/$L2/fd 2>/dev/null | grep -c /dev/vfio/) vfio fds; VF .1 group $(grp 0000:01:00.1)"

step "held: replug off, the PF is not offered"
ANSWER=$(gate held); echo "host: $ANSWER"
UID2=$(echo "$ANSWER" | sed -n 's/^ok //p')
[ -n "$UID2" ] || fail "host: $ANSWER"

step "held: the Prepare is refused"
prepare held-claim $UID2
echo "sriov_numvfs=$(cat $D/$PF/sriov_numvfs); L2 holds $(ls -l /proc/$L2/fd 2>/dev/null | grep -c /dev/vfio/) vfio fds"

step "replug: agent restarted with grow_allow_replug on"
stop_agent
config true
start_agent
OLD_GROUP=$(grp 0000:01:00.1)

step "replug: the host sees the potential VFs again"
ANSWER=$(gate replug); echo "host: $ANSWER"
UID3=$(echo "$ANSWER" | sed -n 's/^ok //p')
[ -n "$UID3" ] || fail "host: $ANSWER"

step "replug: the kubelet prepares the claim"
prepare replug-claim $UID3
REPLUG_OP=$OP

step "replug: what the kernel, L2 and the spec say"
layout
SPEC=$(grep -l "$UID3" /tmp/cdi/*.json | head -1)
SPEC_GROUP=$(grep -o '"/dev/vfio/[0-9][0-9]*"' "$SPEC" | head -1 | tr -dc 0-9)
echo "spec group=$SPEC_GROUP; kernel group of 0000:01:00.3=$(grp 0000:01:00.3) driver=$(drv 0000:01:00.3) numvfs=$(cat $D/$PF/sriov_numvfs)"
echo "VF .1 group before $OLD_GROUP, now $(grp 0000:01:00.1) driver=$(drv 0000:01:00.1)"
echo "L2 holds $(ls -l /proc/$L2/fd 2>/dev/null | grep -c /dev/vfio/) vfio fds: $(ls -l /proc/$L2/fd 2>/dev/null | grep -o '/dev/vfio/[0-9]*' | tr '\n' ' ')"
run $C $S vms
echo "replug operation: $REPLUG_OP"
run $C $S operation $REPLUG_OP
echo "STATE-JSON $(state)"

step "end"
stop_agent
grep -iE "error|warning" /tmp/agent.log | tail -8
kill $L2; wait $L2
echo "END-OF-SCENARIO"
