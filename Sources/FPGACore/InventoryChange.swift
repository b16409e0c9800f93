/// A PF as the agent presents it.
public struct PFView: Hashable, Sendable {
  public var function: PhysicalFunction
  public var draining: Bool
  public var vfs: [VFView]
}

/// A card with its PFs.
public struct CardView: Hashable, Sendable {
  public var card: Card
  public var pfs: [PFView]
}

/// The whole inventory at one revision.
public struct InventorySnapshot: Hashable, Sendable {
  public var revision: UInt64
  public var nodeID: String
  public var cards: [CardView]
  public var allocations: [Allocation]
  public var vms: [VirtualMachineInfo] = []
  public var accelerators: [AcceleratorView] = []
  /// The last allocations the agent ended on its own, with why.
  public var endedAllocations: [EndedAllocation] = []
}

/// One change to the inventory; a revision is a list of them.
public enum InventoryChange: Hashable, Sendable {
  case cardUpdated(Card)
  case cardRemoved(String)
  /// The PF's attributes and drain flag; its VFs travel as their own changes.
  case pfUpdated(PhysicalFunction, draining: Bool)
  case pfRemoved(PCIAddress)
  case vfUpdated(VFView)
  case vfRemoved(PCIAddress)
  case allocationUpdated(Allocation)
  case allocationRemoved(String)
  case vmUpdated(VirtualMachineInfo)
  case vmRemoved(String)
  case acceleratorUpdated(AcceleratorView)
  case acceleratorRemoved(String)
}

/// An event of an inventory watch.
public enum InventoryEvent: Hashable, Sendable {
  /// Replace the view. `resync` is true when the watcher asked to resume from a revision the
  /// agent no longer has.
  case snapshot(InventorySnapshot, resync: Bool)
  /// Apply `changes` to the view at `revision - 1`.
  case delta(revision: UInt64, changes: [InventoryChange])

  public var revision: UInt64 {
    switch self {
    case .snapshot(let snapshot, _): snapshot.revision
    case .delta(let revision, _): revision
    }
  }
}

/// The last few revisions' changes, so a watcher that reconnects can resume without a snapshot.
struct ChangeLog: Sendable {
  private var entries: [(revision: UInt64, changes: [InventoryChange])] = []
  private var start = 0
  let capacity: Int

  init(capacity: Int) { self.capacity = max(1, capacity) }

  mutating func append(revision: UInt64, changes: [InventoryChange]) {
    if entries.count < capacity {
      entries.append((revision, changes))
    } else {
      entries[start] = (revision, changes)
      start = (start + 1) % capacity
    }
  }

  /// The deltas after `revision`, or nil when some of them are no longer kept.
  func deltas(after revision: UInt64, current: UInt64) -> [InventoryEvent]? {
    if revision == current { return [] }
    guard revision < current, !entries.isEmpty else { return nil }
    let oldest = entries[start].revision
    guard revision + 1 >= oldest else { return nil }
    var events: [InventoryEvent] = []
    events.reserveCapacity(Int(current - revision))
    for offset in 0..<entries.count {
      let entry = entries[(start + offset) % entries.count]
      if entry.revision > revision {
        events.append(.delta(revision: entry.revision, changes: entry.changes))
      }
    }
    return events
  }
}
