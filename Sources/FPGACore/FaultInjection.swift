/// A documented test setting: crash the agent (exit without cleanup) right before or after a
/// reconfiguration step, or make the step's adapter fail. The step is named by its kind
/// (`write-zero`, the first such step) or by its number in the operation, counted from 1 as
/// `fpgactl operation` shows the steps (`3`).
///
/// Spec: `crash-before:STEP`, `crash-after:STEP` or `fail:STEP`.
public struct FaultInjection: Sendable {
  public enum Effect: String, Sendable { case crashBefore = "crash-before", crashAfter = "crash-after", fail }

  public var effect: Effect
  public var kind: ReconfigureAction.Kind?
  public var index: Int?
  /// Ends the process at once (the runtime passes one that calls `_exit`).
  public var crash: @Sendable (String) -> Never

  public init(
    effect: Effect, kind: ReconfigureAction.Kind? = nil, index: Int? = nil, crash: @escaping @Sendable (String) -> Never
  ) {
    self.effect = effect
    self.kind = kind
    self.index = index
    self.crash = crash
  }

  /// Parses a spec; the error names the accepted forms.
  public static func parse(_ spec: String, crash: @escaping @Sendable (String) -> Never) throws(AgentError)
    -> FaultInjection
  {
    let parts = spec.split(separator: ":", maxSplits: 1).map(String.init)
    let kinds = ReconfigureAction.Kind.allCases.map(\.rawValue).joined(separator: ", ")
    guard parts.count == 2, let effect = Effect(rawValue: parts[0]) else {
      throw AgentError(
        .invalidArgument,
        "fault_injection \(quoted(spec)) is not crash-before:STEP, crash-after:STEP or fail:STEP (STEP: a step index or one of \(kinds))"
      )
    }
    if let index = Int(parts[1]), index >= 1 { return FaultInjection(effect: effect, index: index, crash: crash) }
    guard let kind = ReconfigureAction.Kind(rawValue: parts[1]) else {
      throw AgentError(
        .invalidArgument, "fault_injection step \(quoted(parts[1])) is not a step number (from 1) or one of \(kinds)")
    }
    return FaultInjection(effect: effect, kind: kind, crash: crash)
  }

  func matches(_ action: ReconfigureAction, at index: Int, in actions: [ReconfigureAction]) -> Bool {
    if let wanted = self.index { return wanted == index + 1 }
    guard let kind else { return false }
    return actions.firstIndex { $0.kind == kind } == index
  }
}
