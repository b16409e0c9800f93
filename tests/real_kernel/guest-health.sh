# Runs inside the real-kernel guest (busybox sh): device health against a real kernel, driven
# from the host over the outer QEMU's QMP socket (run_health_scenario in test_real_kernel.py).
# AGENT_BIN is replaced by the test with the folder of the binaries.
#
# The guest prints a marker line HEALTH-READY-<STEP> on the serial console when the host should
# act, then waits for the kernel to see the effect and for the agent to report it:
#   AER  host: pcie_aer_inject_error err0 POISON_TLP (uncorrectable, non-fatal by default severity)
#   DEL  host: device_del nvme0 (the SR-IOV PF, while one of its VFs is allocated)
#   ADD  host: device_add nvme ... id=nvme0 (the PF comes back)
# QEMU 7.2's NVMe controller has no AER capability (only ARI and SR-IOV extended capabilities),
# so the kernel keeps no AER counters for the PF: errors are injected into a second managed
# function that has one, a virtio-rng-pci with aer=on (1af4:1044, no SR-IOV) on root port rp2,
# bound to vfio-pci (whose error handler makes the kernel's AER recovery send a "change" uevent).
# See README.md.
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
SEL="--selector vendor=1b36,device=0010 --selector vendor=1af4,device=1044"
PF=0000:01:00.0      # NVMe, SR-IOV PF (no AER)
ERR=0000:02:00.0     # virtio-rng-pci,aer=on: AER capability, no SR-IOV
D=/sys/bus/pci/devices
S="--server unix:/tmp/agent.sock --timeout 60"
step() { echo; echo "== $*"; }
run() { "$@"; echo "RC=$?"; }
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
# Kernel time (printk clock, ms) of the last dmesg line matching $1; empty if none.
kms() { dmesg | grep -F "$1" | tail -1 | sed -n 's/^\[ *\([0-9]*\)\.\([0-9][0-9][0-9]\).*/\1\2/p' | sed 's/^0*\([0-9]\)/\1/'; }
# poll LIMIT_MS COMMAND...: runs COMMAND every 50 ms until it succeeds; its output stays in
# /tmp/poll.out; prints nothing; fails after LIMIT_MS.
poll() {
  limit=$1; shift; start=$(ms)
  while :; do
    "$@" > /tmp/poll.out 2>&1 && return 0
    [ $(( $(ms) - start )) -ge "$limit" ] && return 1
    sleep 0.05
  done
}
status_has() { $C $S status > /tmp/status.out 2>&1 && grep -qF "$1" /tmp/status.out; }
status_lacks() { $C $S status > /tmp/status.out 2>&1 && ! grep -qF "$1" /tmp/status.out; }
# PCIe capability offset of $1 (standard capability list, id 0x10).
rd() { od -An -tx$3 -j $(($2)) -N$3 $D/$1/config | tr -d ' '; }
expcap() {
  p=$((0x$(rd $1 0x34 1)))
  while [ $p -ne 0 ]; do
    [ $((0x$(rd $1 $p 1))) -eq 16 ] && { echo $p; return; }
    p=$((0x$(rd $1 $((p + 1)) 1)))
  done
  echo 0
}
linkinfo() {
  echo "$1 link: width $(cat $D/$1/current_link_width)/$(cat $D/$1/max_link_width)," \
    "speed $(cat $D/$1/current_link_speed)/$(cat $D/$1/max_link_speed)," \
    "LNKCAP=0x$(rd $1 $(($(expcap $1) + 12)) 4) runtime=$(cat $D/$1/power/runtime_status)"
}
# Wall clock -> uptime: TICK_MS is the uptime (ms) at which wall-clock second TICK_S began
# (busybox date has no %N). Set in setup.
wall_ms() {  # 2026-11-30T14:44:17.185Z -> uptime ms
  sec=$(date -u -d "$(echo "$1" | sed 's/T/ /; s/\..*//')" +%s 2>/dev/null) || return 1
  frac=$(echo "$1" | sed -n 's/.*\.\([0-9][0-9][0-9]\)Z$/1\1/p')
  [ -n "$frac" ] && echo $(( TICK_MS + (sec - TICK_S) * 1000 + frac - 1000 ))
}
# agent_ms TEXT AFTER: uptime (ms) of the first agent log line containing TEXT after uptime AFTER.
agent_ms() {
  grep -F "$1" /tmp/agent.log | while read -r stamp rest; do
    u=$(wall_ms "$stamp") || continue
    [ -n "$u" ] && [ "$u" -gt "$2" ] && { echo "$u"; break; }
  done
}
# measure WHAT KERNEL_MS MARK_MS WATCH_TEXT STATUS_MS: prints "delay WHAT -> ...: N ms" from the
# kernel's dmesg time of the event (printk clock, corrected to uptime) to: the agent receiving a
# uevent, the agent's rescan applying it (both from its log), a `fpgactl watch` client getting
# the delta, and a `fpgactl status` poll (each call takes 1-2 s under TCG) showing it.
measure() {
  what=$1 mark=$3 text=$4 status=$5
  [ -n "$2" ] || { echo "delay $what: kernel time unknown"; return; }
  k=$(( $2 + OFFSET ))
  echo "kernel: $what at uptime $k ms"
  u=$(agent_ms "uevent fpga.action" "$mark")
  r=$(agent_ms "rescan found changes" "$mark")
  w=$(awk -v t="$mark" -v p="$text" '$1 > t && index($0, p) {print $1; exit}' /tmp/watch.log)
  for pair in "agent got a uevent:$u" "agent rescan applied it:$r" "watch delta '$text':$w" "fpgactl status shows it:$status"; do
    name=${pair%:*} t=${pair##*:}
    if [ -n "$t" ]; then echo "delay $what -> $name: $(( t - k )) ms"; else echo "delay $what -> $name: unknown"; fi
  done
}

step "setup"
echo "kernel: $(uname -r), cmdline: $(cat /proc/cmdline)"
dmesg | grep -E "_OSC: OS now controls|AER: enabled|acpiphp: Slot"
# vfio-pci has PCI error handlers: the kernel's AER recovery calls them and sends a "change"
# uevent for the device (no driver: no handler, no uevent, only the periodic rescan would see it).
echo "$ERR before binding: devctl=0x$(rd $ERR $(($(expcap $ERR) + 8)) 2)"
echo vfio-pci > $D/$ERR/driver_override; echo $ERR > /sys/bus/pci/drivers_probe
for dev in $PF $ERR; do
  echo "$dev $(cat $D/$dev/vendor):$(cat $D/$dev/device) driver=$(basename "$(readlink $D/$dev/driver)")" \
    "aer_files=$(ls $D/$dev | grep -c '^aer_dev_') devctl=0x$(rd $dev $(($(expcap $dev) + 8)) 2)" \
    "link=$(cat $D/$dev/current_link_width)/$(cat $D/$dev/max_link_width)"
done
# QEMU forwards an error to the root port only if the function's Device Control enables
# reporting (CERE|NFERE|FERE|URRE = 0xf; a QEMU model that keeps them read-only, like e1000e,
# never reports).
echo "calibrate-clock uptime_ms=$(ms)" > /dev/kmsg
OFFSET=$(( $(dmesg | grep calibrate-clock | tail -1 | sed 's/.*uptime_ms=//') - $(kms calibrate-clock) ))
echo "clock offset uptime-printk: $OFFSET ms"
t0=$(date +%s); while :; do TICK_S=$(date +%s); [ "$TICK_S" != "$t0" ] && break; done; TICK_MS=$(ms)
echo "wall clock second $TICK_S began at uptime $TICK_MS ms"

run $A sriov set-vfs $PF 2 $SEL
$A --platform linux $SEL --listen "" --http-listen "" --unix-socket /tmp/agent.sock --state-dir /tmp/state \
  --node-id guest --log-level debug > /tmp/agent.log 2>&1 &
AGENT=$!
poll 120000 test -S /tmp/agent.sock
echo "agent up after $(ms) ms of uptime"
t=$(ms); run $C $S status; echo "(fpgactl status took $(( $(ms) - t )) ms)"
$C $S allocate --owner health-test --pf $PF > /tmp/alloc.out 2>&1; echo "RC=$?"; cat /tmp/alloc.out
ALLOC=$(sed -n 's/^allocated \(alloc-[0-9a-f]*\):.*/\1/p' /tmp/alloc.out)
echo "allocation: $ALLOC of VF $(sed -n 's/^allocated alloc-[0-9a-f]*: VF \([0-9a-f:.]*\).*/\1/p' /tmp/alloc.out)"
$C $S inventory > /tmp/inv.out 2>&1; cat /tmp/inv.out
$C $S watch | while IFS= read -r line; do echo "$(ms) $line"; done > /tmp/watch.log 2>&1 &
poll 60000 grep -q snapshot /tmp/watch.log || echo "WATCH-TIMEOUT"
echo "watching from $(ms) ms: $(cut -d' ' -f2- /tmp/watch.log | head -1)"

step "uncorrectable non-fatal error injected into $ERR"
grep TOTAL_ERR_NONFATAL $D/$ERR/aer_dev_nonfatal
linkinfo $ERR
t_mark=$(ms); echo "HEALTH-READY-AER uptime_ms=$t_mark"
if poll 30000 grep -q 'TOTAL_ERR_NONFATAL [1-9]' $D/$ERR/aer_dev_nonfatal; then
  echo "kernel counted it: $(grep TOTAL_ERR_NONFATAL $D/$ERR/aer_dev_nonfatal)"
else
  echo "AER-TIMEOUT: the kernel's aer_dev_nonfatal of $ERR did not move"
fi
t_status=; if poll 30000 status_has "PF $ERR is unhealthy since"; then t_status=$(ms); fi
cat /tmp/status.out
grep -F "PF $ERR is unhealthy since" /tmp/status.out > /tmp/err-judgement.txt
linkinfo $ERR
dmesg | grep -E "AER|$ERR" | tail -8
measure "AER error" "$(kms "error message received from $ERR")" "$t_mark" "PF $ERR updated" "$t_status"
grep -E "uevent|device event" /tmp/agent.log | grep -E "02:00.0|rescan" | tail -4
run $C $S inventory
run $C $S allocate --owner health-test --pf $ERR

step "PF $PF removed (device_del) while allocation $ALLOC holds a VF"
t_mark=$(ms); echo "HEALTH-READY-DEL uptime_ms=$t_mark"
poll 30000 test ! -e $D/$PF && echo "gone from sysfs at $(ms) ms" || echo "DEL-TIMEOUT: $PF still in sysfs"
t_status=; if poll 30000 status_has "PF $PF is gone from the PCI bus since"; then t_status=$(ms); fi
run cat /tmp/status.out
dmesg | grep -E "$PF|acpiphp|pciehp" | tail -6
measure "PF removal" "$(kms "pci $PF: Removing from iommu group")" "$t_mark" "PF $PF removed" "$t_status"
run $C $S inventory
run $C $S status
grep -E "0000:01:00.0 removed|$ALLOC ended" /tmp/watch.log

step "PF $PF added back (device_add)"
t_mark=$(ms); echo "HEALTH-READY-ADD uptime_ms=$t_mark"
if ! poll 15000 test -e $D/$PF; then
  echo "not enumerated by hotplug: rescanning the bus"
  echo 1 > /sys/bus/pci/rescan
  poll 5000 test -e $D/$PF
fi
echo "back in sysfs at $(ms) ms: driver=$(basename $(readlink $D/$PF/driver)) sriov_totalvfs=$(cat $D/$PF/sriov_totalvfs)"
t_status=; if poll 30000 status_lacks "PF $PF is gone from the PCI bus since"; then t_status=$(ms); fi
run cat /tmp/status.out
measure "PF added" "$(kms "pci $PF: [1b36:0010]")" "$t_mark" "PF $PF updated" "$t_status"
run $C $S inventory
run $C $S reconfigure $PF 2 --strategy refuse-if-disruptive
echo "sriov_numvfs=$(cat $D/$PF/sriov_numvfs)"
grep -E "uevent|device event|rescan|op-" /tmp/agent.log | tail -12
run $C $S allocate --owner health-test-again --pf $PF
run $C $S status

step "agent restarted on the same state directory: $ERR still unhealthy"
# Issue 23: the judgement and its AER counter baseline are kept in /tmp/state/state.sqlite; the
# kernel's counters still read TOTAL_ERR_NONFATAL 1, which a restart must not take as the new
# baseline. (The watch above ends with the agent.)
kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
rm -f /tmp/agent.sock
grep TOTAL_ERR_NONFATAL $D/$ERR/aer_dev_nonfatal
$A --platform linux $SEL --listen "" --http-listen "" --unix-socket /tmp/agent.sock --state-dir /tmp/state \
  --node-id guest --log-level debug > /tmp/agent-restarted.log 2>&1 &
AGENT=$!
t=$(ms); poll 120000 test -S /tmp/agent.sock; echo "agent up again after $(( $(ms) - t )) ms"
poll 30000 status_has "PF $ERR is unhealthy since"
cat /tmp/status.out
echo "before the restart: $(cat /tmp/err-judgement.txt)"
if grep -qxF "$(cat /tmp/err-judgement.txt)" /tmp/status.out; then echo "judgement kept: same line"; else echo "judgement changed"; fi
run $C health list $S
run $C $S allocate --owner health-test-restarted --pf $ERR

step "health clear of $ERR"
run $C health clear $S $ERR --reason "poisoned TLP injected by the real-kernel test"
run $C $S audit --limit 3 --json
run $C health list $S
poll 30000 status_lacks "PF $ERR is unhealthy"
run cat /tmp/status.out
run $C $S inventory

step "end"
kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
grep -E "error|warning" /tmp/agent.log | tail -5
echo "== watch log"; cat /tmp/watch.log
echo "END-OF-SCENARIO"
