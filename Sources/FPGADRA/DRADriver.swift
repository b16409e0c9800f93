public import FPGACore
import Foundation
public import Logging

/// The DRA driver's node side: prepares claims into allocated, vfio-pci-bound VFs with a CDI
/// spec and KubeVirt's metadata file, and unprepares them. Every step is journaled in the
/// agent's store; unprepared claims leave a tombstone so that a stale retry of Prepare cannot
/// take a device again (the kubelet may retry a Prepare after its Unprepare).
public actor DRADriver {
  public let settings: DRASettings
  let engine: NodeEngine
  let store: any StateStore
  let claims: any ClaimSource
  let logger: Logger
  private var prepared: [String: PreparedClaim] = [:]
  /// Unprepared claim UIDs, oldest first (bounded), and what each tombstone knows.
  private var tombstones: [String] = []
  private var tombstoneInfo: [String: Tombstone] = [:]
  /// Prepared claims whose status report failed: reported again at the kubelet's next Prepare.
  private var unreported: Set<String> = []
  /// Claims being prepared or unprepared right now.
  private var busy: Set<String> = []
  /// Prepares under way, by claim uid: a retry of one joins it.
  private var preparing: [String: Task<Result<[PreparedDevice], DRAFailure>, Never>] = [:]
  /// Retries waiting on a Prepare under way, by claim uid (tests).
  private var joinedPrepares: [String: Int] = [:]
  func isJoined(_ uid: String) -> Bool { (joinedPrepares[uid] ?? 0) > 0 }
  /// Prepares waiting on another claim's growth of their PF (tests).
  var growthWaiters = 0
  /// Growths under way, by PF, with the count each writes.
  var growths: [PCIAddress: (target: Int, task: Task<Result<Void, DRAFailure>, Never>)] = [:]
  /// PFs whose last growth failed, with why and their VF count then: not offered again until it
  /// changes.
  var failedGrowths: [PCIAddress: (why: String, numVFs: Int)] = [:]
  var growthFigures = GrowthFigures()
  var growthEnded: (@Sendable () async -> Void)?
  private var counts = Figures()
  static let claimKind = "dra-claim"
  static let tombstoneKind = "dra-tombstone"
  static let tombstoneLimit = 4096

  public init(settings: DRASettings, engine: NodeEngine, store: any StateStore, claims: any ClaimSource, logger: Logger)
  {
    self.settings = settings
    self.engine = engine
    self.store = store
    self.claims = claims
    self.logger = logger
  }

  /// At start: the journal back in memory, CDI specs and metadata rewritten for every completed
  /// claim (`/var/run/cdi` is a tmpfs), claims a crash left half-prepared undone.
  public func restore() async throws(AgentError) {
    let persisted = try store.load()
    let decoder = JSONDecoder()
    for (uid, body) in persisted.records[Self.claimKind] ?? [:] {
      guard let claim = try? decoder.decode(PreparedClaim.self, from: Data(body.utf8)) else { continue }
      prepared[uid] = claim
    }
    let buried = persisted.records[Self.tombstoneKind] ?? [:]
    tombstones = buried.sorted { $0.value < $1.value }.map(\.key)
    tombstoneInfo = buried.mapValues(Tombstone.init(record:))
    for claim in prepared.values.sorted(by: { $0.uid < $1.uid }) {
      switch claim.state {
      case .completed:
        let claim = await refreshed(claim)
        do {
          try writeFiles(claim)
        } catch {
          logger.error(
            "cannot rewrite the CDI spec of a prepared claim",
            metadata: ["fpga.claim": "\(claim.uid)", "fpga.error": "\(error)"])
        }
      case .started:
        // The kubelet retries Prepare; start it afresh.
        logger.warning("undoing a claim preparation a crash interrupted", metadata: ["fpga.claim": "\(claim.uid)"])
        await undo(claim)
      }
    }
  }

  // MARK: Prepare

  /// Prepares each claim; a claim's failure is its own (the kubelet retries it).
  public func prepare(_ references: [ClaimReference]) async -> [String: Result<[PreparedDevice], DRAFailure>] {
    var results: [String: Result<[PreparedDevice], DRAFailure>] = [:]
    for reference in references {
      do {
        results[reference.uid] = .success(try await prepare(reference))
        counts.prepared += 1
      } catch {
        counts.prepareFailures += 1
        logger.warning(
          "claim preparation failed",
          metadata: ["fpga.claim": "\(reference.description)", "fpga.error": "\(error.message)"])
        results[reference.uid] = .failure(error)
      }
    }
    return results
  }

  /// Prepares one claim; a retry while it is being prepared (the kubelet's, while a growth
  /// runs) waits for the same preparation and gets its answer.
  func prepare(_ reference: ClaimReference) async throws(DRAFailure) -> [PreparedDevice] {
    if let running = preparing[reference.uid] {
      joinedPrepares[reference.uid, default: 0] += 1
      defer { joinedPrepares[reference.uid, default: 1] -= 1 }
      return try await running.value.get()
    }
    if let known = prepared[reference.uid], known.state == .completed { return try await prepareOnce(reference) }
    let task = Task { () async -> Result<[PreparedDevice], DRAFailure> in
      do throws(DRAFailure) {
        return .success(try await self.prepareOnce(reference))
      } catch {
        return .failure(error)
      }
    }
    preparing[reference.uid] = task
    let outcome = await task.value
    preparing[reference.uid] = nil
    return try outcome.get()
  }

  private func prepareOnce(_ reference: ClaimReference) async throws(DRAFailure) -> [PreparedDevice] {
    if let known = prepared[reference.uid], known.state == .completed {
      try? writeFiles(known)
      if unreported.contains(reference.uid), busy.insert(reference.uid).inserted {
        defer { busy.remove(reference.uid) }
        await report(known, withdraw: false)
      }
      return known.devices
    }
    guard busy.insert(reference.uid).inserted else {
      throw DRAFailure("claim \(reference.description) is being prepared or unprepared right now; retry")
    }
    defer { busy.remove(reference.uid) }
    let claim: Kube.ResourceClaim
    do {
      claim = try await claims.resourceClaim(namespace: reference.namespace, name: reference.name)
    } catch {
      throw DRAFailure("cannot read ResourceClaim \(reference.namespace)/\(reference.name): \(error)")
    }
    guard claim.metadata.uid == reference.uid else {
      throw DRAFailure(
        "claim \(reference.namespace)/\(reference.name) got replaced: its uid is \(claim.metadata.uid ?? "none"), the kubelet asked for \(reference.uid)"
      )
    }
    let results = (claim.status?.allocation?.devices?.results ?? []).filter { $0.driver == settings.driverName }
    guard claim.status?.allocation != nil, !results.isEmpty else {
      throw DRAFailure(
        "claim \(reference.description) is not allocated to driver \(settings.driverName) (status.allocation has no result for it)"
      )
    }
    // The opaque parameters of every share are checked before anything is journaled or taken.
    var shares: [String: (function: String, weight: UInt32)] = [:]
    for result in results where DeviceNames.accelerator(result.device) != nil {
      shares[result.request] = try Self.parameters(claim, request: result.request, driver: settings.driverName)
    }
    let allocation = Self.allocationKey(claim, driver: settings.driverName)
    if let tombstone = tombstoneInfo[reference.uid] {
      // The kubelet may retry a Prepare after its Unprepare: that one must take nothing. A claim
      // deallocated and allocated again (a standalone claim used by another pod) is new.
      guard tombstone.admits(allocation, of: claim) else {
        throw DRAFailure(
          "claim \(reference.description) was unprepared on this node: a stale Prepare cannot take its devices again")
      }
      try await exhume(reference.uid)
    }
    var journal = PreparedClaim(
      namespace: reference.namespace, name: reference.name, uid: reference.uid, state: .started, devices: [],
      allocation: allocation)
    try await record(journal)
    do {
      let readable = "claim:\(reference.namespace)/\(reference.name)/\(reference.uid)"
      let owner = readable.utf8.count <= 128 ? readable : "claim:\(reference.uid)"
      for result in results {
        guard result.pool == settings.nodeName else {
          throw DRAFailure(
            "device \(result.device) of claim \(reference.description) is from pool \(result.pool), not this node's (\(settings.nodeName))"
          )
        }
        if let accelerator = DeviceNames.accelerator(result.device) {
          // A time share of an accelerator: the claim becomes a guest with its context there.
          let parameters = shares[result.request] ?? (function: "default", weight: 1)
          let (context, _) = try await engine.registerContext(
            NodeEngine.RegisterContextRequest(
              meta: RequestMeta(idempotencyKey: "dra-\(reference.uid)-\(result.device)-\(Self.digest(allocation))"),
              acceleratorID: accelerator,
              guest: Self.guest(reference), function: parameters.function, weight: parameters.weight))
          journal.devices.append(
            PreparedDevice(
              request: result.request, pool: result.pool, device: result.device, vf: "", allocationID: "",
              vfioDevice: "", cdiID: "\(settings.cdiKind)=\(reference.uid)-\(result.device)", shareID: result.shareID,
              accelerator: accelerator, contextID: context.id))
          try await record(journal)
          continue
        }
        guard let vf = DeviceNames.vf(result.device) else {
          throw DRAFailure(
            "device \(quoted(result.device)) of claim \(reference.description) is not one of this driver's VFs (vf-DDDD-BB-DD-F)"
          )
        }
        if let (pf, index) = await potentialVF(vf) { try await grow(pf, toHold: index, for: reference) }
        let (allocation, device) = try await engine.allocateOwned(
          vf: vf, owner: owner, key: "dra-\(reference.uid)-\(result.device)-\(Self.digest(allocation))")
        journal.devices.append(
          PreparedDevice(
            request: result.request, pool: result.pool, device: result.device, vf: vf.description,
            allocationID: allocation.id, vfioDevice: device,
            cdiID: "\(settings.cdiKind)=\(reference.uid)-\(result.device)",
            shareID: result.shareID))
        try await record(journal)
      }
      journal.state = .completed
      try writeFiles(journal)
      try await record(journal)
      prepared[reference.uid] = journal
      logger.info(
        "claim prepared",
        metadata: [
          "fpga.claim": "\(reference.description)", "fpga.vfs": "\(journal.devices.map(\.vf).joined(separator: ","))",
        ])
      await report(journal, withdraw: false)
      return journal.devices
    } catch {
      await undo(journal)
      throw (error as? DRAFailure) ?? DRAFailure("\((error as? AgentError)?.message ?? "\(error)")")
    }
  }

  // MARK: Unprepare

  /// Unprepares each claim: its allocations end, its files go. An unknown claim succeeds, and
  /// so does one whose device has gone (the pod must be able to end).
  public func unprepare(_ references: [ClaimReference]) async -> [String: DRAFailure?] {
    var results: [String: DRAFailure?] = [:]
    for reference in references {
      guard busy.insert(reference.uid).inserted else {
        results[reference.uid] = DRAFailure(
          "claim \(reference.description) is being prepared or unprepared right now; retry")
        counts.unprepareFailures += 1
        continue
      }
      defer { busy.remove(reference.uid) }
      let claim = prepared[reference.uid]
      if let claim {
        await undo(claim)
        logger.info("claim unprepared", metadata: ["fpga.claim": "\(reference.description)"])
        await report(claim, withdraw: true)
      }
      do {
        try await entomb(reference.uid, allocation: claim?.allocation)
        results[reference.uid] = .some(nil)
        counts.unprepared += 1
      } catch {
        results[reference.uid] = error
        counts.unprepareFailures += 1
      }
    }
    return results
  }

  /// Releases what `claim` holds and forgets it.
  private func undo(_ claim: PreparedClaim) async {
    for device in claim.devices {
      if let context = device.contextID {
        do {
          try await engine.deleteContext(context, meta: RequestMeta())
        } catch  where error.code == .notFound {
        } catch {
          logger.error(
            "cannot delete a claim's context",
            metadata: ["fpga.claim": "\(claim.uid)", "fpga.error": "\(error.message)"])
        }
        continue
      }
      do {
        _ = try await engine.release(ReleaseRequest(allocationID: device.allocationID))
      } catch  where error.code == .notFound {
        // Already ended (its device left the bus, or released by hand): nothing to do.
      } catch {
        logger.error(
          "cannot release a claim's VF", metadata: ["fpga.claim": "\(claim.uid)", "fpga.error": "\(error.message)"])
      }
    }
    removeFiles(claim)
    prepared[claim.uid] = nil
    try? await store.commit([.deleteRecord(Self.claimKind, claim.uid)])
  }

  // MARK: Claim status

  /// Tells the API server what was prepared: this driver's entries in the claim's
  /// `status.devices`, each `Ready` with the VF's address and VFIO group or the share's context
  /// (what `kubectl get resourceclaim -o yaml` shows). Withdrawn at Unprepare. Informational:
  /// a failure is logged and changes nothing on the node. Runs while the claim is busy, so a
  /// claim's reports are in the order of its Prepare and Unprepare.
  private func report(_ claim: PreparedClaim, withdraw: Bool) async {
    let reference = ClaimReference(namespace: claim.namespace, uid: claim.uid, name: claim.name)
    let now = ISO8601DateFormatter().string(from: Date())
    let devices = withdraw ? [] : claim.devices.map { Self.status(of: $0, driver: settings.driverName, at: now) }
    do {
      try await claims.reportDevices(devices, of: reference, driver: settings.driverName)
      unreported.remove(claim.uid)
    } catch let error as KubernetesAPIError where withdraw && (error.status == 404 || error.status == 409) {
      // The claim was deleted or replaced: no entry of this driver is left on it.
    } catch {
      counts.statusFailures += 1
      if withdraw { unreported.remove(claim.uid) } else { unreported.insert(claim.uid) }
      var metadata: Logger.Metadata = ["fpga.claim": "\(reference.description)", "fpga.error": "\(error)"]
      if (error as? KubernetesAPIError)?.status == 403 {
        metadata["fpga.hint"] =
          "grant patch on resourceclaims/status and, from Kubernetes 1.36, associated-node:patch on resourceclaims/driver for \(settings.driverName)"
      }
      logger.warning(
        withdraw ? "cannot withdraw the claim's device status" : "cannot report the claim's device status",
        metadata: metadata)
    }
  }

  /// A prepared device as a `status.devices` entry.
  static func status(of device: PreparedDevice, driver: String, at time: String) -> Kube.AllocatedDeviceStatus {
    var data: [String: JSONAny] = ["cdiDeviceID": .string(device.cdiID)]
    let message: String
    if let accelerator = device.accelerator, let context = device.contextID {
      data["accelerator"] = .string(accelerator)
      data["context"] = .string(context)
      message = "context \(context) registered on accelerator \(accelerator)"
    } else {
      data["pciBusID"] = .string(device.vf)
      data["vfioDevice"] = .string(device.vfioDevice)
      message = "VF \(device.vf) bound to vfio-pci, \(device.vfioDevice)"
    }
    return Kube.AllocatedDeviceStatus(
      driver: driver, pool: device.pool, device: device.device, shareID: device.shareID,
      conditions: [
        Kube.Condition(type: "Ready", status: "True", reason: "Prepared", message: message, lastTransitionTime: time)
      ],
      data: .object(data))
  }

  private func entomb(_ uid: String, allocation: String?) async throws(DRAFailure) {
    guard tombstoneInfo[uid] == nil else { return }
    let tombstone = Tombstone(time: Date().timeIntervalSince1970, allocation: allocation)
    var changes: [StoreChange] = [.putRecord(Self.tombstoneKind, uid, tombstone.record)]
    tombstones.append(uid)
    tombstoneInfo[uid] = tombstone
    while tombstones.count > Self.tombstoneLimit {
      let oldest = tombstones.removeFirst()
      tombstoneInfo[oldest] = nil
      changes.append(.deleteRecord(Self.tombstoneKind, oldest))
    }
    do {
      try await store.commit(changes)
    } catch {
      throw DRAFailure("cannot record the unpreparation: \(error.message)")
    }
  }

  /// Forgets a tombstone: its claim was allocated again.
  private func exhume(_ uid: String) async throws(DRAFailure) {
    do {
      try await store.commit([.deleteRecord(Self.tombstoneKind, uid)])
    } catch {
      throw DRAFailure("cannot record the new allocation of claim \(uid): \(error.message)")
    }
    tombstones.removeAll { $0 == uid }
    tombstoneInfo[uid] = nil
  }

  /// A claim's allocation to this driver as one text: the scheduler's timestamp and the results
  /// (request, pool, device, share). Equal for the retries of one allocation; a deallocation and
  /// a new allocation change the timestamp (and usually the devices).
  static func allocationKey(_ claim: Kube.ResourceClaim, driver: String) -> String {
    let allocation = claim.status?.allocation
    let results = (allocation?.devices?.results ?? []).filter { $0.driver == driver }
      .map { "\($0.request)/\($0.pool)/\($0.device)/\($0.shareID ?? "")" }.sorted()
    return "at=\(allocation?.allocationTimestamp ?? "")," + results.joined(separator: ",")
  }

  /// FNV-1a (32 bits) of a text as 8 hex digits, stable across processes (Swift's `Hasher` is
  /// not): an allocation's part of the idempotency keys of what it takes, so that a claim
  /// allocated again does not replay what its earlier allocation took and gave back.
  static func digest(_ text: String) -> String {
    var hash: UInt32 = 0x811c_9dc5
    for byte in text.utf8 { hash = (hash ^ UInt32(byte)) &* 0x0100_0193 }
    let hex = String(hash, radix: 16)
    return String(repeating: "0", count: 8 - hex.count) + hex
  }

  /// An unprepared claim: when, and the allocation it had (nil when this node never prepared it,
  /// or for tombstones of older agents). Stored as `<seconds> <allocation>`.
  struct Tombstone: Hashable {
    var time: Double
    var allocation: String?

    init(time: Double, allocation: String?) {
      self.time = time
      self.allocation = allocation
    }

    init(record: String) {
      let parts = record.split(separator: " ", maxSplits: 1)
      time = parts.first.flatMap { Double($0) } ?? 0
      allocation = parts.count == 2 ? String(parts[1]) : nil
    }

    var record: String { String(format: "%020.6f", time) + (allocation.map { " " + $0 } ?? "") }

    /// Whether a Prepare of the claim, allocated as `key` now, is for a new allocation. Without
    /// the old allocation, only one the scheduler made over a minute after the Unprepare surely is.
    func admits(_ key: String, of claim: Kube.ResourceClaim) -> Bool {
      if let allocation { return key != allocation }
      guard let text = claim.status?.allocation?.allocationTimestamp,
        let allocated = ISO8601DateFormatter().date(from: text)
      else { return false }
      return allocated.timeIntervalSince1970 > time + 60
    }
  }

  /// A prepared claim whose VFs now sit in other IOMMU groups (a host reboot re-created them
  /// through the engine's layout restore, and the kernel numbered them anew): its devices name
  /// the groups of today, kept in the store, so the CDI spec written next points at the right
  /// `/dev/vfio/N`.
  private func refreshed(_ claim: PreparedClaim) async -> PreparedClaim {
    guard let snapshot = try? await engine.snapshot() else { return claim }
    let groups = Dictionary(snapshot.allocations.map { ($0.id, $0.iommuGroup) }, uniquingKeysWith: { a, _ in a })
    var updated = claim
    for index in updated.devices.indices where updated.devices[index].shareID == nil {
      guard let group = groups[updated.devices[index].allocationID], group >= 0 else { continue }
      let node = "/dev/vfio/\(group)"
      guard updated.devices[index].vfioDevice != node else { continue }
      logger.notice(
        "a prepared claim's VF is in another IOMMU group since the agent's last run: its CDI spec is rewritten",
        metadata: [
          "fpga.claim": "\(claim.uid)", "fpga.vf": "\(updated.devices[index].vf)",
          "fpga.from": "\(updated.devices[index].vfioDevice)", "fpga.to": "\(node)",
        ])
      updated.devices[index].vfioDevice = node
    }
    guard updated != claim else { return claim }
    do {
      try await record(updated)
      prepared[claim.uid] = updated
      return updated
    } catch {
      logger.error("cannot record a prepared claim's new IOMMU group", metadata: ["fpga.claim": "\(claim.uid)"])
      return claim
    }
  }

  /// Rewrites a prepared claim's spec with its VFs' groups of now.
  func refreshSpec(_ uid: String) async {
    guard let claim = prepared[uid], claim.state == .completed else { return }
    try? writeFiles(await refreshed(claim))
  }

  private func record(_ claim: PreparedClaim) async throws(DRAFailure) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    guard let body = try? encoder.encode(claim) else { throw DRAFailure("cannot encode claim \(claim.uid)") }
    do {
      try await store.commit([.putRecord(Self.claimKind, claim.uid, String(decoding: body, as: UTF8.self))])
    } catch {
      throw DRAFailure("cannot journal claim \(claim.uid): \(error.message)")
    }
  }

  /// The guest name a claim's share runs as (a VM-name-like `claim-<uid>`).
  static func guest(_ reference: ClaimReference) -> String {
    "claim-" + String(reference.uid.map { $0.isLetter || $0.isNumber || $0 == "-" ? $0 : "-" }.prefix(57))
  }

  /// A share's function and weight, from the claim's opaque configuration for this driver
  /// (`{"function": "fft", "weight": 2}`), for the request or the whole claim. A weight that is
  /// not a whole number within 1-1000, or a function that is not a string, fails the claim
  /// (naming the field), rather than being replaced by a default nobody asked for.
  static func parameters(_ claim: Kube.ResourceClaim, request: String, driver: String) throws(DRAFailure) -> (
    function: String, weight: UInt32
  ) {
    var function = "default"
    var weight: UInt32 = 1
    for config in claim.status?.allocation?.devices?.config ?? [] {
      guard let opaque = config.opaque, opaque.driver == driver,
        config.requests?.isEmpty ?? true || config.requests?.contains(request) == true
      else { continue }
      switch opaque.parameters?["function"] {
      case nil, .null: break
      case .string(let text): if !text.isEmpty { function = text }
      default:
        throw DRAFailure("opaque parameter function of driver \(driver) (request \(request)) must be a string")
      }
      switch opaque.parameters?["weight"] {
      case nil, .null: break
      case .number(let value)
      where value.rounded() == value && Double(Bounds.weight.lowerBound)...Double(Bounds.weight.upperBound) ~= value:
        weight = UInt32(value)
      case let other?:
        throw DRAFailure(
          "opaque parameter weight of driver \(driver) (request \(request)) is \(other.text): it must be a whole number within \(Bounds.weight.lowerBound)-\(Bounds.weight.upperBound)"
        )
      }
    }
    return (function, weight)
  }

  /// The claims prepared now (for health and tests).
  public var preparedClaims: [PreparedClaim] { prepared.values.sorted { $0.uid < $1.uid } }

  /// What the driver did since the start, for /metrics: claims answered by call and result,
  /// status reports refused, and the claims prepared now.
  public struct Figures: Hashable, Sendable {
    public var preparedNow = 0
    public var prepared = 0
    public var prepareFailures = 0
    public var unprepared = 0
    public var unprepareFailures = 0
    public var statusFailures = 0
  }

  public var figures: Figures {
    var figures = counts
    figures.preparedNow = prepared.count
    return figures
  }

  // MARK: Files

  /// Where KubeVirt's metadata file of a request is kept on the host.
  func metadataPath(_ claim: PreparedClaim, request: String) -> String {
    settings.pluginDirectory + "/dra-device-metadata/\(claim.uid)/\(request)/\(settings.driverName)-metadata.json"
  }

  var specPath: (String) -> String {
    { [settings] uid in settings.cdiDir + "/k8s.\(settings.driverName)-vf_\(uid).json" }
  }

  private func writeFiles(_ claim: PreparedClaim) throws(DRAFailure) {
    do {
      let manager = FileManager.default
      try manager.createDirectory(atPath: settings.cdiDir, withIntermediateDirectories: true)
      for request in Set(claim.devices.map(\.request)) {
        let path = metadataPath(claim, request: request)
        try manager.createDirectory(
          atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try CDI.atomicWrite(path, CDI.metadata(claim, request: request, settings: settings))
      }
      try CDI.atomicWrite(specPath(claim.uid), CDI.spec(claim, settings: settings, metadataPath: metadataPath))
    } catch let error as DRAFailure {
      throw error
    } catch {
      throw DRAFailure("cannot write the CDI spec of claim \(claim.uid): \(error)")
    }
  }

  private func removeFiles(_ claim: PreparedClaim) {
    try? FileManager.default.removeItem(atPath: specPath(claim.uid))
    try? FileManager.default.removeItem(atPath: settings.pluginDirectory + "/dra-device-metadata/\(claim.uid)")
  }
}
