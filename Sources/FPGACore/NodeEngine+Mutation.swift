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
extension NodeEngine {
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
      if let outcome = try ledger.lookup(scope: scope, key: key, fingerprint: fingerprint) { return .replay(outcome) }
      guard let pending = keysInFlight[scopedKey] else { return .proceed(admission) }
      guard pending == fingerprint else {
        throw AgentError(
          .invalidArgument,
          "idempotency key \(quoted(key)) is in use by a different \(scope) request under way: use a new key for a new request"
        )
      }
      await withCheckedContinuation { continuation in keyWaiters[scopedKey, default: []].append(continuation) }
    }
  }

  /// Step 2: takes the request's key and `resources`, all or none, and raises the epoch. Must be
  /// called in the same synchronous turn as `admit` returned and the validation ran.
  func claim(_ admission: Admission, _ resources: [Reservations.Resource], as what: String) throws(AgentError) -> Claim
  {
    let holder = reservations.holder(what)
    try reservations.take(resources, for: holder)
    if let scopedKey = admission.scopedKey { keysInFlight[scopedKey] = admission.fingerprint }
    let epoch = admission.meta.orchestratorEpoch > highestEpoch ? admission.meta.orchestratorEpoch : nil
    return Claim(admission: admission, holder: holder, writes: epoch.map { [.setEpoch($0)] } ?? [], epoch: epoch)
  }

  /// Step 4: records the result (when there is one to replay), releases what the request still
  /// holds and wakes the requests waiting on its key.
  func settle(_ claim: Claim, _ record: IdempotencyRecord? = nil) {
    if let record { ledger.record(record) }
    reservations.release(claim.holder)
    guard let scopedKey = claim.admission.scopedKey else { return }
    keysInFlight[scopedKey] = nil
    for waiter in keyWaiters.removeValue(forKey: scopedKey) ?? [] { waiter.resume() }
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
