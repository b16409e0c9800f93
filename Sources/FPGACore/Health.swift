/// What the platform reads of a device's health at one scan: PCIe AER counters, the link's
/// trained speed and width against their maxima, whether config space answers, the bound
/// driver against the one expected. A nil field was not available (no AER capability, an
/// attribute the kernel does not offer): it counts as neither good nor bad.
public struct HealthReadings: Hashable, Sendable, Codable {
  /// `TOTAL_ERR_COR` of `aer_dev_correctable`.
  public var correctableErrors: UInt64?
  /// `TOTAL_ERR_NONFATAL` of `aer_dev_nonfatal`.
  public var nonfatalErrors: UInt64?
  /// `TOTAL_ERR_FATAL` of `aer_dev_fatal`.
  public var fatalErrors: UInt64?
  /// `current_link_speed` / `max_link_speed`, e.g. "8.0 GT/s PCIe".
  public var linkSpeed: String?
  public var maxLinkSpeed: String?
  /// `current_link_width` / `max_link_width`.
  public var linkWidth: Int?
  public var maxLinkWidth: Int?
  /// Config space read back as all ones: the device no longer answers (fell off the bus).
  public var configAllOnes = false
  /// The driver the agent expects bound (vfio-pci for a VF it bound; the PF's when first seen),
  /// and the one bound now.
  public var expectedDriver: String?
  public var driver: String?
  /// Set when the VF is recorded as attached to this VM but no process holds its VFIO group.
  public var unheldBy: String? = nil

  public init(
    correctableErrors: UInt64? = nil, nonfatalErrors: UInt64? = nil, fatalErrors: UInt64? = nil,
    linkSpeed: String? = nil, maxLinkSpeed: String? = nil, linkWidth: Int? = nil, maxLinkWidth: Int? = nil,
    configAllOnes: Bool = false, expectedDriver: String? = nil, driver: String? = nil, unheldBy: String? = nil
  ) {
    self.unheldBy = unheldBy
    self.correctableErrors = correctableErrors
    self.nonfatalErrors = nonfatalErrors
    self.fatalErrors = fatalErrors
    self.linkSpeed = linkSpeed
    self.maxLinkSpeed = maxLinkSpeed
    self.linkWidth = linkWidth
    self.maxLinkWidth = maxLinkWidth
    self.configAllOnes = configAllOnes
    self.expectedDriver = expectedDriver
    self.driver = driver
  }
}

/// A device's health: the worst of its reasons, each with the figure behind it and since when.
public struct DeviceHealth: Hashable, Sendable, Codable {
  public enum State: String, Hashable, Sendable, Codable, Comparable, CaseIterable {
    /// Nothing wrong.
    case healthy
    /// Works, but something is off (correctable errors at a high rate, a degraded link, a
    /// driver other than expected): still allocated, watched.
    case degraded
    /// Must not be used: uncorrectable errors, config space gone, no IOMMU group.
    case unhealthy
    /// No longer on the bus.
    case gone

    private var rank: Int { Self.allCases.firstIndex(of: self)! }
    public static func < (lhs: State, rhs: State) -> Bool { lhs.rank < rhs.rank }
  }

  public struct Reason: Hashable, Sendable, Codable {
    /// `aer-fatal`, `aer-nonfatal`, `aer-correctable`, `link-speed`, `link-width`,
    /// `config-unreadable`, `driver`, `no-iommu-group`, `unreadable`, `gone`, `parent`.
    public var kind: String
    public var state: State
    /// What was seen, with the figure (e.g. "12 fatal errors (was 0)").
    public var detail: String
    public var since: WallTime

    public init(kind: String, state: State, detail: String, since: WallTime) {
      self.kind = kind
      self.state = state
      self.detail = detail
      self.since = since
    }
  }

  public var state: State
  public var reasons: [Reason]
  /// When the device entered this state.
  public var since: WallTime

  public init(state: State = .healthy, reasons: [Reason] = [], since: WallTime = WallTime(seconds: 0)) {
    self.state = state
    self.reasons = reasons
    self.since = since
  }

  /// May a new allocation take it?
  public var isUsable: Bool { state < .unhealthy }

  /// "unhealthy since …: aer-fatal: 1 fatal error; …".
  public var summary: String {
    reasons.map { "\($0.kind): \($0.detail)" }.joined(separator: "; ")
  }
}

/// Thresholds of the health assessment (`health.*` in the configuration).
public struct HealthPolicy: Hashable, Sendable {
  /// Correctable AER errors per minute above which a device is degraded.
  public var correctableErrorsPerMinute: Double = 60
  /// Drain a PF (no new allocations on it) when it reports a fatal error.
  public var drainOnFatal = false

  public init(correctableErrorsPerMinute: Double = 60, drainOnFatal: Bool = false) {
    self.correctableErrorsPerMinute = correctableErrorsPerMinute
    self.drainOnFatal = drainOnFatal
  }
}

/// Uncorrectable errors a device had logged before the agent first saw it: not counted against
/// it as new errors (it may have been reset or repaired since), but not forgotten either: the
/// device is degraded with the figures until an operator clears them or it is re-enumerated.
public struct HealthHistory: Hashable, Sendable, Codable {
  public var fatal: UInt64
  public var nonfatal: UInt64
  /// When the agent first saw the device with them.
  public var seenAt: WallTime

  public init(fatal: UInt64, nonfatal: UInt64, seenAt: WallTime) {
    self.fatal = fatal
    self.nonfatal = nonfatal
    self.seenAt = seenAt
  }
}

/// What the agent remembers of one device's health, kept in the state store so a judgement
/// survives a restart: the counters errors are counted from (`baseline`), the last readings and
/// their time (rates; a counter lower than its last reading means the device was re-enumerated
/// and is judged afresh), since when each reason holds, the judgement itself, and the errors it
/// had before the agent first saw it.
public struct HealthMemory: Hashable, Sendable, Codable {
  public var address: PCIAddress
  public var baseline: HealthReadings
  public var last: HealthReadings
  public var lastAt: WallTime
  public var since: [String: WallTime] = [:]
  public var health = DeviceHealth()
  public var history: HealthHistory?
  /// Set by an operator's clear: who cleared it, why and when (kept for the record).
  public var cleared: String?

  public init(address: PCIAddress, baseline: HealthReadings, last: HealthReadings, lastAt: WallTime) {
    self.address = address
    self.baseline = baseline
    self.last = last
    self.lastAt = lastAt
  }

  /// The part worth writing: the readings' time changes at every scan and is left out.
  var durable: HealthMemory {
    var copy = self
    copy.lastAt = WallTime(seconds: 0)
    return copy
  }

  /// Some uncorrectable counter is below its last reading: AER counters only reset when the
  /// device is enumerated again (a reboot, a remove and rescan, a VF re-created).
  func isReset(by readings: HealthReadings) -> Bool {
    func lower(_ now: UInt64?, _ before: UInt64?) -> Bool {
      guard let now, let before else { return false }
      return now < before
    }
    return lower(readings.fatalErrors, last.fatalErrors) || lower(readings.nonfatalErrors, last.nonfatalErrors)
      || lower(readings.correctableErrors, last.correctableErrors)
  }
}

/// Turns readings into health, remembering what it needs across scans and, through the state
/// store, across restarts (`HealthMemory`): errors are counted from the counters at the first
/// scan; a device first seen with uncorrectable errors already logged is degraded with their
/// figures ("aer-history") until cleared; a device whose counters went down was re-enumerated
/// and is judged afresh.
public struct HealthTracker: Sendable {
  public var policy: HealthPolicy
  private var memory: [PCIAddress: HealthMemory] = [:]
  /// What the store holds (as `durable`), to write only what changed.
  private var saved: [PCIAddress: HealthMemory] = [:]

  public init(policy: HealthPolicy = HealthPolicy()) { self.policy = policy }

  /// Takes back what the store kept (at start-up, before the first scan).
  public mutating func restore(_ memories: [HealthMemory]) {
    for entry in memories {
      memory[entry.address] = entry
      saved[entry.address] = entry.durable
    }
  }

  /// What the store must learn: memories that changed since the last save, and devices forgotten.
  public func unsaved() -> (put: [HealthMemory], delete: [PCIAddress]) {
    let put = memory.values.filter { saved[$0.address] != $0.durable }.sorted { $0.address < $1.address }
    let delete = saved.keys.filter { memory[$0] == nil }.sorted()
    return (put, delete)
  }

  /// The store has `put` and no longer has `delete`.
  public mutating func markSaved(put: [HealthMemory], delete: [PCIAddress]) {
    for entry in put { saved[entry.address] = entry.durable }
    for address in delete where memory[address] == nil { saved[address] = nil }
  }

  /// The remembered state of a device (nil: never assessed, or forgotten).
  public func memory(of address: PCIAddress) -> HealthMemory? { memory[address] }

  /// An operator's clear: the counters read last become the baseline, the errors logged before
  /// the agent saw the device are accepted, and every reason starts afresh at the next
  /// assessment. Returns false when the device has no memory (never assessed).
  public mutating func clear(_ address: PCIAddress, note: String) -> Bool {
    guard var entry = memory[address] else { return false }
    entry.baseline = entry.last
    entry.history = nil
    entry.since = [:]
    entry.health = DeviceHealth(state: .healthy, reasons: [], since: entry.lastAt)
    entry.cleared = note
    memory[address] = entry
    return true
  }

  /// The device's health from this scan's `readings` (nil: the platform reads no health, as the
  /// simulated node) and the facts the inventory already knows.
  /// `driverChanges`: whether a driver other than the one first seen is a finding (PFs; a VF's
  /// expected driver is its `driver_override`, and a VF re-created by a VF count change starts
  /// with none).
  public mutating func assess(
    _ address: PCIAddress, readings: HealthReadings?, noIOMMUGroup: Bool = false, unreadable: Bool = false,
    driverChanges: Bool = true, now: WallTime
  ) -> DeviceHealth {
    var found: [(kind: String, state: State, detail: String)] = []
    typealias State = DeviceHealth.State
    if let readings, let known = memory[address], known.isReset(by: readings) {
      memory[address] = nil  // re-enumerated: a new device as far as its counters go
    }
    let known = memory[address] != nil
    var entry =
      memory[address]
      ?? {
        var fresh = HealthMemory(
          address: address, baseline: readings ?? HealthReadings(), last: readings ?? HealthReadings(), lastAt: now)
        let fatal = readings?.fatalErrors ?? 0
        let nonfatal = readings?.nonfatalErrors ?? 0
        if fatal > 0 || nonfatal > 0 { fresh.history = HealthHistory(fatal: fatal, nonfatal: nonfatal, seenAt: now) }
        return fresh
      }()
    if unreadable {
      found.append(("unreadable", .unhealthy, "its sysfs attributes cannot be read"))
    } else if noIOMMUGroup {
      found.append(("no-iommu-group", .unhealthy, "no IOMMU group: it cannot be passed through"))
    }
    if let history = entry.history {
      let figures = [
        history.fatal > 0 ? "\(history.fatal) uncorrectable fatal" : nil,
        history.nonfatal > 0 ? "\(history.nonfatal) uncorrectable non-fatal" : nil,
      ].compactMap { $0 }.joined(separator: " and ")
      found.append(
        (
          "aer-history", .degraded,
          "\(figures) error\(history.fatal + history.nonfatal == 1 ? "" : "s") (AER) logged before the agent first saw it at \(history.seenAt); `fpgactl health clear` accepts them"
        ))
    }
    if let readings {
      if readings.configAllOnes {
        found.append(("config-unreadable", .unhealthy, "config space reads all ones: the device does not answer"))
      }
      if let fatal = readings.fatalErrors, fatal > (entry.baseline.fatalErrors ?? 0) {
        let count = fatal - (entry.baseline.fatalErrors ?? 0)
        found.append(("aer-fatal", .unhealthy, "\(count) uncorrectable fatal error\(count == 1 ? "" : "s") (AER)"))
      }
      if let nonfatal = readings.nonfatalErrors, nonfatal > (entry.baseline.nonfatalErrors ?? 0) {
        let count = nonfatal - (entry.baseline.nonfatalErrors ?? 0)
        found.append(
          ("aer-nonfatal", .unhealthy, "\(count) uncorrectable non-fatal error\(count == 1 ? "" : "s") (AER)"))
      }
      if let correctable = readings.correctableErrors, let previous = entry.last.correctableErrors,
        correctable > previous
      {
        let seconds = max(1, Double(now.seconds.subtractingReportingOverflow(entry.lastAt.seconds).partialValue))
        let perMinute = Double(correctable - previous) * 60 / seconds
        if perMinute > policy.correctableErrorsPerMinute {
          found.append(
            (
              "aer-correctable", .degraded,
              "\(correctable - previous) correctable errors in \(Int(seconds)) s (\(Int(perMinute))/min, threshold \(Int(policy.correctableErrorsPerMinute))/min)"
            ))
        }
      }
      // 255 is the kernel's "unknown" maximum width (a link capabilities register reading 0).
      if let width = readings.linkWidth, let maxWidth = readings.maxLinkWidth, width > 0, maxWidth < 255,
        width < maxWidth
      {
        found.append(("link-width", .degraded, "link trained at x\(width) of x\(maxWidth)"))
      }
      if let speed = readings.linkSpeed, let maxSpeed = readings.maxLinkSpeed, let current = Self.gigatransfers(speed),
        let most = Self.gigatransfers(maxSpeed), current < most
      {
        found.append(("link-speed", .degraded, "link trained at \(speed) of \(maxSpeed)"))
      }
      if let expected = readings.expectedDriver, readings.driver != expected {
        found.append(("driver", .degraded, "bound to \(readings.driver ?? "no driver"), expected \(expected)"))
      } else if driverChanges, readings.expectedDriver == nil, let first = entry.baseline.driver,
        readings.driver != first
      {
        found.append(
          ("driver", .degraded, "bound to \(readings.driver ?? "no driver"), was \(first) when the agent found it"))
      }
      if let vm = readings.unheldBy {
        found.append(
          ("vfio-holder", .degraded, "recorded as attached to \(vm), but no process holds its VFIO group open"))
      }
      entry.last = readings
      entry.lastAt = now
    }
    var since: [String: WallTime] = [:]
    let reasons = found.map { item -> DeviceHealth.Reason in
      let start = entry.since[item.kind] ?? now
      since[item.kind] = start
      return DeviceHealth.Reason(kind: item.kind, state: item.state, detail: item.detail, since: start)
    }
    entry.since = since
    let state = reasons.map(\.state).max() ?? .healthy
    let health = DeviceHealth(
      state: state, reasons: reasons,
      since: state == entry.health.state && known ? entry.health.since : now)
    entry.health = health
    memory[address] = entry
    return health
  }

  /// A device that left the bus: forgotten, so a device that comes back starts afresh.
  public mutating func forget(_ address: PCIAddress) { memory[address] = nil }

  /// Every device forgotten (the host rebooted: each was enumerated again).
  public mutating func forgetAll() { memory = [:] }

  /// Devices not in `present` forgotten (the first scan after a start: what left while the agent
  /// was down comes back as a new device).
  public mutating func forget(allBut present: Set<PCIAddress>) {
    memory = memory.filter { present.contains($0.key) }
  }

  /// "8.0 GT/s PCIe" → 8.0.
  static func gigatransfers(_ text: String) -> Double? {
    guard let number = text.split(separator: " ").first else { return nil }
    return Double(number)
  }
}
