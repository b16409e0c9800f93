# Runs inside the real-kernel guest (L1): the agent as a Kubernetes DRA driver on a real kernel.
# The API server is the host's fake (fake_kube_api.py: TLS, bearer token), reached over QEMU's
# user network at 10.0.2.2; the kubelet's side is `fpga-agent dra`, which speaks the kubelet's
# protos on the same sockets. A prepared claim must leave a VF on vfio-pci, a CDI spec and device
# metadata naming its real IOMMU group and BDF, and a nested QEMU (L2) must open the VF from what
# the spec names. Placeholders: AGENT_BIN, API_PORT, TOKEN_FILE, CA_FILE, CLAIM_UID.
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0
DRIVER=qdma.xilinx.com
step() { echo; echo "== $*"; }
run() { "$@"; echo "RC=$?"; }
fail() { echo "DRA-FAIL: $*"; exit 1; }

step "network to the host's API server"
ip link set lo up
ETH=$(ls /sys/class/net | grep -v '^lo$' | head -1)
ip link set "$ETH" up && ip addr add 10.0.2.15/24 dev "$ETH" && ip route add default via 10.0.2.2
echo "interface $ETH: $(cat /sys/class/net/$ETH/operstate)"

step "2 VFs on the PF"
run $A sriov set-vfs $PF 2 $SEL

step "agent with DRA"
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
CFG="--config /tmp/agent.yaml"
$A --platform linux $SEL $CFG --listen "" --unix-socket /tmp/agent.sock --state-dir /tmp/state \
  --node-id guest --log-level debug > /tmp/agent.log 2>&1 &
AGENT=$!
i=0; while [ ! -S /tmp/plugins/$DRIVER/dra.sock ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
[ -S /tmp/plugins/$DRIVER/dra.sock ] || { cat /tmp/agent.log; fail "no DRA socket"; }
S="--server unix:/tmp/agent.sock --timeout 120"
run $A dra info $CFG
echo "DRA-SERVING"

step "prepare the claim the host's API server allocated (VF 0000:01:00.1)"
OUT=$($A dra prepare default/vf-claim CLAIM_UID $CFG 2>&1); RC=$?
echo "$OUT"; echo "RC=$RC"
[ $RC = 0 ] || { tail -30 /tmp/agent.log; fail "prepare"; }
SPEC=$(ls /tmp/cdi/*.json)
echo "CDI spec $SPEC:"; cat "$SPEC"; echo
META=$(find /tmp/plugins/$DRIVER -name '*metadata.json' | head -1)
echo "metadata $META:"; cat "$META"; echo

step "what the spec names against the kernel"
BDF=$(sed -n 's/.*PCI_RESOURCE_[A-Z_]*_VF=\([0-9a-f:.]*\).*/\1/p' "$SPEC" | head -1)
SPEC_GROUP=$(grep -o '"/dev/vfio/[0-9][0-9]*"' "$SPEC" | head -1 | tr -dc 0-9)
KERNEL_GROUP=$(basename "$(readlink /sys/bus/pci/devices/$BDF/iommu_group)")
DRV=$(basename "$(readlink /sys/bus/pci/devices/$BDF/driver)")
echo "spec BDF=$BDF group=$SPEC_GROUP; kernel group=$KERNEL_GROUP driver=$DRV"
grep -q "\"$BDF\"" "$META" && echo "metadata names $BDF" || fail "metadata does not name $BDF"
[ -c /dev/vfio/$SPEC_GROUP ] && echo "/dev/vfio/$SPEC_GROUP is a character device" || fail "no /dev/vfio/$SPEC_GROUP"
[ "$SPEC_GROUP" = "$KERNEL_GROUP" ] || fail "group $SPEC_GROUP in the spec, $KERNEL_GROUP in the kernel"
[ "$DRV" = vfio-pci ] || fail "driver $DRV"
$C $S inventory

step "L2 QEMU opens the VF the spec names"
qemu-system-x86_64 -accel tcg -machine q35 -nodefaults -display none -m 64 -S \
  -device vfio-pci,host=$BDF -qmp unix:/tmp/l2.sock,server=on,wait=off > /tmp/l2.err 2>&1 &
L2=$!
# (QMP's socket exists before the devices are realized: wait for the group's descriptor itself.)
HELD=0; i=0
while [ "$HELD" = 0 ] && [ $i -lt 600 ] && kill -0 $L2 2>/dev/null; do
  sleep 0.1; i=$((i+1)); HELD=$(ls -l /proc/$L2/fd 2>/dev/null | grep -c "/dev/vfio/$SPEC_GROUP")
done
echo "L2 holds /dev/vfio/$SPEC_GROUP: $HELD fd(s)"
cat /tmp/l2.err
[ "$HELD" -ge 1 ] || fail "L2 did not open the group"
kill $L2; wait $L2 2>/dev/null

step "unprepare"
run $A dra unprepare default/vf-claim CLAIM_UID $CFG
echo "CDI specs left: $(ls /tmp/cdi | wc -l); metadata left: $(find /tmp/plugins/$DRIVER -name '*metadata.json' | wc -l)"
$C $S inventory
step "a stale prepare of the same UID is refused"
run $A dra prepare default/vf-claim CLAIM_UID $CFG

step "unprepare of an unknown claim succeeds"
run $A dra unprepare default/other 00000000-0000-0000-0000-000000000000 $CFG
echo "DRA-DONE"
kill $AGENT; wait $AGENT
echo "agent exit $?"
