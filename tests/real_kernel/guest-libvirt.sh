# Runs inside the real-kernel guest (L1): libvirtd (copied from the host with its libraries, its
# QEMU driver and cpu_map, see libvirt_files() in test_real_kernel.py) manages a nested QEMU (L2)
# as the domain l2 (TCG, q35, pcie-root + 2 pcie-root-ports, no disk, started paused); the agent
# (Linux platform, hypervisor libvirt, qemu:///system) attaches the NVMe VF 0000:01:00.1 to it,
# detaches it, reconfigures the PF under it, and recovers from a crash mid-re-layout. Then a
# second domain, l2p, run by the QEMU built with qemu/vfio-pause (PAUSE_QEMU), holds the VF while
# the agent, opted in to libvirt.qemu_monitor_pause, reconfigures the PF with strategy pause.
# libvirt's configuration is written here, for this minimal guest (no systemd, no cgroups, no
# D-Bus, busybox): root, no security driver, no cgroup controllers, no namespaces.
A=AGENT_BIN/fpga-agent
C=AGENT_BIN/fpgactl
SEL="--selector vendor=1b36,device=0010"
PF=0000:01:00.0
VF=0000:01:00.1
V="virsh -c qemu:///system"
step() { echo; echo "== $*"; }
run() { "$@"; echo "RC=$?"; }
now() { cut -d' ' -f1 /proc/uptime; }
group_of() { basename "$(readlink /sys/bus/pci/devices/$1/iommu_group)"; }
l2_pid() { cat /run/libvirt/qemu/${1:-l2}.pid 2>/dev/null; }
vfio_fds() { ls -l /proc/$(l2_pid $1)/fd 2>/dev/null | grep -c /dev/vfio/; }
vfio_links() { ls -l /proc/$(l2_pid $1)/fd 2>/dev/null | grep /dev/vfio/ | sed 's/.*-> /fd -> /'; }
hostdevs() { # [DOMAIN]: the live XML's hostdev elements, one line each: alias and source address
  $V dumpxml ${1:-l2} | tr -d '\n' | sed 's/<hostdev /\n<hostdev /g; s/<\/hostdev>/<\/hostdev>\n/g' | grep '^<hostdev ' \
    | sed 's/  */ /g' | sed 's/^/HOSTDEV /'
}
pci_tree() { # [DOMAIN]: the vfio-pci devices in QEMU's PCI device tree with the bus they are on, one line
  # each (HMP info qtree, through libvirt: only this test's checks use the monitor, which libvirt
  # marks as custom-monitor taint; a domain started paused never ran its firmware, so its root
  # ports have no bus numbers and `info pci` lists nothing behind them)
  $V qemu-monitor-command --hmp ${1:-l2} 'info qtree' | tr -d '\r' | awk '
    /bus: /{bus=$2}
    /dev: vfio-pci/{dev=$0; sub(/^ */, "", dev); want=1; next}
    want && /host = /{print "QTREE bus " bus ": " dev ", host " $3; want=0}'
}
seconds() { cut -d. -f1 /proc/uptime; }
wait_until() { # SECONDS COMMAND...: polls until COMMAND succeeds or SECONDS of uptime have passed
  end=$(( $(seconds) + $1 )); shift
  while ! "$@" > /dev/null 2>&1; do
    [ "$(seconds)" -lt "$end" ] || return 1
    sleep 0.2
  done
}
taints() { grep -o 'is tainted: [a-z-]*' /var/log/libvirt/qemu/$1.log | sed 's/is tainted: //' | sort -u | tr '\n' ' '; }
libvirt_listening() { # LOG: sets a metadata element of l2p, true once `virsh event` logged a change
  $V metadata l2p https://fpga-agent.example/probe --key probe --set "<probe at='$(now)'/>" --live > /dev/null
  grep -q metadata-change "$1"
}
libvirtd_answers() { # also ends the wait (status 0) when libvirtd has gone
  pidof libvirtd > /dev/null || { echo "libvirtd is not running"; return 0; }
  timeout 60 $V version > /dev/null 2>&1
}

step "libvirtd: configure and start"
mkdir -p /root /run /etc/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu
# libvirtd listens in /run/libvirt, virsh and libvirt.so.0 look in /var/run/libvirt (Debian's link)
ln -s /run /var/run
# The QEMU driver resolves its built-in user and group (Debian: libvirt-qemu) before it reads
# qemu.conf, so they must exist even though qemu.conf runs QEMU as root.
printf 'root:x:0:0:root:/root:/bin/sh\nlibvirt-qemu:x:64055:64055::/var/lib/libvirt:/bin/false\n' > /etc/passwd
printf 'root:x:0:\nkvm:x:109:\nlibvirt:x:114:\nlibvirt-qemu:x:64055:libvirt-qemu\n' > /etc/group
cat > /etc/libvirt/libvirtd.conf <<'EOF'
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
cat > /etc/libvirt/virtlogd.conf <<'EOF'
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOF
cat > /etc/libvirt/qemu.conf <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
seccomp_sandbox = 0
EOF
run virtlogd -d
run libvirtd -d
if wait_until 300 libvirtd_answers && $V version > /dev/null 2>&1; then
  echo "libvirtd up at $(now)"
  run $V version
else
  echo "LIBVIRTD-NOT-UP"
  ps | grep -v grep | grep -E 'libvirtd|virtlogd'
  cat /var/log/libvirt/libvirtd.log /var/log/libvirt/virtlogd.log
  $V version
  exit 1
fi

step "domain l2: defined and started paused"
cat > /tmp/l2.xml <<'EOF'
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>l2</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' model='pcie-root'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='pci' model='pcie-root-port'/>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-global'/>
    <qemu:arg value='ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off'/>
  </qemu:commandline>
</domain>
EOF
# Native PCIe hotplug on the root ports (the line above): a guest that never ran (paused from the
# start) has not powered the slots, so an unplug completes at once, as with the bare L2 of
# guest-nested-agent.sh; with ACPI hotplug it would wait for a guest that never answers.
run $V define /tmp/l2.xml
run $V start --paused l2
run $V list --all
echo "L2 pid $(l2_pid) at $(now)"
if [ -z "$(l2_pid)" ]; then
  cat /var/log/libvirt/libvirtd.log; cat /var/log/libvirt/qemu/l2.log
  exit 1
fi
$V dumpxml l2 | grep -E "<controller type='pci'|<address type='pci'" | sed 's/^ */XML /'

step "prepare: 2 VFs, the first bound to vfio-pci"
run $A sriov set-vfs $PF 2 $SEL
run $A sriov bind-vfio $VF $SEL
echo "group of $VF: $(group_of $VF)"

step "agent: discovery through libvirt"
printf 'linux:\n  watchdog_seconds: 3\nhypervisor: libvirt\nlibvirt:\n  uri: qemu:///system\n' > /tmp/agent.yaml
start_agent() { # [LOG]: the agent on the same state directory (the environment passes through)
  rm -f /tmp/agent.sock
  $A --platform linux $SEL --config /tmp/agent.yaml --listen "" \
    --unix-socket /tmp/agent.sock --state-dir /tmp/state --node-id guest >> /tmp/${1:-agent}.log 2>&1 &
  AGENT=$!
  i=0; while [ ! -S /tmp/agent.sock ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
}
start_agent
S="--server unix:/tmp/agent.sock --timeout 120"
run $C $S vms
ALLOC=$($C $S allocate --owner nested --vm l2 | sed -n 's/^allocated \(alloc-[0-9a-f]*\):.*/\1/p')
echo "allocation: $ALLOC"

# libvirt's own events, as virsh sees them, for the rest of the scenario
$V event --all --loop --timestamp > /tmp/events.log 2>&1 &
EVENTS=$!

step "attach through libvirt"
run $C $S attach $ALLOC l2
run $C $S vms
hostdevs
# what libvirt has marked before this script's first monitor command: the agent uses the API only
echo "taints so far: $(grep -o 'is tainted: [a-z-]*' /var/log/libvirt/libvirtd.log | sed 's/is tainted: //' | sort -u | tr '\n' ' ')"
pci_tree
echo "vfio fds of L2: $(vfio_fds)"
vfio_links

step "detach through libvirt"
run $C $S detach $ALLOC --wait 60
wait_until 30 grep -q device-removed /tmp/events.log
echo "EVENTS-BEGIN"; cat /tmp/events.log; echo "EVENTS-END"
echo "hostdevs in the live XML: $(hostdevs | grep -c HOSTDEV)"
echo "vfio-pci devices in QEMU: $(pci_tree | grep -c QTREE)"
echo "vfio fds of L2: $(vfio_fds)"
run $C $S vms

step "reconfigure 2 -> 3 detach-reattach under the domain"
run $C $S attach $ALLOC l2
hostdevs
run $C $S reconfigure $PF 3 --strategy detach-reattach --dry-run
run $C $S reconfigure $PF 3 --strategy detach-reattach
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
echo "driver of $VF: $(basename "$(readlink /sys/bus/pci/devices/$VF/driver)")"
echo "group of $VF: $(group_of $VF)"
hostdevs
echo "vfio fds of L2: $(vfio_fds)"
vfio_links
pci_tree
run $C $S vms
echo "EVENTS-BEGIN"; cat /tmp/events.log; echo "EVENTS-END"

step "crash after write 0, 3 -> 2, restart on the same state"
kill -TERM $AGENT; wait $AGENT; echo "AGENT-STOPPED=$?"
FPGA_AGENT_FAULT_INJECTION=crash-after:write-zero start_agent agent-crashing
OP=$($C $S reconfigure $PF 2 --strategy detach-reattach --no-wait | sed -n 's/^operation \(op-[0-9a-f]*\) .*/\1/p')
echo "operation: $OP"
wait $AGENT; echo "AGENT-CRASHED=$?"
grep -a "injected crash" /tmp/agent-crashing.log | head -1
echo "crashed: sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)," \
  "hostdevs in the live XML: $(hostdevs | grep -c HOSTDEV), vfio fds of L2: $(vfio_fds)"
start_agent agent-restarted
run $C $S operation $OP --watch
$C $S status | grep "unfinished at start-up"
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
echo "driver of $VF: $(basename "$(readlink /sys/bus/pci/devices/$VF/driver)")"
echo "group of $VF: $(group_of $VF)"
hostdevs
echo "vfio fds of L2: $(vfio_fds)"
vfio_links
pci_tree
run $C $S vms
echo "EVENTS-BEGIN"; cat /tmp/events.log; echo "EVENTS-END"

step "persistent attach: the domain's definition too"
definition() { $V dumpxml --inactive l2 | tr -d '\n' | grep -o "<alias name='ua-alloc-[0-9a-f]*'/>" | sed 's/^/DEFINITION /'; }
run $C $S detach $ALLOC --wait 60
kill -TERM $AGENT; wait $AGENT
printf '  persistent_attach: true\n' >> /tmp/agent.yaml
start_agent agent-persistent
echo "before: hostdevs in the definition: $(definition | grep -c DEFINITION)"
run $C $S attach $ALLOC l2
echo "attached: hostdevs in the definition: $(definition | grep -c DEFINITION), live: $(hostdevs | grep -c HOSTDEV)"
definition
run $C $S detach $ALLOC --wait 60
echo "detached: hostdevs in the definition: $(definition | grep -c DEFINITION), live: $(hostdevs | grep -c HOSTDEV)"

step "pause through libvirt: l2p run by the patched QEMU"
sed "s#<name>l2</name>#<name>l2p</name>#; s#/usr/bin/qemu-system-x86_64#PAUSE_QEMU#; s#</qemu:commandline>#<qemu:arg value='-L'/><qemu:arg value='/usr/share/seabios'/><qemu:arg value='-L'/><qemu:arg value='/usr/share/qemu'/></qemu:commandline>#" \
  /tmp/l2.xml > /tmp/l2p.xml
run $V create /tmp/l2p.xml --paused
echo "L2P pid $(l2_pid l2p)"
[ -n "$(l2_pid l2p)" ] || tail -20 /var/log/libvirt/qemu/l2p.log
kill -TERM $AGENT; wait $AGENT
printf '  qemu_monitor_pause: true\n' >> /tmp/agent.yaml
start_agent agent-pause
run $C $S vms
# before any monitor command of this script: the agent's query-commands alone
echo "taints of l2p after the agent's listing: $(taints l2p)"
run $C $S release $ALLOC
PALLOC=$($C $S allocate --owner nested --vm l2p | sed -n 's/^allocated \(alloc-[0-9a-f]*\):.*/\1/p')
echo "pause allocation: $PALLOC"
run $C $S attach $PALLOC l2p
hostdevs l2p
pci_tree l2p
echo "vfio fds of L2P before: $(vfio_fds l2p)"
# QEMU's own events as libvirt relays them (x-vfio-pause's VFIO_DEVICE_PAUSED / _RESUMED), and
# libvirt's events for this section in a log of their own (DEVICE_REMOVED must not appear)
$V qemu-monitor-event l2p --loop --timestamp > /tmp/qemu-events.log 2>&1 &
QEVENTS=$!
kill $EVENTS
$V event --all --loop --timestamp > /tmp/events-pause.log 2>&1 &
EVENTS=$!
# Both listeners proven to listen before the re-layout: the test's own pause and resume of the
# device through libvirt (QEMU's events), a metadata change (libvirt's)
qemu_listening() {
  for command in x-vfio-pause x-vfio-resume; do
    $V qemu-monitor-command l2p "{\"execute\":\"$command\",\"arguments\":{\"id\":\"ua-$PALLOC\"}}" > /dev/null
  done
  grep -q VFIO_DEVICE_RESUMED /tmp/qemu-events.log
}
wait_until 60 qemu_listening
wait_until 60 libvirt_listening /tmp/events-pause.log
QMARK=$(wc -l < /tmp/qemu-events.log)
echo "listening: $QMARK QEMU events, $(grep -c metadata-change /tmp/events-pause.log) metadata changes"
run $C $S reconfigure $PF 3 --strategy pause --dry-run
run $C $S reconfigure $PF 3 --strategy pause
echo "sriov_numvfs=$(cat /sys/bus/pci/devices/$PF/sriov_numvfs)"
echo "driver of $VF: $(basename "$(readlink /sys/bus/pci/devices/$VF/driver)")"
echo "group of $VF: $(group_of $VF)"
hostdevs l2p
pci_tree l2p
echo "vfio fds of L2P after: $(vfio_fds l2p)"
vfio_links l2p
run $C $S inventory
wait_until 30 grep -q VFIO_DEVICE_RESUMED /tmp/qemu-events.log
kill $QEVENTS
echo "QEVENTS-BEGIN"; tail -n +$((QMARK + 1)) /tmp/qemu-events.log | grep -a VFIO_DEVICE; echo "QEVENTS-END"
echo "EVENTS-BEGIN"; cat /tmp/events-pause.log; echo "EVENTS-END"

step "libvirtd restarted while l2p holds the VF"
kill $EVENTS
kill -TERM "$(pidof libvirtd)"
wait_until 60 sh -c '! pidof libvirtd'
echo "libvirtd stopped: $(pidof libvirtd || echo gone)"
wait_until 120 sh -c "$C $S vms | grep -q '^l2p  *unreachable'"
run $C $S vms
$C $S inventory | grep "^$PALLOC" | sed 's/^/WHILE-DOWN /'
echo "L2P pid while libvirtd is down: $(l2_pid l2p), vfio fds: $(vfio_fds l2p)"
run libvirtd -d
wait_until 300 libvirtd_answers
wait_until 120 sh -c "$C $S vms | grep -q '^l2p  *paused'"
run $C $S vms
$C $S inventory | grep "^$PALLOC" | sed 's/^/AFTER-RESTART /'
hostdevs l2p
$V event --all --loop --timestamp > /tmp/events-after.log 2>&1 &
EVENTS=$!
wait_until 60 libvirt_listening /tmp/events-after.log
run $C $S detach $PALLOC --wait 60
wait_until 30 grep -q device-removed /tmp/events-after.log
echo "EVENTS-AFTER-BEGIN"; cat /tmp/events-after.log; echo "EVENTS-AFTER-END"
echo "after detach: hostdevs in l2p: $(hostdevs l2p | grep -c HOSTDEV), vfio fds of L2P: $(vfio_fds l2p)"
run $V destroy l2p

step "end"
run $C $S release $PALLOC
kill -TERM $AGENT; wait $AGENT; echo "AGENT-EXIT=$?"
tail -5 /tmp/agent-pause.log
kill $EVENTS
run $V destroy l2
echo "libvirtd warnings and errors:"; tail -20 /var/log/libvirt/libvirtd.log
echo "END-OF-SCENARIO"
