/// A long-running change (drain, reconfiguration) and its steps, as clients see it.
public struct OperationRecord: Hashable, Sendable, Codable {
  public enum State: String, Hashable, Sendable, Codable {
    case pending, running, succeeded, failed, planned
    public var isTerminal: Bool { self == .succeeded || self == .failed || self == .planned }
  }

  public struct Step: Hashable, Sendable, Codable {
    public var description: String
    public var state: State
    public var error: String?
    public var startedAt: WallTime?
    public var finishedAt: WallTime?

    public init(
      description: String, state: State, error: String? = nil, startedAt: WallTime? = nil,
      finishedAt: WallTime? = nil
    ) {
      self.description = description
      self.state = state
      self.error = error
      self.startedAt = startedAt
      self.finishedAt = finishedAt
    }
  }

  public struct Impact: Hashable, Sendable, Codable {
    public var allocationID: String
    public var vf: PCIAddress
    public var vm: String?
    public var outcome: String
    public var guestSees: String

    public init(allocationID: String, vf: PCIAddress, vm: String?, outcome: String, guestSees: String) {
      self.allocationID = allocationID
      self.vf = vf
      self.vm = vm
      self.outcome = outcome
      self.guestSees = guestSees
    }
  }

  public var id: String
  public var kind: String
  public var target: String
  public var state: State
  public var steps: [Step]
  public var impacts: [Impact]
  public var error: String?
  public var createdAt: WallTime
  public var finishedAt: WallTime?
  /// Who started it when not a node API caller ("agent", "dra claim NS/NAME"); nil otherwise.
  public var startedBy: String?

  public init(
    id: String, kind: String, target: String, state: State, steps: [Step] = [],
    impacts: [Impact] = [], error: String? = nil, createdAt: WallTime, finishedAt: WallTime? = nil
  ) {
    self.id = id
    self.kind = kind
    self.target = target
    self.state = state
    self.steps = steps
    self.impacts = impacts
    self.error = error
    self.createdAt = createdAt
    self.finishedAt = finishedAt
  }
}
