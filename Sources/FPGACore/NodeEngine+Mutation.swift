/// The one shape of every mutation. The engine is an actor: it is re-entered at every `await`,
/// so a mutation never relies on being alone. Each one
///
/// 1. is *admitted* (`admit`): refused when its orchestrator epoch is stale, answered from the
///    ledger when its idempotency key already has a result, and made to wait while a request
///    with the same key and the same content is under way (then answered as if it came after
///    it: the first one's result, or its own attempt when the first one failed);
/// 2. *reserves* (`claim`), in the same synchronous turn as its validation, every object it will
///    touch (its key, allocations, PFs, drain flags, contexts, guest slots, policies): another
///    mutation that needs one of them is refused with ABORTED and changes nothing. A higher
///    epoch is written with the request's first commit (`commit(claim, …)`) and raised in
///    memory once that commit is durable: a request refused before it changes no epoch;
/// 3. carries out its *effects* (store, sysfs, hypervisor, accelerator), then *applies and
///    publishes* them synchronously, or undoes what it did and leaves no trace;
/// 4. *settles* (`settle`): records its result under its key, then gives its reservations up
///    and wakes the requests waiting on its key.
///
/// `mutate` runs these steps in this order for every mutating call, which gives only what
/// differs: how a replayed outcome answers, what it checks and reserves (`Plan`), and its
/// effects (`Effects`): what to write, how to undo them when the write fails, and what to
/// apply and publish **once the write is durable**.
extension NodeEngine {
  /// What a mutation's checks decided, in the turn its admission returned.
  enum Plan<Context, Answer> {
    /// Nothing to change: answered at once, nothing recorded.
    case answer(Answer)
    /// Reserve `resources` (named `what` in a refusal) and carry out the effects with `context`.
    case proceed(Context, reserving: [Reservations.Resource], as: String)
  }

  /// A mutation's effects, carried out, waiting to be made durable.
  struct Effects<Answer> {
    /// What the store must have (the idempotency record and the raised epoch are added).
    var writes: [StoreChange]
    /// What a retry with the same key replays, written with `writes` (its revision may be an
    /// estimate: `apply` gives the final one to the ledger). Nil: the outcome is known only
    /// after `apply`, and recorded after it.
    var outcome: IdempotentOutcome?
    /// Takes back what the effects did when the write fails.
    var undo: () async -> Void = {}
    /// Applied (and published) even when the write fails, because the world changed whatever
    /// the store says (a device already out of its guest); the write's error is still thrown.
    var applyWhenUnwritten = false
    /// Applies the change to memory and publishes it, once durable; returns the answer and the
    /// outcome to keep under the key (nil: `outcome`).
    var apply: () async -> (Answer, IdempotentOutcome?)
  }

  /// admit → replay → checks and claim → effects → commit with the idempotency record →
  /// apply and publish → ledger → settle.
  func mutate<Context, Answer>(
    _ scope: String, _ meta: RequestMeta, fingerprint: String,
    replay: (IdempotentOutcome) async throws(AgentError) -> Answer?,
    plan: () throws(AgentError) -> Plan<Context, Answer>,
    effects: (Context, Claim) async throws(AgentError) -> Effects<Answer>
  ) async throws(AgentError) -> Answer {
    let admission: Admission
    switch try await admit(scope, meta, fingerprint: fingerprint) {
    case .replay(let outcome):
      guard let answer = try await replay(outcome) else {
        throw AgentError(.internal, "idempotency record of another kind for \(scope)")
      }
      return answer
    case .proceed(let admitted):
      admission = admitted
    }
    // Checks and reservations in the same turn as the admission: nothing can slip in between.
    let (context, resources, what): (Context, [Reservations.Resource], String)
    switch try plan() {
    case .answer(let answer): return answer
    case .proceed(let planned, let reserving, let name): (context, resources, what) = (planned, reserving, name)
    }
    let claim = try self.claim(admission, resources, as: what)
    defer { settle(claim) }
    let done = try await effects(context, claim)
    let record = done.outcome.flatMap { claim.record($0) }
    do {
      try await commit(claim, done.writes + (record.map { [.putIdempotency($0)] } ?? []))
    } catch {
      if done.applyWhenUnwritten { _ = await done.apply() } else { await done.undo() }
      throw error
    }
    let (answer, final) = await done.apply()
    if let outcome = final ?? done.outcome, let kept = claim.record(outcome) {
      if record == nil {
        // Known only now: recorded on its own; a failure leaves a retry to find the result.
        try? await store.commit([.putIdempotency(kept)])
      }
      gate.ledger.record(kept)
    }
    return answer
  }

  /// A request let in: not stale, nothing to replay, its key free.
  struct Admission: Sendable {
    let scope: String
    let meta: RequestMeta
    let fingerprint: String

    var scopedKey: String? { meta.idempotencyKey.map { scope + "\u{0}" + $0 } }

    /// The ledger record of this request's result, when it carries a key.
    func record(_ outcome: IdempotentOutcome) -> IdempotencyRecord? {
      meta.idempotencyKey.map { IdempotencyRecord(scope: scope, key: $0, fingerprint: fingerprint, outcome: outcome) }
    }
  }

  enum Admitted: Sendable {
    /// The key already has this result.
    case replay(IdempotentOutcome)
    case proceed(Admission)
  }

  /// What an admitted request holds while its effects run.
  struct Claim: Sendable {
    let admission: Admission
    let holder: Reservations.Holder
    /// What the request's first commit must carry besides its own changes (the raised epoch).
    let writes: [StoreChange]
    /// The epoch this request raises the node to once its first commit is durable.
    let epoch: UInt64?

    func record(_ outcome: IdempotentOutcome) -> IdempotencyRecord? { admission.record(outcome) }
  }

  /// Step 1: fencing and idempotency. Waits while a request with the same key is under way.
  func admit(_ scope: String, _ meta: RequestMeta, fingerprint: String) async throws(AgentError) -> Admitted {
    while true {
      guard !stopping else {
        throw AgentError(.unavailable, "the agent is shutting down; retry once it has restarted")
      }
      try checkEpoch(meta)
      let admission = Admission(scope: scope, meta: meta, fingerprint: fingerprint)
      guard let key = meta.idempotencyKey, let scopedKey = admission.scopedKey else { return .proceed(admission) }
      if let outcome = try gate.ledger.lookup(scope: scope, key: key, fingerprint: fingerprint) {
        return .replay(outcome)
      }
      guard let pending = gate.keysInFlight[scopedKey] else { return .proceed(admission) }
      guard pending == fingerprint else {
        throw AgentError(
          .invalidArgument,
          "idempotency key \(quoted(key)) is in use by a different \(scope) request under way: use a new key for a new request"
        )
      }
      await withCheckedContinuation { continuation in gate.keyWaiters[scopedKey, default: []].append(continuation) }
    }
  }

  /// Step 2: takes the request's key and `resources`, all or none, and raises the epoch. Must be
  /// called in the same synchronous turn as `admit` returned and the validation ran.
  func claim(_ admission: Admission, _ resources: [Reservations.Resource], as what: String) throws(AgentError) -> Claim
  {
    let holder = gate.reservations.holder(what)
    try gate.reservations.take(resources, for: holder)
    if let scopedKey = admission.scopedKey { gate.keysInFlight[scopedKey] = admission.fingerprint }
    let epoch = admission.meta.orchestratorEpoch > highestEpoch ? admission.meta.orchestratorEpoch : nil
    return Claim(admission: admission, holder: holder, writes: epoch.map { [.setEpoch($0)] } ?? [], epoch: epoch)
  }

  /// Step 4: releases what the request still holds and wakes the requests waiting on its key.
  func settle(_ claim: Claim) {
    gate.reservations.release(claim.holder)
    guard let scopedKey = claim.admission.scopedKey else { return }
    gate.keysInFlight[scopedKey] = nil
    for waiter in gate.keyWaiters.removeValue(forKey: scopedKey) ?? [] { waiter.resume() }
  }

  /// Refuses requests from an orchestrator epoch older than the highest seen. Raising it is
  /// `claim`'s part: a refused request leaves the epoch as it was.
  func checkEpoch(_ meta: RequestMeta) throws(AgentError) {
    guard meta.orchestratorEpoch > 0, meta.orchestratorEpoch < highestEpoch else { return }
    throw AgentError(
      .failedPrecondition,
      "orchestrator epoch \(meta.orchestratorEpoch) is stale: this node has seen epoch \(highestEpoch); a newer orchestrator leader is in charge"
    )
  }

  /// Commits `changes` with what the claim carries (the epoch it raises), then raises the
  /// epoch in memory: from here on, older epochs are refused.
  func commit(_ claim: Claim, _ changes: [StoreChange]) async throws(AgentError) {
    let all = claim.writes + changes
    guard !all.isEmpty else { return }
    try await store.commit(all)
    if let epoch = claim.epoch { highestEpoch = max(highestEpoch, epoch) }
  }
}

/// The mutations' shared state: what the requests under way hold, their keys, who waits on them,
/// and the results recorded under keys.
struct MutationGate: Sendable {
  /// What the mutations under way hold.
  var reservations = Reservations()
  /// Idempotency keys (scope NUL key) of requests under way, with their requests' fingerprints.
  var keysInFlight: [String: String] = [:]
  /// Requests waiting for a request with their key to end.
  var keyWaiters: [String: [CheckedContinuation<Void, Never>]] = [:]
  /// The results of finished requests, by key.
  var ledger = IdempotencyLedger<IdempotentOutcome>()
  /// VFs chosen by allocations whose records are not durable yet (VF → allocation id): no other
  /// request chooses them, and nothing about them is published until the store has them.
  var allocating: [PCIAddress: String] = [:]
}
