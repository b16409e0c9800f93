/// The inventory as a value: devices, allocations, revision and recent changes. Every mutation
/// returns the changes it made; `commit` turns a non-empty list into one new revision.
public struct InventoryState: Sendable {
  struct PFEntry: Sendable {
    var function: PhysicalFunction
    var vfs: [VirtualFunction]
    var draining = false
  }

  public private(set) var revision: UInt64 = 0
  private(set) var cards: [String: Card] = [:]
  private(set) var pfs: [PCIAddress: PFEntry] = [:]
  /// PF addresses in order, rebuilt when PFs come and go.
  private(set) var pfOrder: [PCIAddress] = []
  private(set) var vfIndex: [PCIAddress: PCIAddress] = [:]
  public private(set) var allocations: [String: Allocation] = [:]
  private(set) var allocationByVF: [PCIAddress: String] = [:]
  public private(set) var vms: [String: VirtualMachineInfo] = [:]
  public private(set) var accelerators: [String: AcceleratorView] = [:]
  private var log: ChangeLog

  public init(changeLogCapacity: Int = 4096) {
    log = ChangeLog(capacity: changeLogCapacity)
  }

  // MARK: Reading

  public func pf(_ address: PCIAddress) -> PhysicalFunction? { pfs[address]?.function }

  public func isPFDraining(_ address: PCIAddress) -> Bool { pfs[address]?.draining ?? false }

  public func card(_ id: String) -> Card? { cards[id] }

  public var pfAddresses: [PCIAddress] { pfOrder }

  public var cardIDs: [String] { cards.keys.sorted() }

  public func vf(_ address: PCIAddress) -> VirtualFunction? {
    guard let pf = vfIndex[address], let entry = pfs[pf] else { return nil }
    return entry.vfs.first { $0.address == address }
  }

  public func view(of vf: VirtualFunction) -> VFView {
    let allocation = allocationByVF[vf.address].flatMap { allocations[$0] }
    let state: VFState
    if let allocation {
      state = allocation.detaching ? .detaching : allocation.attached ? .attached : .allocated
    } else {
      state = vf.isPassthroughCapable ? .free : .unhealthy
    }
    return VFView(
      function: vf, state: state, allocationID: allocation?.id,
      vm: allocation?.attached == true ? allocation?.vm : nil)
  }

  public func deltas(after revision: UInt64) -> [InventoryEvent]? {
    log.deltas(after: revision, current: self.revision)
  }

  public func snapshot(nodeID: String, cardID: String? = nil) -> InventorySnapshot {
    var byCard: [String: [PFView]] = [:]
    for address in pfOrder {
      guard let entry = pfs[address] else { continue }
      let card = entry.function.cardID
      if let cardID, card != cardID { continue }
      byCard[card, default: []].append(
        PFView(function: entry.function, draining: entry.draining, vfs: entry.vfs.map(view(of:))))
    }
    let cards = byCard.keys.sorted().compactMap { id in
      self.cards[id].map { CardView(card: $0, pfs: byCard[id] ?? []) }
    }
    let allocations = allocations.values
      .filter { cardID == nil || $0.cardID == cardID }
      .sorted { $0.id < $1.id }
    return InventorySnapshot(
      revision: revision, nodeID: nodeID, cards: cards, allocations: allocations,
      vms: vms.values.sorted { $0.name < $1.name },
      accelerators: accelerators.values.filter { cardID == nil || $0.cardID == cardID }.sorted { $0.id < $1.id })
  }

  public struct Counts: Hashable, Sendable {
    public var cards = 0
    public var pfs = 0
    public var vfsTotal = 0
    public var vfsEnabled = 0
    public var vfsAllocated = 0
    public var vfsFree = 0
  }

  public var counts: Counts {
    var counts = Counts()
    counts.cards = cards.count
    counts.pfs = pfs.count
    for entry in pfs.values {
      counts.vfsTotal += entry.function.totalVFs
      counts.vfsEnabled += entry.vfs.count
      for vf in entry.vfs where allocationByVF[vf.address] == nil && vf.isPassthroughCapable {
        counts.vfsFree += 1
      }
    }
    counts.vfsAllocated = allocations.count
    return counts
  }

  // MARK: Changing

  /// Moves the revision counter forward to `revision` (at start-up: revisions of an earlier run
  /// must never be mistaken for this run's).
  public mutating func skipRevisions(to revision: UInt64) {
    self.revision = max(self.revision, revision)
  }

  /// Makes one revision of `changes`; returns the new revision (unchanged when empty).
  @discardableResult
  public mutating func commit(_ changes: [InventoryChange]) -> UInt64 {
    guard !changes.isEmpty else { return revision }
    revision += 1
    log.append(revision: revision, changes: changes)
    return revision
  }

  /// Brings the devices in line with what the platform found. Allocations whose VF vanished
  /// end (each is reported by the changes).
  public mutating func apply(_ node: DiscoveredNode) -> [InventoryChange] {
    var changes: [InventoryChange] = []
    let found = Dictionary(node.pfs.map { ($0.function.address, $0) }, uniquingKeysWith: { a, _ in a })

    // Cards first, so that a watcher always knows a PF's card before the PF.
    var foundCards: [String: Card] = [:]
    for pf in node.pfs.sorted(by: { $0.function.address < $1.function.address }) {
      let id = pf.function.cardID
      if foundCards[id] == nil {
        foundCards[id] = Card(
          id: id, model: qdmaModelName(vendorID: pf.function.vendorID, deviceID: pf.function.deviceID),
          numaNode: pf.function.numaNode, draining: cards[id]?.draining ?? false)
      }
    }
    for (id, card) in foundCards.sorted(by: { $0.key < $1.key }) where cards[id] != card {
      cards[id] = card
      changes.append(.cardUpdated(card))
    }

    for address in found.keys.sorted() {
      let discovered = found[address]!
      var entry = pfs[address] ?? PFEntry(function: discovered.function, vfs: [])
      let isNew = pfs[address] == nil
      if isNew || entry.function != discovered.function {
        entry.function = discovered.function
        changes.append(.pfUpdated(entry.function, draining: entry.draining))
      }
      let old = Dictionary(entry.vfs.map { ($0.address, $0) }, uniquingKeysWith: { a, _ in a })
      let new = discovered.vfs.sorted { $0.index < $1.index }
      let newAddresses = Set(new.map(\.address))
      for vf in entry.vfs where !newAddresses.contains(vf.address) {
        changes += endAllocation(on: vf.address)
        vfIndex[vf.address] = nil
        changes.append(.vfRemoved(vf.address))
      }
      entry.vfs = new
      pfs[address] = entry
      for vf in new where old[vf.address] != vf {
        vfIndex[vf.address] = address
        changes.append(.vfUpdated(view(of: vf)))
      }
    }

    for (address, entry) in pfs where found[address] == nil {
      for vf in entry.vfs {
        changes += endAllocation(on: vf.address)
        vfIndex[vf.address] = nil
        changes.append(.vfRemoved(vf.address))
      }
      pfs[address] = nil
      changes.append(.pfRemoved(address))
    }
    for id in cards.keys.sorted() where foundCards[id] == nil {
      cards[id] = nil
      changes.append(.cardRemoved(id))
    }
    pfOrder = pfs.keys.sorted()
    return changes
  }

  private mutating func endAllocation(on vf: PCIAddress) -> [InventoryChange] {
    guard let id = allocationByVF.removeValue(forKey: vf) else { return [] }
    allocations[id] = nil
    return [.allocationRemoved(id)]
  }

  /// Records `allocation`; its VF must be known and free.
  public mutating func insert(_ allocation: Allocation) -> [InventoryChange] {
    precondition(allocationByVF[allocation.vf] == nil, "VF \(allocation.vf) is already allocated")
    allocations[allocation.id] = allocation
    allocationByVF[allocation.vf] = allocation.id
    var changes: [InventoryChange] = [.allocationUpdated(allocation)]
    if let vf = vf(allocation.vf) { changes.append(.vfUpdated(view(of: vf))) }
    return changes
  }

  /// Ends the allocation `id`; returns it with the changes, nil when unknown.
  public mutating func remove(allocation id: String) -> (Allocation, [InventoryChange])? {
    guard let allocation = allocations.removeValue(forKey: id) else { return nil }
    allocationByVF[allocation.vf] = nil
    var changes: [InventoryChange] = [.allocationRemoved(id)]
    if let vf = vf(allocation.vf) { changes.append(.vfUpdated(view(of: vf))) }
    return (allocation, changes)
  }

  /// Replaces an existing allocation (attachment changes); returns the changes.
  public mutating func update(_ allocation: Allocation) -> [InventoryChange] {
    guard allocations[allocation.id] != nil else { return [] }
    allocations[allocation.id] = allocation
    var changes: [InventoryChange] = [.allocationUpdated(allocation)]
    if let vf = vf(allocation.vf) { changes.append(.vfUpdated(view(of: vf))) }
    return changes
  }

  /// Brings the VMs in line with what the hypervisor reports.
  public mutating func apply(vms found: [VirtualMachineInfo]) -> [InventoryChange] {
    var changes: [InventoryChange] = []
    let byName = Dictionary(found.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
    for vm in found.sorted(by: { $0.name < $1.name }) where vms[vm.name] != vm {
      vms[vm.name] = vm
      changes.append(.vmUpdated(vm))
    }
    for name in vms.keys.sorted() where byName[name] == nil {
      vms[name] = nil
      changes.append(.vmRemoved(name))
    }
    return changes
  }

  /// Brings the accelerators in line with what their runners report.
  public mutating func apply(accelerators found: [AcceleratorView]) -> [InventoryChange] {
    var changes: [InventoryChange] = []
    let byID = Dictionary(found.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
    for accelerator in found.sorted(by: { $0.id < $1.id }) where accelerators[accelerator.id] != accelerator {
      accelerators[accelerator.id] = accelerator
      changes.append(.acceleratorUpdated(accelerator))
    }
    for id in accelerators.keys.sorted() where byID[id] == nil {
      accelerators[id] = nil
      changes.append(.acceleratorRemoved(id))
    }
    return changes
  }

  /// Sets a PF's drain flag.
  public mutating func setDraining(pf address: PCIAddress, _ draining: Bool) -> [InventoryChange] {
    guard var entry = pfs[address], entry.draining != draining else { return [] }
    entry.draining = draining
    pfs[address] = entry
    return [.pfUpdated(entry.function, draining: draining)]
  }

  /// Sets a card's drain flag.
  public mutating func setDraining(card id: String, _ draining: Bool) -> [InventoryChange] {
    guard var card = cards[id], card.draining != draining else { return [] }
    card.draining = draining
    cards[id] = card
    return [.cardUpdated(card)]
  }

  // MARK: Allocation rules

  /// A PF and its VFs as last discovered.
  public func discovered(_ address: PCIAddress) -> DiscoveredPF? {
    pfs[address].map { DiscoveredPF(function: $0.function, vfs: $0.vfs) }
  }

  /// The VFs of a PF, by index.
  public func vfs(of address: PCIAddress) -> [VirtualFunction] { pfs[address]?.vfs ?? [] }

  /// The VF an allocation with `constraints` gets: the first free, healthy VF (preferring
  /// VFs already bound to vfio-pci) on a non-draining PF and card that satisfies them. PFs in
  /// `busy` (under reconfiguration, with their operation) are skipped.
  /// `busy`: PFs being reconfigured (PF → operation); `taken`: VFs other requests are
  /// allocating (VF → allocation id), not in the inventory until their records are durable.
  public func chooseVF(
    _ constraints: AllocationConstraints, excluding busy: [PCIAddress: String] = [:],
    taken: [PCIAddress: String] = [:]
  ) throws(AgentError) -> VirtualFunction {
    if let wanted = constraints.vf {
      guard let vf = vf(wanted) else {
        throw AgentError(.notFound, "VF \(wanted) does not exist on this node; `fpgactl inventory --vfs` lists them")
      }
      if let operation = busy[vf.pfAddress] {
        throw AgentError(
          .unavailable, "PF \(vf.pfAddress) is being reconfigured (operation \(operation)); retry when it ends")
      }
      if let holder = allocationByVF[wanted] ?? taken[wanted] {
        throw AgentError(.failedPrecondition, "VF \(wanted) is already allocated (\(holder))")
      }
      guard vf.isPassthroughCapable else {
        throw AgentError(.failedPrecondition, "VF \(wanted) has no IOMMU group: it cannot be passed through")
      }
      return vf
    }
    if let pf = constraints.pf, let operation = busy[pf] {
      throw AgentError(
        .unavailable,
        "PF \(pf) is being reconfigured (operation \(operation)); retry when it ends (`fpgactl operation \(operation) --watch`)"
      )
    }
    if let cardID = constraints.cardID, cards[cardID] == nil {
      throw AgentError(
        .notFound, "card \(quoted(cardID)) is not on this node; `fpgactl inventory` lists the cards")
    }
    if let pf = constraints.pf {
      guard let entry = pfs[pf] else {
        throw AgentError(
          .notFound, "PF \(pf) is not managed by this node; `fpgactl inventory` lists the PFs")
      }
      if let cardID = constraints.cardID, entry.function.cardID != cardID {
        throw AgentError(
          .invalidArgument,
          "PF \(pf) is on card \(entry.function.cardID), not on \(cardID): drop one of the two constraints"
        )
      }
      if entry.draining {
        throw AgentError(
          .failedPrecondition, "PF \(pf) is draining; undrain it (`fpgactl undrain \(pf)`) first")
      }
    }
    if let cardID = constraints.cardID, cards[cardID]?.draining == true {
      throw AgentError(
        .failedPrecondition, "card \(cardID) is draining; undrain it (`fpgactl undrain \(cardID)`) first")
    }

    var fallback: VirtualFunction?
    var considered = 0
    for address in pfOrder {
      guard let entry = pfs[address], !entry.draining, busy[address] == nil else { continue }
      if let pf = constraints.pf, pf != address { continue }
      if let cardID = constraints.cardID, entry.function.cardID != cardID { continue }
      if cards[entry.function.cardID]?.draining == true { continue }
      for vf in entry.vfs {
        if let numa = constraints.numaNode, vf.numaNode != numa { continue }
        considered += 1
        guard allocationByVF[vf.address] == nil, taken[vf.address] == nil, vf.isPassthroughCapable else { continue }
        if vf.driver == "vfio-pci" { return vf }
        if fallback == nil { fallback = vf }
      }
    }
    if let fallback { return fallback }
    throw AgentError(.resourceExhausted, exhaustedMessage(constraints, considered: considered))
  }

  private func exhaustedMessage(_ constraints: AllocationConstraints, considered: Int) -> String {
    var scope: [String] = []
    if let cardID = constraints.cardID { scope.append("card \(cardID)") }
    if let pf = constraints.pf { scope.append("PF \(pf)") }
    if let numa = constraints.numaNode { scope.append("NUMA node \(numa)") }
    let place = scope.isEmpty ? "on this node" : "matching " + scope.joined(separator: ", ")
    if considered == 0 {
      return "no enabled VF \(place): enable VFs with `fpgactl reconfigure PF N` or relax the constraints"
    }
    return "all \(considered) enabled VFs \(place) are allocated or unhealthy: release one, "
      + "enable more VFs with `fpgactl reconfigure PF N`, or relax the constraints"
  }
}

/// Where an allocation may come from; nil does not restrict.
public struct AllocationConstraints: Hashable, Sendable {
  public var cardID: String?
  public var pf: PCIAddress?
  public var numaNode: Int?
  /// This VF exactly (the device plugin allocates the VF the kubelet chose).
  public var vf: PCIAddress?

  public init(cardID: String? = nil, pf: PCIAddress? = nil, numaNode: Int? = nil, vf: PCIAddress? = nil) {
    self.cardID = cardID
    self.pf = pf
    self.numaNode = numaNode
    self.vf = vf
  }
}
