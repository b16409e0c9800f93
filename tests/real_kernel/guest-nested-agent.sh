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
printf 'linux:\n  watchdog_seconds: 3\n' > /tmp/agent.yaml
$A --platform linux $SEL --config /tmp/agent.yaml --qmp-socket l2=/tmp/l2.sock --listen "" \
  --unix-socket /tmp/agent.sock --state-dir /tmp/state --node-id guest > /tmp/agent.log 2>&1 &
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

step "reconfigure detach-reattach: dry run"
run $C $S attach $ALLOC l2
run $C $S reconfigure $PF 3 --strategy detach-reattach --dry-run
run $C $S reconfigure $PF 3 --strategy pause --dry-run

step "reconfigure detach-reattach: run"
run $C $S reconfigure $PF 3 --strategy detach-reattach
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
echo "driver of $VF: $(basename $(readlink /sys/bus/pci/devices/$VF/driver))"
echo "vfio fds of L2: $(ls -l /proc/$L2/fd 2>/dev/null | grep -c /dev/vfio/)"
run $C $S vms

step "cold-plugged holder: dry run"
COLD=0000:01:00.2
run $A sriov bind-vfio $COLD $SEL
qemu-system-x86_64 -accel tcg -machine q35 -nodefaults -display none -m 64 -S \
  -device vfio-pci,host=$COLD > /tmp/cold.err 2>&1 &
COLDPID=$!
i=0; while [ "$(ls -l /proc/$COLDPID/fd 2>/dev/null | grep -c /dev/vfio/)" -lt 2 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
echo "cold L2 pid $COLDPID holds $(ls -l /proc/$COLDPID/fd 2>/dev/null | grep -c /dev/vfio/) vfio fds"
run $C $S reconfigure $PF 1 --dry-run

step "cold-plugged holder: the write blocks"
OP=$($C $S reconfigure $PF 1 --no-wait | sed -n 's/^operation \(op-[0-9a-f]*\) .*/\1/p')
echo "operation: $OP"
i=0; while ! $C $S operation $OP | grep -q 'waiting:' && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
run $C $S operation $OP
run $C $S status
echo "agent process: $(grep State /proc/$AGENT/status)"

step "cold-plugged holder lets go"
kill $COLDPID; wait $COLDPID
run $C $S operation $OP --watch
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
run $C $S vms
run $C $S detach $ALLOC --wait 30
run $C $S release $ALLOC

kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
tail -5 /tmp/agent.log
kill $L2; wait $L2
echo "END-OF-SCENARIO"
