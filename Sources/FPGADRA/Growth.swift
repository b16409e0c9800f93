public import FPGACore
import Logging

/// Grow on demand (`kubernetes.dra.grow_on_demand`): the pool also offers the VFs a PF could
/// have up to a ceiling, with the BDFs they will have (`sriov_offset`/`sriov_stride`) and the
/// attribute `<driver>/created: false`; a Prepare naming one grows the PF through the engine's
/// journaled reconfiguration, then prepares it as any VF. A PF is offered only while growing it
/// disturbs no guest without consent (see `refusal`).
public struct GrowthPolicy: Hashable, Sendable {
  /// PFs that may grow; empty: every managed PF.
  public var pfs: Set<PCIAddress>
  /// The most VFs a PF grows to; 0: its `sriov_totalvfs`.
  public var maxVFs: Int
  /// A growth creates at least this many more VFs than the PF has (fewer Prepares re-lay it).
  public var step: Int
  /// A guest whose VMM cannot pause may see its VF unplugged and plugged again.
  public var allowReplug: Bool

  public init(pfs: Set<PCIAddress> = [], maxVFs: Int = 0, step: Int = 1, allowReplug: Bool = false) {
    self.pfs = pfs
    self.maxVFs = maxVFs
    self.step = max(1, step)
    self.allowReplug = allowReplug
  }

  public func applies(to pf: PCIAddress) -> Bool { pfs.isEmpty || pfs.contains(pf) }

  /// The most VFs `pf` may be grown to.
  public func ceiling(of pf: PhysicalFunction) -> Int {
    maxVFs == 0 ? pf.totalVFs : min(maxVFs, pf.totalVFs)
  }

  /// The count a growth for VF `index` writes: that VF's index + 1, or `step` more than now.
  public func target(of pf: PhysicalFunction, forIndex index: Int) -> Int {
    min(ceiling(of: pf), max(index + 1, pf.numVFs + step))
  }
}

public enum Growth {
  /// Why `pf` may not grow now (nil: it may). `holders`: who holds each of its VFs open
  /// (`/dev/vfio/N`); `refused`: PFs whose last growth failed, with why (offered again once their
  /// layout changes).
  static func refusal(
    _ pf: PFView, in snapshot: InventorySnapshot, policy: GrowthPolicy, holders: [PCIAddress: String],
    reconfiguring: Set<PCIAddress>, refused: [PCIAddress: String]
  ) -> String? {
    let address = pf.function.address
    guard policy.applies(to: address) else { return "not in kubernetes.dra.grow_pfs" }
    guard pf.function.driver != nil else { return "no PF driver bound" }
    guard !pf.draining else { return "draining" }
    guard !reconfiguring.contains(address) else { return "being reconfigured" }
    guard pf.function.health.isUsable else { return "\(pf.function.health.state.rawValue)" }
    if let why = refused[address] { return "its last growth failed: \(why)" }
    guard policy.ceiling(of: pf.function) > pf.function.numVFs else { return "at its ceiling" }
    // Every VF in use must go through the re-layout with its guest's consent.
    let vms = Dictionary(snapshot.vms.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
    let attached = snapshot.allocations.filter { $0.pf == address && $0.attached }
    for allocation in attached where !(vms[allocation.vm ?? ""]?.vfioPause ?? false) && !policy.allowReplug {
      return
        "VM \(allocation.vm ?? "?") holds VF \(allocation.vf) and cannot pause it (kubernetes.dra.grow_allow_replug is off)"
    }
    let attachedVFs = Set(attached.map(\.vf))
    if let (vf, holder) = holders.sorted(by: { $0.key < $1.key }).first(where: { !attachedVFs.contains($0.key) }) {
      return "VF \(vf) is held by \(holder), which the agent cannot pause"
    }
    return nil
  }

  /// The VFs `pf` does not have yet, up to `ceiling`, as devices like its real ones.
  static func potentialDevices(_ pf: PFView, card: CardView, ceiling: Int, settings: DRASettings) -> [Kube.Device] {
    let domain = settings.driverName
    let function = pf.function
    let root = pf.vfs.lazy.compactMap(\.function.pcieRoot).first
    return (function.numVFs..<max(function.numVFs, ceiling)).compactMap { index -> Kube.Device? in
      guard let address = function.vfAddress(index: index) else { return nil }
      var attributes: [String: Kube.Attribute] = [
        "resource.kubernetes.io/pciBusID": .string(address.description),
        "\(domain)/kind": .string("vf"),
        "\(domain)/created": .flag(false),
        "\(domain)/pf": .string(function.address.description),
        "\(domain)/card": .string(card.card.id),
        "\(domain)/vfIndex": .int(index),
        "\(domain)/vendorID": .string(SlicePublisher.hex(function.vendorID)),
        "\(domain)/deviceID": .string(SlicePublisher.hex(function.vfDeviceID)),
        "\(domain)/numaNode": .int(function.numaNode),
      ]
      if let root { attributes["resource.kubernetes.io/pcieRoot"] = .string(root) }
      return Kube.Device(name: DeviceNames.name(of: address), attributes: attributes, taints: nil)
    }
  }
}

extension DRADriver {
  /// Grows `pf` so that VF `index` exists, sharing the growth under way for the PF when it
  /// reaches that far. Throws the reason when the PF may not or could not grow (the PF is then
  /// left as it was, and not offered again until its layout changes).
  func grow(_ pf: PCIAddress, toHold index: Int, for claim: ClaimReference) async throws(DRAFailure) {
    while true {
      if let running = growths[pf] {
        growthWaiters += 1
        let outcome = await running.task.value
        growthWaiters -= 1
        if case .failure(let error) = outcome, running.target > index { throw error }
        continue  // it ended: look again (it may not have reached this index)
      }
      let snapshot: InventorySnapshot
      do {
        snapshot = try await engine.snapshot()
      } catch {
        throw DRAFailure(error.message)
      }
      guard let policy = settings.growth else {
        throw DRAFailure("VF index \(index) of PF \(pf) does not exist and kubernetes.dra.grow_on_demand is off")
      }
      guard let card = snapshot.cards.first(where: { $0.pfs.contains { $0.function.address == pf } }),
        let view = card.pfs.first(where: { $0.function.address == pf })
      else { throw DRAFailure("PF \(pf) is not managed by this node") }
      if view.function.numVFs > index { return }
      guard index < policy.ceiling(of: view.function) else {
        throw DRAFailure(
          "VF index \(index) is beyond PF \(pf)'s growth ceiling (\(policy.ceiling(of: view.function)) VFs)")
      }
      let holders = await engine.holders(of: pf)
      if let why = Growth.refusal(
        view, in: snapshot, policy: policy, holders: holders, reconfiguring: await engine.reconfiguringPFs,
        refused: refusals(snapshot))
      {
        growthFigures.refused += 1
        throw DRAFailure("PF \(pf) cannot grow now: \(why)")
      }
      let target = policy.target(of: view.function, forIndex: index)
      // The growth leaves `growths` itself before it answers, so a waiter woken by its end
      // never finds it there again.
      let task = Task {
        let outcome = await self.runGrowth(pf, from: view.function.numVFs, to: target, claim: claim, policy: policy)
        self.growths[pf] = nil
        return outcome
      }
      growths[pf] = (target, task)
      if case .failure(let error) = await task.value { throw error }
    }
  }

  /// One growth: a reconfiguration started by DRA, awaited to its end.
  private func runGrowth(
    _ pf: PCIAddress, from: Int, to target: Int, claim: ClaimReference, policy: GrowthPolicy
  ) async -> Result<Void, DRAFailure> {
    let started = ContinuousClock.now
    let request = ReconfigureRequest(
      meta: RequestMeta(idempotencyKey: "dra-grow-\(pf)-\(from)-\(target)-\(claim.uid)"), pf: pf, count: target,
      strategy: policy.allowReplug ? .auto : .pause, startedBy: "dra claim \(claim.namespace)/\(claim.name)")
    logger.notice(
      "growing a PF for a claim",
      metadata: ["fpga.pf": "\(pf)", "fpga.vfs": "\(from)->\(target)", "fpga.claim": "\(claim.description)"])
    let record: OperationRecord
    do {
      let operation = try await engine.reconfigure(request)
      await engine.waitForOperation(operation.id)
      record = try await engine.operation(operation.id)
    } catch {
      return await failedGrowth(pf, "the reconfiguration was refused: \(error.message)")
    }
    guard record.state == .succeeded else {
      return await failedGrowth(
        pf, "operation \(record.id) \(record.state.rawValue): \(record.error ?? "unknown error")")
    }
    growthFigures.grown += 1
    growthFigures.seconds += (ContinuousClock.now - started).seconds
    await rebindPrepared(on: pf)
    await growthEnded?()
    return .success(())
  }

  private func failedGrowth(_ pf: PCIAddress, _ why: String) async -> Result<Void, DRAFailure> {
    growthFigures.failed += 1
    let numVFs = (try? await engine.snapshot())?.cards.flatMap(\.pfs).first { $0.function.address == pf }?.function
      .numVFs
    failedGrowths[pf] = (why, numVFs ?? -1)
    logger.warning("a PF could not grow for a claim", metadata: ["fpga.pf": "\(pf)", "fpga.error": "\(why)"])
    await growthEnded?()  // the pool stops offering what could not be made
    return .failure(DRAFailure("PF \(pf) could not grow: \(why)"))
  }

  /// After a re-layout the PF's VFs are new functions: the prepared claims' VFs on it are bound
  /// to vfio-pci again and their specs follow their new groups.
  private func rebindPrepared(on pf: PCIAddress) async {
    guard let snapshot = try? await engine.snapshot() else { return }
    let onPF = Set(snapshot.allocations.filter { $0.pf == pf }.map(\.id))
    for claim in preparedClaims where claim.devices.contains(where: { onPF.contains($0.allocationID) }) {
      for device in claim.devices where onPF.contains(device.allocationID) {
        guard let vf = PCIAddress(device.vf) else { continue }
        _ = try? await engine.prepareForPassthrough(vf: vf)
      }
      await refreshSpec(claim.uid)
    }
  }
}

/// What growths did since the start (for /metrics and the link).
public struct GrowthFigures: Hashable, Sendable {
  public var grown = 0
  public var failed = 0
  /// Prepares refused because their PF could not grow now (holders, ceiling, policy).
  public var refused = 0
  /// Time spent in successful growths.
  public var seconds = 0.0
}

extension DRADriver {
  public var growth: GrowthFigures { growthFigures }

  /// Called after every growth ends (the publisher syncs the pool).
  public func observeGrowths(_ ended: @escaping @Sendable () async -> Void) { growthEnded = ended }

  /// PFs whose last growth failed and whose layout has not changed since, with why.
  func refusals(_ snapshot: InventorySnapshot) -> [PCIAddress: String] {
    var refused: [PCIAddress: String] = [:]
    for pf in snapshot.cards.flatMap(\.pfs) {
      guard let failed = failedGrowths[pf.function.address] else { continue }
      if failed.numVFs == pf.function.numVFs { refused[pf.function.address] = failed.why }
    }
    return refused
  }

  /// The PF and index `vf` would have when it is not there yet but a PF may grow to it.
  func potentialVF(_ vf: PCIAddress) async -> (PCIAddress, Int)? {
    guard let policy = settings.growth, let snapshot = try? await engine.snapshot() else { return nil }
    for pf in snapshot.cards.flatMap(\.pfs) where policy.applies(to: pf.function.address) {
      if pf.vfs.contains(where: { $0.function.address == vf }) { return nil }
      let function = pf.function
      for index in function.numVFs..<max(function.numVFs, policy.ceiling(of: function))
      where function.vfAddress(index: index) == vf {
        return (function.address, index)
      }
    }
    return nil
  }

  /// The PFs the pool offers growth on now, with their ceilings.
  public func growablePFs(_ snapshot: InventorySnapshot) async -> [PCIAddress: Int] {
    guard let policy = settings.growth else { return [:] }
    let reconfiguring = await engine.reconfiguringPFs
    let refused = refusals(snapshot)
    var growable: [PCIAddress: Int] = [:]
    for pf in snapshot.cards.flatMap(\.pfs) where policy.applies(to: pf.function.address) {
      let holders = await engine.holders(of: pf.function.address)
      if Growth.refusal(
        pf, in: snapshot, policy: policy, holders: holders, reconfiguring: reconfiguring, refused: refused) == nil
      {
        growable[pf.function.address] = policy.ceiling(of: pf.function)
      }
    }
    return growable
  }
}

extension Duration {
  var seconds: Double {
    Double(components.seconds) + Double(components.attoseconds) / 1e18
  }
}
