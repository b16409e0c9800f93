# Runs inside the real-kernel guest (L1) for Benchmarks/vfio-pause-outage (P7): how long a VF held
# by a VM is unusable while its PF is re-laid out. A nested QEMU (L2) built with the VFIO pause
# patch (qemu/vfio-pause, PAUSE_QEMU) holds VF 0000:01:00.1, hot-plugged by the agent. Each round
# measures three kinds, each once per direction (2 -> 3 and 3 -> 2 VFs), in a rotating order:
#   pause   `fpgactl reconfigure PF N --strategy pause`
#   replug  `fpgactl reconfigure PF N --strategy detach-reattach`
#   floor   the kernel and vfio alone (agent stopped, L2's device paused by hand beforehand):
#           write 0, write N to sriov_numvfs, bind the VF to vfio-pci, /dev/vfio/N there
# This script only records raw data (the operation as JSON from the agent's HTTP API, L2's QMP
# events with their timestamps, the floor's clock readings); the runner computes the figures.
# Helpers copied from guest-vfio-pause.sh.
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
Q=PAUSE_QEMU
ROUNDS=BENCH_ROUNDS
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0
VF=0000:01:00.1
S="--server unix:/tmp/agent.sock --timeout 120"
step() { echo; echo "== $*"; }
run() { "$@"; echo "RC=$?"; }
vfio_fds() { ls -l /proc/$1/fd 2>/dev/null | grep -c /dev/vfio/; }
group_of() { basename "$(readlink /sys/bus/pci/devices/$1/iommu_group)"; }

# The clock, best first: `date +%s.%N` if busybox's date gives nanoseconds, else `adjtimex`
# (CLOCK_REALTIME in microseconds, as the agent's step times and QEMU's event timestamps), else
# /proc/uptime (10 ms). stamp NAME reads it into a file (one process, nothing else in between);
# readts NAME prints it in seconds.
if date +%s.%N | grep -q '^[0-9]*\.[0-9]\{9\}$'; then
  CLOCK=date; stamp() { date +%s.%N > /tmp/ts.$1; }
elif adjtimex 2>/dev/null | grep -q 'time.tv_usec'; then
  CLOCK=adjtimex; stamp() { adjtimex > /tmp/ts.$1; }
else
  CLOCK=uptime; stamp() { cat /proc/uptime > /tmp/ts.$1; }
fi
readts() {
  case $CLOCK in
    date) cat /tmp/ts.$1 ;;
    adjtimex) awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d.%06d\n", s, u}' /tmp/ts.$1 ;;
    uptime) cut -d' ' -f1 /tmp/ts.$1 ;;
  esac
}
ts() { stamp now; readts now; }
stamp c0; stamp c1; stamp c2; stamp c3
echo "CLOCK $CLOCK: $(readts c0) $(readts c1) $(readts c2) $(readts c3) (three back-to-back readings' spacing = one reading's cost)"

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
  N=$(( $(cat /tmp/$MON.n) + 1 )); echo $N > /tmp/$MON.n
  if [ -n "$2" ]; then
    echo "{\"execute\": \"$1\", \"arguments\": $2, \"id\": \"$MON-$N\"}" >&3
  else
    echo "{\"execute\": \"$1\", \"id\": \"$MON-$N\"}" >&3
  fi
  i=0; while ! grep -q "\"id\": \"$MON-$N\"" /tmp/$MON.log && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
  echo "QMP> $1 ${2:-}"
  grep "\"id\": \"$MON-$N\"" /tmp/$MON.log
}
wait_firmware() { # until L2's firmware (SeaBIOS) has set up PCI and looked for a boot device, then stop L2
  i=0; while ! grep -q 'No bootable device\|Booting from' /tmp/$MON.bios && [ $i -lt 1200 ]; do sleep 0.5; i=$((i+1)); done
  qmp stop > /dev/null
  echo "L2 firmware done, L2 stopped: $(grep -a 'No bootable device\|Booting from' /tmp/$MON.bios | head -1)"
}
start_agent() {
  rm -f /tmp/agent.sock
  t0=$(ts)
  $A --platform linux $SEL --config /tmp/agent.yaml --qmp-socket l2=/tmp/l2.sock --listen "" \
    --http-listen 127.0.0.1:50080 --unix-socket /tmp/agent.sock --state-dir /tmp/state --node-id guest \
    >> /tmp/agent.log 2>&1 &
  AGENT=$!
  i=0; while ! $C $S status > /dev/null 2>&1 && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  echo "AGENT-STARTED pid $AGENT in $(awk "BEGIN{print $(ts) - $t0}") s"
}
stop_agent() {
  kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
}
get_op() { # OP-ID: the operation as protobuf JSON on one line
  wget -q -O - --header 'Content-Type: application/json' --post-data "{\"id\": \"$1\"}" \
    http://127.0.0.1:50080/api/rpc/GetOperation | tr -d '\n'; echo
}
log_lines() { wc -l < /tmp/$MON.log; }
events_since() { # LINE-COUNT: L2's events after that line of the monitor's log
  tail -n +$(( $1 + 1 )) /tmp/$MON.log | grep '"event"' | grep -v '"event": "STOP"\|"event": "RESUME"'
}
in_l2() { qmp query-pci | grep -c "\"qdev_id\": \"$ALLOC\""; }

reconfigure() { # ROUND KIND STRATEGY FROM TO
  echo "PHASE $1 $2 $4 $5"
  n=$(log_lines)
  t0=$(ts)
  out=$($C $S reconfigure $PF $5 --strategy $3); rc=$?
  t1=$(ts)
  echo "$out"
  echo "RC=$rc"
  op=$(echo "$out" | sed -n 's/.*\(op-[0-9a-f]*\).*/\1/p' | head -1)
  echo "CLI $1 $2 $4 $5 $t0 $t1"
  echo "OP $1 $2 $4 $5 $(get_op $op)"
  events_since $n | sed "s/^/EVENT $1 $2 $4 $5 /"
  echo "INL2 $1 $2 $4 $5 $(in_l2) fds=$(vfio_fds $L2) numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
}

floor() { # ROUND FROM TO
  echo "PHASE $1 floor $2 $3"
  stop_agent
  qmp x-vfio-pause "{\"id\": \"$ALLOC\"}" | grep -v '"return"'  # L2 lets go of the VF (not timed)
  P=/sys/bus/pci/devices/$PF
  echo 0 > $P/sriov_drivers_autoprobe
  stamp f0
  echo 0 > $P/sriov_numvfs
  stamp f1
  echo $3 > $P/sriov_numvfs
  stamp f2
  echo vfio-pci > /sys/bus/pci/devices/$VF/driver_override
  echo $VF > /sys/bus/pci/drivers_probe
  stamp f3
  g=$(group_of $VF)
  i=0; while [ ! -e /dev/vfio/$g ] && [ $i -lt 2000 ]; do i=$((i+1)); done
  stamp f4
  t0=$(readts f0); t1=$(readts f1); t2=$(readts f2); t3=$(readts f3); t4=$(readts f4)
  echo "FLOOR $1 floor $2 $3 $t0 $t1 $t2 $t3 $t4 driver=$(basename "$(readlink /sys/bus/pci/devices/$VF/driver)") dev=/dev/vfio/$g $([ -e /dev/vfio/$g ] && echo present || echo MISSING)"
  qmp x-vfio-resume "{\"id\": \"$ALLOC\"}" | grep -v '"return"'  # L2 takes the new VF (not timed)
  echo "FLOOR-RESUMED fds=$(vfio_fds $L2)"
  start_agent
}

step "prepare: 2 VFs, the first bound to vfio-pci; loopback up for the agent's HTTP API"
ip link set lo up
run $A sriov set-vfs $PF 2 $SEL
run $A sriov bind-vfio $VF $SEL

step "L2 with an empty root port, firmware run, then stopped"
start_l2 mon
wait_firmware
printf 'linux:\n  watchdog_seconds: 3\n' > /tmp/agent.yaml
start_agent
run $C $S vms
ALLOC=$($C $S allocate --owner bench --vm l2 | sed -n 's/^allocated \(alloc-[0-9a-f]*\):.*/\1/p')
echo "allocation: $ALLOC"
run $C $S attach $ALLOC l2
echo "vfio fds of L2: $(vfio_fds $L2)"
echo "in L2's query-pci: $(in_l2)"
run $C $S reconfigure $PF 3 --strategy pause --dry-run
run $C $S reconfigure $PF 3 --strategy detach-reattach --dry-run

step "warm-up (not counted): pause 2 -> 3 -> 2"
reconfigure 0 pause pause 2 3
reconfigure 0 pause pause 3 2

# Each round: the order of the three kinds rotates by one each round; the sequence is run twice,
# so the count goes 2 -> 3 -> 2 -> 3 -> 2 -> 3 -> 2 and every kind does both directions.
r=1
while [ $r -le $ROUNDS ]; do
  step "round $r"
  case $(( (r - 1) % 3 )) in
    0) ORDER="pause replug floor" ;;
    1) ORDER="replug floor pause" ;;
    2) ORDER="floor pause replug" ;;
  esac
  from=2
  for pass in 1 2; do
    for kind in $ORDER; do
      to=$(( 5 - from ))
      case $kind in
        pause) reconfigure $r pause pause $from $to ;;
        replug) reconfigure $r replug detach-reattach $from $to ;;
        floor) floor $r $from $to ;;
      esac
      from=$to
    done
  done
  r=$((r + 1))
done

step "end"
run $C $S vms
run $C $S inventory
stop_agent
grep -ci 'error' /tmp/agent.log | sed 's/^/agent log lines with "error": /'
kill $L2; wait $L2
cat /tmp/mon.err
echo "END-OF-SCENARIO"
