# Runs inside the real-kernel guest (L1): the agent (Linux platform) plugs a real VF into a
# nested QEMU (L2) with vfio-pci and unplugs it, through fpgactl and the gRPC API.
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0
VF=0000:01:00.1
step() { echo; echo "== $*"; }
run() { "$@"; echo "RC=$?"; }

step "prepare: 2 VFs, the first bound to vfio-pci"
run $A sriov set-vfs $PF 2 $SEL
run $A sriov bind-vfio $VF $SEL

step "L2 QEMU with one empty root port"
qemu-system-x86_64 -accel tcg -machine q35 -nodefaults -display none -m 64 -S \
  -global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off \
  -device pcie-root-port,id=rp1,chassis=1,slot=1 \
  -qmp unix:/tmp/l2.sock,server=on,wait=off > /tmp/l2.err 2>&1 &
L2=$!
i=0; while [ ! -S /tmp/l2.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "L2 pid $L2"

step "agent with the VM"
$A --platform linux $SEL --qmp-socket l2=/tmp/l2.sock --listen "" --unix-socket /tmp/agent.sock \
  --state-dir /tmp/state --node-id guest > /tmp/agent.log 2>&1 &
AGENT=$!
i=0; while [ ! -S /tmp/agent.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
S="--server unix:/tmp/agent.sock --timeout 120"
run $C $S vms
ALLOC=$($C $S allocate --owner nested --vm l2 | sed -n 's/^allocated \(alloc-[0-9a-f]*\):.*/\1/p')
echo "allocation: $ALLOC"

step "attach"
run $C $S attach $ALLOC l2
run $C $S vms
echo "vfio group held by: $(ls -l /proc/$L2/fd 2>/dev/null | grep -c /dev/vfio/) fds of L2"

step "unbind refused while held"
run $A sriov unbind $VF $SEL

step "detach"
run $C $S detach $ALLOC --wait 30
run $C $S vms
run $C $S release $ALLOC

kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
tail -5 /tmp/agent.log
kill $L2; wait $L2
echo "END-OF-SCENARIO"
