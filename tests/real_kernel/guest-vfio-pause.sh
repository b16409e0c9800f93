# Runs inside the real-kernel guest (L1): a nested QEMU (L2) built with the VFIO pause patch
# (qemu/vfio-pause, PAUSE_QEMU) holds VF 0000:01:00.1 through vfio-pci. First the patch's QMP
# commands alone, on a VF cold-plugged on L2's command line (its BARs assigned by L2's firmware):
# pause, the PF's VFs re-created underneath, resume. Then the agent reconfigures the PF 2 -> 3
# with strategy pause while a hot-plugged VF is in L2.
# L2 is watched through a second QMP monitor on plain files (commands into a FIFO, answers and
# events appended to a file), so busybox's shell is enough; the test parses the JSON lines.
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
Q=PAUSE_QEMU
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0
VF=0000:01:00.1
step() { echo; echo "== $*"; }
run() { "$@"; echo "RC=$?"; }
now() { cut -d' ' -f1 /proc/uptime; }
vfio_fds() { ls -l /proc/$1/fd 2>/dev/null | grep -c /dev/vfio/; }
group_of() { basename "$(readlink /sys/bus/pci/devices/$1/iommu_group)"; }
relays() { dmesg | grep -c "Relaying device request"; }

# L2 with a monitor MON on a pipe chardev (FIFOs /tmp/MON.in and /tmp/MON.out; what QEMU writes is
# copied to /tmp/MON.log) and the agent's socket /tmp/l2.sock.
start_l2() { # MON EXTRA-ARGS...
  mon=$1; shift
  rm -f /tmp/$mon.in /tmp/$mon.out /tmp/$mon.log; mkfifo /tmp/$mon.in /tmp/$mon.out
  exec 3<>/tmp/$mon.in
  cat /tmp/$mon.out > /tmp/$mon.log &
  $Q -L /usr/share/seabios -L /usr/share/qemu -accel tcg -machine q35 -nodefaults -display none -m 64 \
    -global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off \
    -device pcie-root-port,id=rp1,chassis=1,slot=1 \
    -qmp unix:/tmp/l2.sock,server=on,wait=off \
    -chardev pipe,id=$mon,path=/tmp/$mon -mon chardev=$mon,mode=control \
    -chardev file,id=bios,path=/tmp/$mon.bios -device isa-debugcon,iobase=0x402,chardev=bios \
    "$@" > /tmp/$mon.err 2>&1 &
  L2=$!
  MON=$mon
  i=0; while ! grep -q '"QMP"' /tmp/$mon.log 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  echo "L2 pid $L2"
  echo 0 > /tmp/$mon.n
  qmp qmp_capabilities > /dev/null
}
qmp() { # COMMAND [ARGUMENTS-JSON]: sends it, waits for its answer, prints "QMP> command" and the answer
  N=$(( $(cat /tmp/$MON.n) + 1 )); echo $N > /tmp/$MON.n  # a file: qmp also runs in subshells
  if [ -n "$2" ]; then
    echo "{\"execute\": \"$1\", \"arguments\": $2, \"id\": \"$MON-$N\"}" >&3
  else
    echo "{\"execute\": \"$1\", \"id\": \"$MON-$N\"}" >&3
  fi
  i=0; while ! grep -q "\"id\": \"$MON-$N\"" /tmp/$MON.log && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
  echo "QMP> $1 ${2:-}"
  grep "\"id\": \"$MON-$N\"" /tmp/$MON.log
}
events() { grep '"event"' /tmp/$MON.log | grep -v '"event": "STOP"\|"event": "RESUME"'; }
wait_firmware() { # until L2's firmware (SeaBIOS) has set up PCI and looked for a boot device, then stop L2
  i=0; while ! grep -q 'No bootable device\|Booting from' /tmp/$MON.bios && [ $i -lt 1200 ]; do sleep 0.5; i=$((i+1)); done
  qmp stop > /dev/null
  echo "L2 firmware done at $(now), L2 stopped: $(grep -a 'No bootable device\|Booting from' /tmp/$MON.bios | head -1)"
}
bar0() { # guest-physical address of vf0's BAR 0 from query-pci
  qmp query-pci | sed 's/.*"qdev_id": "vf0"//' | tr '{}' '\n\n' | grep '"bar": 0' | sed -n 's/.*"address": \([0-9]*\).*/\1/p' | head -1
}
xp() { # reads 2 words at guest-physical ADDR through L2's memory map (trapped to QEMU's vfio BAR)
  qmp human-monitor-command "{\"command-line\": \"xp /2wx $1\"}"
}

step "prepare: 2 VFs, the first bound to vfio-pci"
run $A sriov set-vfs $PF 2 $SEL
run $A sriov bind-vfio $VF $SEL
echo "group of $VF: $(group_of $VF)"

step "direct: L2 with the VF cold-plugged, firmware run"
start_l2 mon1 -device vfio-pci,host=$VF,id=vf0,bus=rp1
wait_firmware
echo "vfio fds of L2: $(vfio_fds $L2)"
qmp query-commands | grep -o '"name": "x-vfio-[a-z]*"'
qmp query-pci
BAR=$(bar0)
echo "BAR0 of vf0 at $BAR"
[ -n "$BAR" ] && xp $((BAR))

step "direct: errors"
qmp x-vfio-pause '{"id": "nosuch"}'
qmp x-vfio-pause '{"id": "rp1"}'
qmp x-vfio-resume '{"id": "rp1"}'

step "direct: pause"
qmp x-vfio-pause '{"id": "vf0"}'
qmp x-vfio-pause '{"id": "vf0"}'
echo "paused: vfio fds of L2: $(vfio_fds $L2)"
qmp query-pci
[ -n "$BAR" ] && xp $((BAR))

step "direct: the VFs re-created under the paused device"
r0=$(relays); t0=$(now)
echo 0 > /sys/bus/pci/devices/$PF/sriov_numvfs; echo "write 0 rc=$? from $t0 to $(now)"
echo "relayed device requests during the write: $(( $(relays) - r0 ))"
qmp x-vfio-resume '{"id": "vf0"}'
echo 2 > /sys/bus/pci/devices/$PF/sriov_numvfs; echo "write 2 rc=$?"
echo "driver of $VF: $(basename "$(readlink /sys/bus/pci/devices/$VF/driver)" 2>/dev/null)"
qmp x-vfio-resume '{"id": "vf0"}'
run $A sriov bind-vfio $VF $SEL
echo "group of $VF: $(group_of $VF)"

step "direct: resume"
qmp x-vfio-resume '{"id": "vf0"}'
qmp x-vfio-resume '{"id": "vf0"}'
echo "resumed: vfio fds of L2: $(vfio_fds $L2)"
ls -l /proc/$L2/fd | grep /dev/vfio/ | sed 's/.*-> /fd -> /'
qmp query-pci
[ -n "$BAR" ] && xp $((BAR))
echo "EVENTS-BEGIN"; events; echo "EVENTS-END"
kill $L2; wait $L2
cat /tmp/mon1.err
exec 3>&-

step "agent: L2 with an empty root port, firmware run"
start_l2 mon2
wait_firmware
printf 'linux:\n  watchdog_seconds: 3\n' > /tmp/agent.yaml
start_agent() { # [LOG]: the agent on the same state directory (env passes through)
  rm -f /tmp/agent.sock
  $A --platform linux $SEL --config /tmp/agent.yaml --qmp-socket l2=/tmp/l2.sock --listen "" \
    --unix-socket /tmp/agent.sock --state-dir /tmp/state --node-id guest >> /tmp/${1:-agent}.log 2>&1 &
  AGENT=$!
  i=0; while [ ! -S /tmp/agent.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
}
count() { grep -c "$1" /tmp/mon2.log; }
start_agent
S="--server unix:/tmp/agent.sock --timeout 120"
run $C $S vms
ALLOC=$($C $S allocate --owner nested --vm l2 | sed -n 's/^allocated \(alloc-[0-9a-f]*\):.*/\1/p')
echo "allocation: $ALLOC"
run $C $S attach $ALLOC l2
echo "vfio fds of L2: $(vfio_fds $L2)"
echo "group of $VF: $(group_of $VF)"
qmp query-pci

step "agent: reconfigure 2 -> 3, strategy pause"
run $C $S reconfigure $PF 3 --strategy pause --dry-run
# Samples while the operation runs: L2's vfio fds, between two reads of the events seen so far.
( while [ ! -f /tmp/stop-sampler ]; do
    p1=$(grep -c VFIO_DEVICE_PAUSED /tmp/mon2.log); r1=$(grep -c VFIO_DEVICE_RESUMED /tmp/mon2.log)
    f=$(vfio_fds $L2)
    p2=$(grep -c VFIO_DEVICE_PAUSED /tmp/mon2.log); r2=$(grep -c VFIO_DEVICE_RESUMED /tmp/mon2.log)
    echo "SAMPLE $(now) paused=$p1/$p2 resumed=$r1/$r2 fds=$f"
    sleep 0.05
  done > /tmp/samples ) &
SAMPLER=$!
r0=$(relays)
run $C $S reconfigure $PF 3 --strategy pause
touch /tmp/stop-sampler; wait $SAMPLER
echo "relayed device requests during the operation: $(( $(relays) - r0 ))"
echo "samples: $(wc -l < /tmp/samples)"
echo "paused samples without vfio fds: $(grep 'paused=1/1 resumed=0/0' /tmp/samples | grep -c 'fds=0$')"
cat /tmp/samples
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
echo "group of $VF: $(group_of $VF)"
echo "resumed: vfio fds of L2: $(vfio_fds $L2)"
ls -l /proc/$L2/fd | grep /dev/vfio/ | sed 's/.*-> /fd -> /'
qmp query-pci
run $C $S vms
run $C $S inventory
echo "EVENTS-BEGIN"; events; echo "EVENTS-END"

step "agent: SIGKILL while the device is paused, 3 -> 2"
p0=$(count VFIO_DEVICE_PAUSED); r0=$(count VFIO_DEVICE_RESUMED)
OP=$($C $S reconfigure $PF 2 --strategy pause --no-wait | sed -n 's/^operation \(op-[0-9a-f]*\) .*/\1/p')
echo "operation: $OP"
i=0; while [ "$(count VFIO_DEVICE_PAUSED)" -le "$p0" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
kill -KILL $AGENT; wait $AGENT; echo "AGENT-KILLED=$?"
echo "killed: paused $(( $(count VFIO_DEVICE_PAUSED) - p0 )) resumed $(( $(count VFIO_DEVICE_RESUMED) - r0 ))," \
  "vfio fds of L2: $(vfio_fds $L2)"
start_agent agent-restarted
run $C $S operation $OP --watch
echo "after the restart: paused $(( $(count VFIO_DEVICE_PAUSED) - p0 )) resumed $(( $(count VFIO_DEVICE_RESUMED) - r0 ))"
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
echo "group of $VF: $(group_of $VF)"
echo "resumed: vfio fds of L2: $(vfio_fds $L2)"
ls -l /proc/$L2/fd | grep /dev/vfio/ | sed 's/.*-> /fd -> /'
$C $S status | grep "unfinished at start-up"
qmp query-pci

step "agent: a refused resume falls back to a replug, 2 -> 3"
kill -TERM $AGENT; wait $AGENT
FPGA_AGENT_FAULT_INJECTION=crash-before:resume start_agent agent-crashing
p0=$(count VFIO_DEVICE_PAUSED); r0=$(count VFIO_DEVICE_RESUMED); d0=$(count DEVICE_DELETED)
OP=$($C $S reconfigure $PF 3 --strategy pause --no-wait | sed -n 's/^operation \(op-[0-9a-f]*\) .*/\1/p')
echo "operation: $OP"
wait $AGENT; echo "AGENT-CRASHED=$?"
grep -a "injected crash" /tmp/agent-crashing.log | head -1
echo "crashed: paused $(( $(count VFIO_DEVICE_PAUSED) - p0 )) resumed $(( $(count VFIO_DEVICE_RESUMED) - r0 ))"
# While the agent is down, the new VF leaves vfio-pci: QEMU cannot re-open it.
echo $VF > /sys/bus/pci/devices/$VF/driver/unbind; echo "unbound $VF from vfio-pci rc=$?"
start_agent agent-fallback
run $C $S operation $OP --watch
echo "after the fallback: paused $(( $(count VFIO_DEVICE_PAUSED) - p0 )) resumed $(( $(count VFIO_DEVICE_RESUMED) - r0 ))" \
  "deleted $(( $(count DEVICE_DELETED) - d0 ))"
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
echo "driver of $VF: $(basename "$(readlink /sys/bus/pci/devices/$VF/driver)" 2>/dev/null)"
echo "replugged: vfio fds of L2: $(vfio_fds $L2)"
qmp query-pci
run $C $S inventory
echo "EVENTS-BEGIN"; events; echo "EVENTS-END"

kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
tail -5 /tmp/agent-fallback.log
kill $L2; wait $L2
cat /tmp/mon2.err
echo "END-OF-SCENARIO"
