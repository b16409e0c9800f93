import FPGACore

/// The shape of a simulated node: its cards and what is enabled when it starts.
public struct SimulatorConfig: Hashable, Sendable {
  public var cards: [Card]
  /// First IOMMU group number handed out.
  public var firstIOMMUGroup: Int

  public init(cards: [Card], firstIOMMUGroup: Int = 100) {
    self.cards = cards
    self.firstIOMMUGroup = firstIOMMUGroup
  }

  /// One simulated QDMA card (Gen3 x16): 4 PFs on one bus.
  public struct Card: Hashable, Sendable {
    public var domain: UInt16
    public var bus: UInt8
    public var numaNode: Int
    /// sriov_totalvfs of PF0..PF3; the QDMA soft IP's 252 VFs split like its test script.
    public var totalVFs: [Int]
    /// VFs enabled at start, per PF.
    public var enabledVFs: [Int]
    /// Enabled VFs start bound to vfio-pci (else to qdma-vf).
    public var bindToVFIO: Bool
    /// False models a bitstream without mailbox: VF count writes fail with EPERM.
    public var mailbox: Bool

    public init(
      domain: UInt16 = 0, bus: UInt8, numaNode: Int, totalVFs: [Int] = [64, 60, 60, 68],
      enabledVFs: [Int] = [16, 8, 0, 0], bindToVFIO: Bool = true, mailbox: Bool = true
    ) {
      self.domain = domain
      self.bus = bus
      self.numaNode = numaNode
      self.totalVFs = totalVFs
      self.enabledVFs = enabledVFs
      self.bindToVFIO = bindToVFIO
      self.mailbox = mailbox
    }
  }

  /// The embedded default: two cards on NUMA nodes 0 and 1, some VFs enabled.
  public static let `default` = SimulatorConfig(cards: [
    Card(bus: 0x3b, numaNode: 0, enabledVFs: [16, 8, 0, 4]),
    Card(bus: 0xd8, numaNode: 1, enabledVFs: [16, 8, 0, 0]),
  ])

  /// `count` cards with every VF enabled and bound to vfio-pci (benchmarks, scale tests).
  public static func full(cards count: Int) -> SimulatorConfig {
    SimulatorConfig(
      cards: (0..<count).map { index in
        Card(
          bus: UInt8(0x10 + index * 0x20), numaNode: index % 2, enabledVFs: [64, 60, 60, 68])
      })
  }

  /// Checks the shape; returns a sentence per problem.
  public func problems() -> [String] {
    var problems: [String] = []
    var buses = Set<String>()
    for (index, card) in cards.enumerated() {
      let name = "simulator.cards[\(index)]"
      if !buses.insert("\(card.domain):\(card.bus)").inserted {
        problems.append("\(name).bus \(hex(Int(card.bus), width: 2)) is used by another card")
      }
      if card.totalVFs.isEmpty || card.totalVFs.count > 4 {
        problems.append("\(name).total_vfs must list 1 to 4 PFs")
      }
      if !(-1...1023).contains(card.numaNode) {
        problems.append("\(name).numa_node \(card.numaNode) is out of range: -1 (none) to 1023")
      }
      // The VFs of all PFs must fit after the PFs on the card's bus (256 routing ids); each is
      // bounded before they are added, so no sum can overflow.
      if card.totalVFs.contains(where: { !(0...252).contains($0) }) || card.totalVFs.reduce(0, +) + 4 > 256 {
        problems.append("\(name).total_vfs must be non-negative and add up to at most 252")
      }
      if card.enabledVFs.count > card.totalVFs.count
        || zip(card.enabledVFs, card.totalVFs).contains(where: { $0 < 0 || $0 > $1 })
      {
        problems.append("\(name).enabled_vfs must give, per PF, a count between 0 and its total_vfs")
      }
    }
    return problems
  }
}
