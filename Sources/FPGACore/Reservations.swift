/// What mutations hold while their effects run. Every mutation reserves, in one synchronous
/// step with no suspension point, each object it will touch; a second mutation that needs one
/// of them is refused with ABORTED (nothing changed) instead of interleaving with the first.
/// Reservations live in memory only: a restart has no request under way.
struct Reservations {
  /// Something a mutation can hold.
  enum Resource: Hashable, Sendable, CustomStringConvertible {
    /// An allocation being made, released, attached, detached, ended or reconfigured.
    case allocation(String)
    /// A PF under reconfiguration.
    case pf(PCIAddress)
    /// The drain flag of a PF (drain and undrain of a PF or of its card).
    case drainFlag(PCIAddress)
    /// A registered context being moved or deleted.
    case context(String)
    /// A guest's place on an accelerator (one context per guest and accelerator).
    case guestSlot(accelerator: String, guest: String)
    /// An accelerator's sharing policy.
    case policy(String)
    /// A device's health memory (an operator's clear).
    case health(PCIAddress)

    var description: String {
      switch self {
      case .allocation(let id): "allocation \(id)"
      case .pf(let address): "PF \(address)"
      case .drainFlag(let address): "the drain flag of PF \(address)"
      case .context(let id): "context \(id)"
      case .health(let address): "the health of \(address)"
      case .guestSlot(let accelerator, let guest): "guest \(guest)'s context on \(accelerator)"
      case .policy(let id): "the sharing policy of \(id)"
      }
    }
  }

  /// Who holds a resource: a token unique to one request or operation, and what it is doing.
  struct Holder: Hashable, Sendable {
    let token: UInt64
    let what: String
  }

  private var held: [Resource: Holder] = [:]
  private var nextToken: UInt64 = 1

  /// A new holder for `what` ("attach", "reconfiguration op-…").
  mutating func holder(_ what: String) -> Holder {
    defer { nextToken += 1 }
    return Holder(token: nextToken, what: what)
  }

  func holder(of resource: Resource) -> Holder? { held[resource] }

  func isHeld(_ resource: Resource) -> Bool { held[resource] != nil }

  /// Takes every resource for `holder`, or none: ABORTED naming the first one another holds.
  mutating func take(_ resources: [Resource], for holder: Holder) throws(AgentError) {
    for resource in resources {
      if let other = held[resource], other != holder {
        throw AgentError(
          .aborted,
          "\(resource) is held by a concurrent \(other.what) right now; nothing changed: retry once it has ended")
      }
    }
    for resource in resources { held[resource] = holder }
  }

  /// Gives `resource` up when `holder` holds it.
  mutating func release(_ resource: Resource, from holder: Holder) {
    if held[resource] == holder { held[resource] = nil }
  }

  /// Gives up everything `holder` holds.
  mutating func release(_ holder: Holder) {
    held = held.filter { $0.value != holder }
  }

  /// Hands what `from` holds over to `to` (a request's reservation becomes its operation's).
  mutating func transfer(from: Holder, to: Holder) {
    for (resource, holder) in held where holder == from { held[resource] = to }
  }

  var count: Int { held.count }
}
