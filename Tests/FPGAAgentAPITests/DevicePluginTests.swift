import FPGACore
import FPGADevicePlugin
import Testing

/// The device plugin's pure parts: names and validation. (The protocol itself is tested
/// against a fake kubelet written with Python grpcio: tests/interop/test_device_plugin.py.)
@Suite struct DevicePluginPoolTests {
  @Test func namesFollowTheKubeletAndKubeVirt() {
    let pool = DevicePluginPool(resourceName: "xilinx.com/qdma-vf")
    #expect(pool.environmentVariables == ["PCI_RESOURCE_XILINX_COM_QDMA_VF", "PCI_RESOURCE_XILINX_COM_QDMA-VF"])
    #expect(DevicePluginPool(resourceName: "amd.com/fpga").environmentVariables == ["PCI_RESOURCE_AMD_COM_FPGA"])
    #expect(pool.socketName == "fpga-agent-xilinx_com_qdma-vf.sock")
  }

  @Test func resourceNamesAreValidated() {
    #expect(DevicePluginPool.validate("xilinx.com/qdma-vf"))
    #expect(!DevicePluginPool.validate("qdma-vf"))
    #expect(!DevicePluginPool.validate("xilinx.com/"))
    #expect(!DevicePluginPool.validate("Xilinx.com/VF"))
    #expect(!DevicePluginPool.validate("a.b/c/d"))
  }
}
