public import FPGACore
public import Logging

/// Publishes the node's pool as `resource.k8s.io/v1` ResourceSlices: every enabled VF a device
/// with the standard and the driver's own attributes; VFs the scheduler must not pick (draining,
/// unhealthy, taken through the node API or the device plugin) carry a `NoSchedule` taint with
/// the reason. Each change of the devices is a new pool generation; slices the kubelet or
/// anyone else deleted come back at the next sync.
public actor SlicePublisher {
  let api: KubernetesAPI
  let settings: DRASettings
  let engine: NodeEngine
  let logger: Logger
  private var generation: Int64 = 0
  /// When the pool was last written: accelerators' figures alone republish it at most every
  /// `figuresInterval` (they change every second; the API server need not).
  private var lastWrite: ContinuousClock.Instant?
  /// The Node the slices belong to (their ownerReference, so deleting the Node deletes them), once
  /// known; a failed lookup is retried at the next sync and publishing goes on without it.
  private var nodeOwner: Kube.OwnerReference?
  private var ownerProblemLogged = false
  /// One sync at a time (the loop's and a reconfiguration's fence): each reads the slices, then
  /// writes them with the versions it read.
  private var syncing = false
  private var waiting: [CheckedContinuation<Void, Never>] = []
  /// Whether the last sync brought the API server in line (nil before the first), and how many
  /// failed since the start: for /metrics.
  private var lastSyncSucceeded: Bool?
  private var syncFailures = 0
  var figuresInterval: Duration = .seconds(60)
  /// Grow on demand: the PFs that may grow now, with their ceilings (nil: growth is off).
  private var growable: (@Sendable (InventorySnapshot) async -> [PCIAddress: Int])?

  /// Offers the VFs of the PFs `growable` names, up to their ceilings, besides the real ones.
  public func offerGrowth(_ growable: @escaping @Sendable (InventorySnapshot) async -> [PCIAddress: Int]) {
    self.growable = growable
  }
  static let figureAttributes = ["utilizationPercent", "switchOverheadPercent", "meanSwitchMicroseconds", "guests"]

  /// The API server's limits: 128 devices per slice, 64 once any device has taints.
  static let devicesPerSlice = 128
  static let devicesPerSliceWithTaints = 64

  public init(api: KubernetesAPI, settings: DRASettings, engine: NodeEngine, logger: Logger) {
    self.api = api
    self.settings = settings
    self.engine = engine
    self.logger = logger
  }

  /// The devices the pool should have now.
  static func devices(
    _ snapshot: InventorySnapshot, settings: DRASettings, reconfiguring: Set<PCIAddress> = [],
    growable: [PCIAddress: Int] = [:]
  ) -> [Kube.Device] {
    let owners = Dictionary(snapshot.allocations.map { ($0.id, $0.owner) }, uniquingKeysWith: { a, _ in a })
    var devices: [Kube.Device] = []
    let domain = settings.driverName
    for card in snapshot.cards {
      for pf in card.pfs {
        for view in pf.vfs {
          let vf = view.function
          var taints: [Kube.Taint] = []
          func taint(_ key: String, _ reason: String) {
            taints.append(Kube.Taint(key: "\(domain)/\(key)", value: Self.labelValue(reason), effect: "NoSchedule"))
          }
          if !vf.health.isUsable || vf.iommuGroup < 0 {
            taint("unhealthy", vf.health.summary.isEmpty ? "no IOMMU group" : vf.health.summary)
          }
          if pf.draining || card.card.draining {
            taint("draining", "PF \(pf.function.address) is draining")
          } else if reconfiguring.contains(pf.function.address) {
            taint("draining", "PF \(pf.function.address) is being reconfigured")
          }
          if let owner = view.allocationID.flatMap({ owners[$0] }), !owner.hasPrefix("claim:") {
            taint("allocated", "allocated to \(owner) outside DRA")
          }
          var attributes: [String: Kube.Attribute] = [
            "resource.kubernetes.io/pciBusID": .string(vf.address.description),
            "\(domain)/kind": .string("vf"),
            "\(domain)/pf": .string(pf.function.address.description),
            "\(domain)/card": .string(card.card.id),
            "\(domain)/vfIndex": .int(vf.index),
            "\(domain)/vendorID": .string(Self.hex(vf.vendorID)),
            "\(domain)/deviceID": .string(Self.hex(vf.deviceID)),
            "\(domain)/iommuGroup": .int(vf.iommuGroup),
            "\(domain)/numaNode": .int(vf.numaNode),
          ]
          if let root = vf.pcieRoot { attributes["resource.kubernetes.io/pcieRoot"] = .string(root) }
          if settings.growth != nil { attributes["\(domain)/created"] = .flag(true) }
          devices.append(
            Kube.Device(
              name: DeviceNames.name(of: vf.address), attributes: attributes, taints: taints.isEmpty ? nil : taints))
        }
        if let ceiling = growable[pf.function.address] {
          devices += Growth.potentialDevices(pf, card: card, ceiling: ceiling, settings: settings)
        }
      }
    }
    // Each accelerator slot: one device many claims share, up to its overcommit limit of
    // guests (one guest slot per claim), with its figures for schedulers to weigh.
    for accelerator in snapshot.accelerators {
      guard let name = DeviceNames.name(ofAccelerator: accelerator.id) else { continue }
      let limit = accelerator.policy.overcommitLimit
      devices.append(
        Kube.Device(
          name: name,
          attributes: [
            "\(domain)/kind": .string("accelerator"),
            "\(domain)/card": .string(accelerator.cardID),
            "\(domain)/control": .string(accelerator.control),
            "\(domain)/overcommitLimit": .int(limit),
            "\(domain)/guests": .int(accelerator.guests.count),
            "\(domain)/utilizationPercent": .int(Int((accelerator.metrics.utilization * 100).rounded())),
            "\(domain)/switchOverheadPercent": .int(Int((accelerator.metrics.switchOverhead * 100).rounded())),
            "\(domain)/meanSwitchMicroseconds": .int(
              Int(
                accelerator.metrics.meanSwitchTime.components.seconds * 1_000_000
                  + accelerator.metrics.meanSwitchTime.components.attoseconds / 1_000_000_000_000)),
          ],
          capacity: [
            "guests": Kube.Capacity(
              value: "\(limit)",
              requestPolicy: Kube.RequestPolicy(default: "1", validRange: Kube.ValidRange(min: "1", step: "1")))
          ],
          allowMultipleAllocations: true))
    }
    return devices.sorted { $0.name < $1.name }
  }

  static func withoutFigures(_ devices: [Kube.Device], _ settings: DRASettings) -> [Kube.Device] {
    devices.map { device in
      var device = device
      for key in figureAttributes { device.attributes?["\(settings.driverName)/\(key)"] = nil }
      return device
    }
  }

  /// A taint value: at most 63 characters of a label value's alphabet.
  static func labelValue(_ text: String) -> String {
    let allowed = text.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "." || $0 == "_" ? $0 : "-" }
    var value = String(allowed.prefix(63))
    while let last = value.last, !(last.isLetter || last.isNumber) { value.removeLast() }
    while let first = value.first, !(first.isLetter || first.isNumber) { value.removeFirst() }
    return value
  }

  static func hex(_ value: UInt16) -> String {
    let digits = String(value, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, 4 - digits.count)) + digits
  }

  /// Splits the devices into slices within the API's limits.
  static func chunks(_ devices: [Kube.Device]) -> [[Kube.Device]] {
    let limit = devices.contains { $0.taints != nil } ? devicesPerSliceWithTaints : devicesPerSlice
    return stride(from: 0, to: max(devices.count, 1), by: limit).map {
      Array(devices[$0..<min($0 + limit, devices.count)])
    }
  }

  func sliceName(_ index: Int) -> String { "\(settings.nodeName)-\(settings.driverName)-\(index)" }

  /// The Node's ownerReference: looked up once (RBAC: nodes get).
  private func nodeReference() async -> Kube.OwnerReference? {
    if let nodeOwner { return nodeOwner }
    do {
      let node = try await api.node(settings.nodeName)
      guard let uid = node.metadata.uid else { return nil }
      nodeOwner = Kube.OwnerReference(apiVersion: "v1", kind: "Node", name: settings.nodeName, uid: uid)
    } catch {
      if !ownerProblemLogged {
        ownerProblemLogged = true
        logger.warning(
          "ResourceSlices are published without an owner: the Node could not be read, so they outlive its deletion",
          metadata: ["fpga.node": "\(settings.nodeName)", "fpga.error": "\(error)"])
      }
    }
    return nodeOwner
  }

  /// Brings the API server's slices in line with the node; returns whether it wrote anything.
  @discardableResult
  public func sync() async throws(KubernetesAPIError) -> Bool {
    if syncing {
      await withCheckedContinuation { waiting.append($0) }  // handed the turn by the sync before
    } else {
      syncing = true
    }
    defer {
      if waiting.isEmpty { syncing = false } else { waiting.removeFirst().resume() }
    }
    do {
      let wrote = try await reconcile()
      lastSyncSucceeded = true
      return wrote
    } catch {
      lastSyncSucceeded = false
      syncFailures += 1
      throw error
    }
  }

  /// The publisher's state, for /metrics.
  public struct Figures: Hashable, Sendable {
    /// The pool generation last written or found.
    public var generation: Int64
    public var lastSyncSucceeded: Bool?
    public var syncFailures: Int
  }

  public var figures: Figures {
    Figures(generation: generation, lastSyncSucceeded: lastSyncSucceeded, syncFailures: syncFailures)
  }

  /// One sync's work (the caller holds the turn).
  private func reconcile() async throws(KubernetesAPIError) -> Bool {
    let snapshot: InventorySnapshot
    do {
      snapshot = try await engine.snapshot()
    } catch {
      throw KubernetesAPIError(status: 0, message: "\(error)")
    }
    let desired = Self.chunks(
      Self.devices(
        snapshot, settings: settings, reconfiguring: await engine.reconfiguringPFs,
        growable: await growable?(snapshot) ?? [:]))
    let existing = try await api.resourceSlices(node: settings.nodeName, driver: settings.driverName)
    let byName = Dictionary(existing.map { ($0.metadata.name ?? "", $0) }, uniquingKeysWith: { a, _ in a })
    let current = existing.map(\.spec.pool.generation).max() ?? 0
    let figuresDue = lastWrite.map { ContinuousClock.now - $0 >= figuresInterval } ?? true
    let same: ([Kube.Device], [Kube.Device]) -> Bool = { [settings] published, wanted in
      figuresDue
        ? published == wanted : Self.withoutFigures(published, settings) == Self.withoutFigures(wanted, settings)
    }
    let consistent =
      existing.count == desired.count && Set(existing.map(\.spec.pool.generation)).count == 1
      && existing.allSatisfy { $0.spec.pool.resourceSliceCount == Int64(desired.count) }
      && desired.indices.allSatisfy { index in
        byName[sliceName(index)].map { same($0.spec.devices, desired[index]) } ?? false
      }
    if consistent {
      generation = max(generation, current)
      return false
    }
    generation = max(generation, current) + 1
    let owner = await nodeReference()
    for (index, devices) in desired.enumerated() {
      var slice = Kube.ResourceSlice(
        metadata: Kube.ObjectMeta(
          name: sliceName(index), labels: ["app.kubernetes.io/managed-by": "fpga-agent"],
          ownerReferences: owner.map { [$0] }),
        spec: .init(
          driver: settings.driverName, nodeName: settings.nodeName,
          pool: .init(name: settings.nodeName, generation: generation, resourceSliceCount: Int64(desired.count)),
          devices: devices))
      if let old = byName[sliceName(index)] {
        slice.metadata.resourceVersion = old.metadata.resourceVersion
        if owner == nil { slice.metadata.ownerReferences = old.metadata.ownerReferences }
        _ = try await api.update(slice)
      } else {
        _ = try await api.create(slice)
      }
    }
    lastWrite = ContinuousClock.now
    let keep = Set(desired.indices.map(sliceName))
    for slice in existing where !keep.contains(slice.metadata.name ?? "") {
      try await api.deleteResourceSlice(slice.metadata.name ?? "")
    }
    logger.info(
      "ResourceSlices published",
      metadata: [
        "fpga.slices": "\(desired.count)", "fpga.generation": "\(generation)",
        "fpga.devices": "\(desired.reduce(0) { $0 + $1.count })",
      ])
    return true
  }
}
