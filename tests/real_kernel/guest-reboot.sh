# Runs inside the real-kernel guest (busybox sh): the agent's records across a host reboot
# (issue 23). The guest boots twice in one QEMU (run-in-guest.sh with REBOOT=1): the first boot
# ends with `reboot -f`, a machine reset that brings the PFs back with 0 VFs, and the same
# initramfs runs this script again under a new kernel boot_id. The agent's state directory
# survives on a small raw disk the host gives QEMU as a virtio-blk device (/dev/vda): the first
# boot writes /tmp/state onto it with tar, the second finds the archive there (that is how it
# knows it is the second) and extracts it before the agent starts. The agent is also the node's
# DRA driver, against the host's fake API server (as in guest-dra.sh). Placeholders: AGENT_BIN,
# API_PORT, TOKEN_FILE, CA_FILE, CLAIM_UID.
#
#   first   agent on both NVMe PFs; PF to 2 VFs, PF2 to 1 (fpgactl reconfigure); one VF of PF
#           allocated (fpgactl) and bound to vfio-pci, the other prepared for a DRA claim;
#           agent stopped; the state (not the CDI folder: /var/run/cdi is a tmpfs on a real
#           host) onto /dev/vda; reboot
#   second  the state back; PF2's nvme driver unbound (a PF driver that did not come back) so its
#           restore must fail; agent started on the same state: PF restored (2 VFs, the
#           allocated VFs on vfio-pci with their /dev/vfio/N, the allocations intact), PF2
#           reported; the claim's CDI spec (written again by the agent at its start) and the
#           kubelet's prepare of the claim again name the same VF and its IOMMU group;
#           then another "reboot" with layout.restore_on_boot=false: the VFs removed through sysfs
#           and a new boot id given through layout.boot_id_file (the kernel's own boot id changes
#           only with a reboot, which would cost another boot)
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0      # nvme0 on rp1, 4 VFs at most
PF2=0000:02:00.0     # nvme1 on rp2, 4 VFs at most
D=/sys/bus/pci/devices
S="--server unix:/tmp/agent.sock --timeout 60"
DRIVER=qdma.xilinx.com
CFG="--config /tmp/agent.yaml"
step() { echo; echo "== $* [uptime $(ms) ms]"; }
run() { "$@"; echo "RC=$?"; }
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
fail() { echo "REBOOT-FAIL: $*"; }
# poll LIMIT_MS COMMAND...: runs COMMAND every 100 ms until it succeeds (output in /tmp/poll.out).
poll() {
  limit=$1; shift; start=$(ms)
  while :; do
    "$@" > /tmp/poll.out 2>&1 && return 0
    [ $(( $(ms) - start )) -ge "$limit" ] && return 1
    sleep 0.1
  done
}
drv() { if [ -e $D/$1/driver ]; then basename "$(readlink $D/$1/driver)"; else echo none; fi; }
layout() {
  for dev in $PF $PF2; do
    echo "$dev driver=$(drv $dev) sriov_numvfs=$(cat $D/$dev/sriov_numvfs)"
  done
  for vf in $(ls $D | grep -E '^0000:0[12]:00\.[1-9]$'); do
    echo "  VF $vf driver=$(drv $vf) group=$(basename "$(readlink $D/$vf/iommu_group)")"
  done
  echo "  /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
}
start_agent() {  # extra flags in $@
  $A --platform linux $SEL $CFG --listen "" --http-listen "" --unix-socket /tmp/agent.sock --state-dir /tmp/state \
    --node-id guest --log-level debug "$@" >> /tmp/agent.log 2>&1 &
  AGENT=$!
  [ -z "$CFG" ] || poll 120000 test -S /tmp/plugins/$DRIVER/dra.sock || fail "no DRA socket"
  poll 120000 test -S /tmp/agent.sock || fail "no agent socket"
  echo "agent up at $(ms) ms of uptime"
}
stop_agent() { kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"; rm -f /tmp/agent.sock /tmp/plugins/$DRIVER/dra.sock; }
# prepare: the kubelet's NodePrepareResources for the claim; prints the CDI spec's VF and group.
prepare() {
  $A dra prepare default/vf-claim CLAIM_UID $CFG > /tmp/prepare.out 2>&1; echo "RC=$?"; cat /tmp/prepare.out
  spec
}
spec() {
  SPEC=$(ls /tmp/cdi/*.json 2>/dev/null | head -1)
  [ -n "$SPEC" ] || { echo "no CDI spec"; return; }
  BDF=$(sed -n 's/.*PCI_RESOURCE_[A-Z_]*_VF=\([0-9a-f:.]*\).*/\1/p' "$SPEC" | head -1)
  SPEC_GROUP=$(grep -o '"/dev/vfio/[0-9][0-9]*"' "$SPEC" | head -1 | tr -dc 0-9)
  echo "CDI spec $SPEC: BDF=$BDF group=$SPEC_GROUP; kernel group=$(basename "$(readlink $D/$BDF/iommu_group)")" \
    "driver=$(drv $BDF)"
}
status_has() { $C $S status > /tmp/status.out 2>&1 && grep -qE "$1" /tmp/status.out; }

poll 10000 test -b /dev/vda || fail "no /dev/vda (virtio_blk)"
if tar -tf /dev/vda 2>/dev/null | grep -q '^first-boot$'; then PHASE=second; else PHASE=first; fi
step "boot ($PHASE)"
echo "boot_id $(cat /proc/sys/kernel/random/boot_id)"
echo "uptime $(ms) ms; state disk: /dev/vda $(cat /sys/block/vda/size) sectors"
ip link set lo up
ETH=$(ls /sys/class/net | grep -v '^lo$' | head -1)
ip link set "$ETH" up && ip addr add 10.0.2.15/24 dev "$ETH" && ip route add default via 10.0.2.2
cat > /tmp/agent.yaml <<EOF
kubernetes:
  dra:
    enabled: true
    node_name: guest
    registry_dir: /tmp/registry
    plugins_dir: /tmp/plugins
    cdi_dir: /tmp/cdi
  api:
    server: https://10.0.2.2:API_PORT
    token_file: TOKEN_FILE
    ca_file: CA_FILE
EOF

if [ "$PHASE" = first ]; then
  step "first boot: agent, 2 VFs on $PF and 1 on $PF2"
  layout
  start_agent
  run $C $S reconfigure $PF 2
  run $C $S reconfigure $PF2 1
  step "first boot: the DRA claim prepared (VF 0000:01:00.2)"
  prepare
  step "first boot: the other VF allocated and bound to vfio-pci"
  $C $S allocate --owner reboot-test --pf $PF > /tmp/alloc.out 2>&1; echo "RC=$?"; cat /tmp/alloc.out
  ALLOC=$(sed -n 's/^allocated \(alloc-[0-9a-f]*\):.*/\1/p' /tmp/alloc.out)
  VF=$(sed -n 's/^allocated alloc-[0-9a-f]*: VF \([0-9a-f:.]*\).*/\1/p' /tmp/alloc.out)
  echo "allocation: $ALLOC of VF $VF"
  run $A sriov bind-vfio $VF $SEL
  layout
  stop_agent
  step "state onto /dev/vda, then reboot"
  ls -la /tmp/state
  echo "ALLOC=$ALLOC VF=$VF CLAIM_VF=$BDF CLAIM_GROUP=$SPEC_GROUP" > /tmp/first-boot
  tar -cf /dev/vda -C /tmp state first-boot && sync && echo "state saved: $(tar -tf /dev/vda | tr '\n' ' ')"
  echo "rebooting at uptime $(ms) ms"
  reboot -f
  sleep 30; fail "still running after reboot -f"; exit 1
else
  step "second boot: the state back, the PFs as the kernel found them"
  tar -xf /dev/vda -C /tmp && echo "state restored: $(ls /tmp/state | tr '\n' ' ')"
  . /tmp/first-boot; echo "first boot: allocation $ALLOC of VF $VF; claim on VF $CLAIM_VF, group $CLAIM_GROUP"
  layout
  echo "$PF2 unbound from nvme (its PF driver did not come back)"
  echo $PF2 > /sys/bus/pci/drivers/nvme/unbind
  start_agent
  step "after the restore"
  poll 30000 status_has "^restore +PF $PF restored" || fail "no restore row for $PF"
  cat /tmp/status.out
  OP=$(sed -n "s/^restore .*PF $PF restored .*\(op-[0-9a-f]*\)$/\1/p" /tmp/status.out)
  layout
  GROUP=$(basename "$(readlink $D/$VF/iommu_group)")
  echo "allocated VF $VF: driver=$(drv $VF) group=$GROUP $(ls -l /dev/vfio/$GROUP 2>&1)"
  run $C $S inventory --vfs
  echo "operation: $OP"
  run $C $S operation $OP
  echo "audit trail:"; grep LayoutRestored /tmp/state/audit.log
  grep -E "rebooted|restore|op-" /tmp/agent.log | tail -8

  step "the kubelet prepares the claim again"
  # /tmp/cdi did not survive the reboot (as /var/run/cdi would not): what the agent wrote at its start
  echo "CDI specs before the prepare: $(ls /tmp/cdi 2>/dev/null | wc -l)"; spec
  prepare

  step "another boot with layout.restore_on_boot=false"
  stop_agent
  # What a reboot does to the PF (its VFs gone), done through sysfs; the new boot id from a file.
  echo 0 > $D/$PF/sriov_numvfs
  cat /proc/sys/kernel/random/uuid > /tmp/boot_id
  echo "boot id file: $(cat /tmp/boot_id); $PF sriov_numvfs=$(cat $D/$PF/sriov_numvfs)"
  CFG=  # (no DRA driver this time: quicker to start)
  start_agent --set layout.boot_id_file=/tmp/boot_id --set layout.restore_on_boot=false
  run $C $S status
  layout
  stop_agent
fi
step "end"
grep -iE "error|warning" /tmp/agent.log | tail -8
echo "END-OF-SCENARIO"
