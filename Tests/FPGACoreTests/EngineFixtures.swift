import FPGACore
import FPGASimulator
import Synchronization

final class StillClock: WallClock {
  let time = Mutex(WallTime(seconds: 1_800_000_000))
  func now() -> WallTime { time.withLock { $0 } }
}

/// An engine on a simulated node, scanned.
func makeEngine(
  _ config: SimulatorConfig = .default, changeLogCapacity: Int = 4096, watchBufferLimit: Int = 4096
) async throws -> (NodeEngine, SimulatedNode) {
  let node = SimulatedNode(config: config)
  let engine = NodeEngine(
    nodeID: "node-a", platform: SimulatedPlatform(node: node), clock: StillClock(),
    changeLogCapacity: changeLogCapacity, watchBufferLimit: watchBufferLimit)
  try await engine.rescan()
  return (engine, node)
}

func address(_ text: String) -> PCIAddress { PCIAddress(text)! }
