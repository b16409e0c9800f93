# Runs inside the real-kernel guest (busybox sh): the agent's Linux platform against a real
# kernel's SR-IOV and VFIO, on QEMU's emulated NVMe PF (vendor 1b36, device 0010) behind an
# emulated Intel IOMMU. AGENT_BIN is replaced by the test with the folder of the binaries.
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0
D=/sys/bus/pci/devices/$PF
step() { echo; echo "== $*"; }
run() { "$@"; echo "RC=$?"; }

step "discover"
run $A sriov discover $SEL

step "agent: set-vfs 2"
run $A sriov set-vfs $PF 2 $SEL
echo "numvfs=$(cat $D/sriov_numvfs) autoprobe=$(cat $D/sriov_drivers_autoprobe)"

step "kernel: raw write of 3 while 2 are enabled"
( echo 3 > $D/sriov_numvfs ) 2>&1; echo "RC=$?"
step "kernel: raw write of 5 (over sriov_totalvfs)"
( echo 5 > $D/sriov_numvfs ) 2>&1; echo "RC=$?"

step "agent: set-vfs 3 (goes through 0 itself)"
run $A sriov set-vfs $PF 3 $SEL
echo "numvfs=$(cat $D/sriov_numvfs)"

step "agent: set-vfs 5"
run $A sriov set-vfs $PF 5 $SEL

step "agent: bind-vfio 0000:01:00.2"
run $A sriov bind-vfio 0000:01:00.2 $SEL
echo "driver=$(basename $(readlink /sys/bus/pci/devices/0000:01:00.2/driver)) vfio=$(ls /dev/vfio | tr '\n' ' ')"

step "agent: bind-vfio of the PF"
run $A sriov bind-vfio $PF $SEL

step "daemon on the linux platform"
$A --platform linux $SEL --listen "" --unix-socket /tmp/agent.sock --state-dir /tmp/state --node-id guest \
  > /tmp/agent.log 2>&1 &
AGENT=$!
i=0; while [ ! -S /tmp/agent.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
run $C --server unix:/tmp/agent.sock --timeout 60 inventory --vfs
run $C --server unix:/tmp/agent.sock --timeout 60 allocate --owner guest-test
run $C --server unix:/tmp/agent.sock --timeout 60 status
step "rescan after the VFs change behind the agent"
( echo 0 > $D/sriov_numvfs ); echo 1 > $D/sriov_numvfs
run $C --server unix:/tmp/agent.sock --timeout 60 rescan
run $C --server unix:/tmp/agent.sock --timeout 60 inventory
kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
cat /tmp/agent.log | tail -3

step "agent: set-vfs 2 with no PF driver"
echo $PF > /sys/bus/pci/drivers/nvme/unbind
run $A sriov set-vfs $PF 2 $SEL
echo $PF > /sys/bus/pci/drivers/nvme/bind
echo "END-OF-SCENARIO"
