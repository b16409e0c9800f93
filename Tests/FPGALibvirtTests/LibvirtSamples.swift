/// Domain XML as libvirt 9.0.0 (Debian 12, QEMU 7.2) returned it on the machine these tests were
/// written on (`virsh dumpxml`), from the domains tests/libvirt defines.
enum LibvirtSamples {
  /// A persistent q35 domain started paused: two root ports, libvirt put its USB controller
  /// (qemu-xhci) on the first one's bus.
  static let livePersistent = #"""
    <domain type='qemu' id='1'>
      <name>fpga-lv-a</name>
      <uuid>4c15d146-0eff-4676-88a0-3d1a54444bca</uuid>
      <memory unit='KiB'>65536</memory>
      <currentMemory unit='KiB'>65536</currentMemory>
      <vcpu placement='static'>1</vcpu>
      <resource>
        <partition>/machine</partition>
      </resource>
      <os>
        <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
        <boot dev='hd'/>
      </os>
      <cpu mode='custom' match='exact' check='full'>
        <model fallback='forbid'>qemu64</model>
        <feature policy='require' name='hypervisor'/>
        <feature policy='require' name='lahf_lm'/>
      </cpu>
      <clock offset='utc'/>
      <on_poweroff>destroy</on_poweroff>
      <on_reboot>restart</on_reboot>
      <on_crash>destroy</on_crash>
      <devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <controller type='pci' index='0' model='pcie-root'>
          <alias name='pcie.0'/>
        </controller>
        <controller type='pci' index='1' model='pcie-root-port'>
          <model name='pcie-root-port'/>
          <target chassis='1' port='0x8'/>
          <alias name='pci.1'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0' multifunction='on'/>
        </controller>
        <controller type='pci' index='2' model='pcie-root-port'>
          <model name='pcie-root-port'/>
          <target chassis='2' port='0x9'/>
          <alias name='pci.2'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
        </controller>
        <controller type='usb' index='0' model='qemu-xhci'>
          <alias name='usb'/>
          <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
        </controller>
        <controller type='sata' index='0'>
          <alias name='ide'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
        </controller>
        <input type='mouse' bus='ps2'>
          <alias name='input0'/>
        </input>
        <input type='keyboard' bus='ps2'>
          <alias name='input1'/>
        </input>
        <audio id='1' type='none'/>
        <memballoon model='none'/>
      </devices>
      <seclabel type='dynamic' model='dac' relabel='yes'>
        <label>+64055:+64055</label>
        <imagelabel>+64055:+64055</imagelabel>
      </seclabel>
    </domain>
    """#

  /// A transient domain (`virsh create --paused`): no USB controller, the second root port
  /// with `hotplug='off'`.
  static let liveTransient = #"""
    <domain type='qemu' id='3'>
      <name>fpga-lv-b</name>
      <uuid>583c5af3-1351-41cf-b2ab-837a7fc70101</uuid>
      <memory unit='KiB'>65536</memory>
      <currentMemory unit='KiB'>65536</currentMemory>
      <vcpu placement='static'>1</vcpu>
      <resource>
        <partition>/machine</partition>
      </resource>
      <os>
        <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
        <boot dev='hd'/>
      </os>
      <cpu mode='custom' match='exact' check='full'>
        <model fallback='forbid'>qemu64</model>
        <feature policy='require' name='hypervisor'/>
        <feature policy='require' name='lahf_lm'/>
      </cpu>
      <clock offset='utc'/>
      <on_poweroff>destroy</on_poweroff>
      <on_reboot>restart</on_reboot>
      <on_crash>destroy</on_crash>
      <devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <controller type='pci' index='0' model='pcie-root'>
          <alias name='pcie.0'/>
        </controller>
        <controller type='pci' index='1' model='pcie-root-port'>
          <model name='pcie-root-port'/>
          <target chassis='1' port='0x8'/>
          <alias name='pci.1'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0' multifunction='on'/>
        </controller>
        <controller type='pci' index='2' model='pcie-root-port'>
          <model name='pcie-root-port'/>
          <target chassis='2' port='0x9' hotplug='off'/>
          <alias name='pci.2'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
        </controller>
        <controller type='usb' index='0' model='none'>
          <alias name='usb'/>
        </controller>
        <controller type='sata' index='0'>
          <alias name='ide'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
        </controller>
        <input type='mouse' bus='ps2'>
          <alias name='input0'/>
        </input>
        <input type='keyboard' bus='ps2'>
          <alias name='input1'/>
        </input>
        <audio id='1' type='none'/>
        <memballoon model='none'/>
      </devices>
      <seclabel type='dynamic' model='dac' relabel='yes'>
        <label>+64055:+64055</label>
        <imagelabel>+64055:+64055</imagelabel>
      </seclabel>
    </domain>
    """#

  /// A defined (inactive) domain holding a VF the agent plugged: `managed='no'`, the agent's
  /// user alias, on the second root port's bus. (libvirt on this host cannot start it: no VFIO.)
  static let withHostdev = #"""
    <domain type='qemu'>
      <name>fpga-lv-h</name>
      <uuid>cc9df936-f9ff-4f97-9731-c478b8a2896d</uuid>
      <memory unit='KiB'>65536</memory>
      <currentMemory unit='KiB'>65536</currentMemory>
      <vcpu placement='static'>1</vcpu>
      <os>
        <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
        <boot dev='hd'/>
      </os>
      <cpu mode='custom' match='exact' check='none'>
        <model fallback='forbid'>qemu64</model>
      </cpu>
      <clock offset='utc'/>
      <on_poweroff>destroy</on_poweroff>
      <on_reboot>restart</on_reboot>
      <on_crash>destroy</on_crash>
      <devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <controller type='pci' index='0' model='pcie-root'/>
        <controller type='pci' index='1' model='pcie-root-port'>
          <model name='pcie-root-port'/>
          <target chassis='1' port='0x8'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0' multifunction='on'/>
        </controller>
        <controller type='pci' index='2' model='pcie-root-port'>
          <model name='pcie-root-port'/>
          <target chassis='2' port='0x9'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
        </controller>
        <controller type='usb' index='0' model='qemu-xhci'>
          <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
        </controller>
        <controller type='sata' index='0'>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
        </controller>
        <input type='mouse' bus='ps2'/>
        <input type='keyboard' bus='ps2'/>
        <audio id='1' type='none'/>
        <hostdev mode='subsystem' type='pci' managed='no'>
          <source>
            <address domain='0x0000' bus='0x3b' slot='0x00' function='0x4'/>
          </source>
          <alias name='ua-alloc-1f0c9a22b7e4'/>
          <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
        </hostdev>
        <memballoon model='none'/>
      </devices>
    </domain>
    """#
}
