public import FPGACore
import Foundation
public import GRDB
public import Synchronization

/// The agent's durable state in one SQLite file (`STATE_DIR/state.sqlite`, WAL journal):
/// every `commit` is one transaction. The schema is versioned by GRDB's migrator; a file that
/// cannot be read, is corrupt, or was written by a newer agent stops the agent with a message
/// saying what to do, and is never replaced.
public final class SQLiteStateStore: StateStore {
  public static let fileName = "state.sqlite"

  /// How hard a commit waits for the disk.
  public enum Durability: String, Sendable, CaseIterable {
    /// WAL with synchronous=NORMAL: a commit survives the agent's crash (SIGKILL); the last
    /// commits may be lost if the machine loses power (the file stays consistent).
    case process
    /// synchronous=FULL: every commit is flushed to the disk (fsync) before it is answered.
    case power
  }

  /// Kept idempotency keys (the in-memory ledger keeps as many).
  public static let idempotencyCapacity = 65_536
  /// Finished operations kept.
  public static let operationHistory = 1024

  public let path: String
  private let queue: DatabaseQueue
  private let encoder = JSONEncoder()
  private let decoder = JSONDecoder()

  /// Opens (or creates) the store at `path` and migrates it to the current schema.
  /// `maxPageCount` caps the file's size (tests use it to meet a full disk).
  public init(path: String, durability: Durability = .process, maxPageCount: Int? = nil) throws(AgentError) {
    self.path = path
    var configuration = Configuration()
    configuration.journalMode = .wal
    configuration.busyMode = .timeout(5)
    configuration.label = "fpga-agent state"
    configuration.prepareDatabase { db in
      try db.execute(sql: "PRAGMA synchronous = \(durability == .power ? "FULL" : "NORMAL")")
      if let maxPageCount { try db.execute(sql: "PRAGMA max_page_count = \(maxPageCount)") }
    }
    do {
      queue = try DatabaseQueue(path: path, configuration: configuration)
      try queue.read { db in
        let result = try String.fetchOne(db, sql: "PRAGMA quick_check") ?? "?"
        guard result == "ok" else {
          throw DatabaseError(resultCode: .SQLITE_CORRUPT, message: "quick_check: \(result)")
        }
      }
      let migrator = Self.migrator()
      let applied = try queue.read { db in try migrator.appliedIdentifiers(db) }
      let known = Set(migrator.migrations)
      if let unknown = applied.subtracting(known).sorted().first {
        throw AgentError(
          .failedPrecondition,
          "state store \(path) has schema migration \(quoted(unknown)), which this agent does not know: "
            + "it was written by a newer fpga-agent; run that version, or move the file aside to start empty")
      }
      try migrator.migrate(queue)
    } catch let error as AgentError {
      throw error
    } catch {
      throw Self.openError(error, path: path)
    }
  }

  /// The schema, one migration per version. Never edit a shipped migration: add one.
  public static func migrator(upTo last: String? = nil) -> DatabaseMigrator {
    var migrator = DatabaseMigrator()
    migrator.registerMigration("v1") { db in
      try db.execute(
        sql: """
          CREATE TABLE allocations (
            id TEXT PRIMARY KEY NOT NULL,
            vf TEXT NOT NULL,
            pf TEXT NOT NULL,
            owner TEXT NOT NULL,
            vm TEXT,
            idempotency_key TEXT,
            created_s INTEGER NOT NULL,
            created_ns INTEGER NOT NULL,
            numa_node INTEGER NOT NULL,
            iommu_group INTEGER NOT NULL,
            attached INTEGER NOT NULL,
            device_id TEXT,
            root_port TEXT,
            detaching INTEGER NOT NULL
          ) WITHOUT ROWID;
          CREATE TABLE idempotency (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            outcome TEXT NOT NULL,
            UNIQUE (scope, key)
          );
          CREATE TABLE settings (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
          """)
    }
    if last == "v1" { return migrator }
    migrator.registerMigration("v2") { db in
      try db.execute(
        sql: """
          CREATE TABLE operations (
            id TEXT PRIMARY KEY NOT NULL,
            kind TEXT NOT NULL,
            target TEXT NOT NULL,
            state TEXT NOT NULL,
            unfinished INTEGER NOT NULL,
            created INTEGER NOT NULL,
            body TEXT NOT NULL
          );
          CREATE INDEX operations_created ON operations (created);
          CREATE TABLE drains (target TEXT PRIMARY KEY NOT NULL);
          CREATE TABLE contexts (id TEXT PRIMARY KEY NOT NULL, body TEXT NOT NULL);
          """)
    }
    if last == "v2" { return migrator }
    migrator.registerMigration("v3") { db in
      try db.execute(sql: "CREATE TABLE policies (accelerator_id TEXT PRIMARY KEY NOT NULL, body TEXT NOT NULL)")
    }
    if last == "v3" { return migrator }
    migrator.registerMigration("v4") { db in
      try db.execute(
        sql: "CREATE TABLE records (kind TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, key))"
      )
    }
    if last == "v4" { return migrator }
    migrator.registerMigration("v5") { db in
      // Device health memories and PF layouts, one JSON body per device (HealthMemory, PFLayout).
      try db.execute(sql: "CREATE TABLE device_health (address TEXT PRIMARY KEY NOT NULL, body TEXT NOT NULL)")
      try db.execute(sql: "CREATE TABLE pf_layouts (pf TEXT PRIMARY KEY NOT NULL, body TEXT NOT NULL)")
    }
    if last == "v5" { return migrator }
    migrator.registerMigration("v6") { db in
      // How each allocation's device went through its PF's last re-layout (Relayout, JSON).
      try db.execute(sql: "ALTER TABLE allocations ADD COLUMN last_relayout TEXT")
    }
    return migrator
  }

  /// The migrations applied to the file.
  public func appliedMigrations() throws -> Set<String> {
    try queue.read { db in try Self.migrator().appliedIdentifiers(db) }
  }

  // MARK: StateStore

  public func load() throws(AgentError) -> PersistedState {
    do {
      return try queue.read { db in
        var state = PersistedState()
        for row in try Row.fetchAll(db, sql: "SELECT * FROM allocations ORDER BY id") {
          state.allocations.append(try self.allocation(row))
        }
        let rows = try Row.fetchAll(db, sql: "SELECT scope, key, fingerprint, outcome FROM idempotency ORDER BY seq")
        state.idempotency.reserveCapacity(rows.count)
        for row in rows {
          let outcome: String = row["outcome"]
          state.idempotency.append(
            IdempotencyRecord(
              scope: row["scope"], key: row["key"],
              fingerprint: try decoder.decode(String.self, from: Data((row["fingerprint"] as String).utf8)),
              outcome: try decoder.decode(IdempotentOutcome.self, from: Data(outcome.utf8))))
        }
        state.epoch =
          UInt64(try String.fetchOne(db, sql: "SELECT value FROM settings WHERE name = 'epoch'") ?? "0") ?? 0
        state.starts =
          UInt64(try String.fetchOne(db, sql: "SELECT value FROM settings WHERE name = 'starts'") ?? "0") ?? 0
        state.drains = Set(try String.fetchAll(db, sql: "SELECT target FROM drains"))
        let operations = try String.fetchAll(
          db,
          sql:
            "SELECT body FROM (SELECT body, created, rowid FROM operations ORDER BY created DESC, rowid DESC LIMIT ?) ORDER BY created, rowid",
          arguments: [Self.operationHistory])
        let unfinished = try String.fetchAll(
          db, sql: "SELECT body FROM operations WHERE unfinished = 1 ORDER BY created, rowid")
        for body in try String.fetchAll(db, sql: "SELECT body FROM contexts ORDER BY id") {
          state.contexts.append(try decoder.decode(ContextRecord.self, from: Data(body.utf8)))
        }
        for row in try Row.fetchAll(db, sql: "SELECT accelerator_id, body FROM policies") {
          let body: String = row["body"]
          state.policies[row["accelerator_id"]] = try decoder.decode(
            TimeSharingScheduler.Policy.self, from: Data(body.utf8))
        }
        for body in try String.fetchAll(db, sql: "SELECT body FROM device_health ORDER BY address") {
          let memory = try decoder.decode(HealthMemory.self, from: Data(body.utf8))
          state.health[memory.address] = memory
        }
        for body in try String.fetchAll(db, sql: "SELECT body FROM pf_layouts ORDER BY pf") {
          let layout = try decoder.decode(PFLayout.self, from: Data(body.utf8))
          state.layouts[layout.pf] = layout
        }
        state.bootID = try String.fetchOne(db, sql: "SELECT value FROM settings WHERE name = 'boot_id'")
        for row in try Row.fetchAll(db, sql: "SELECT kind, key, body FROM records") {
          state.records[row["kind"], default: [:]][row["key"]] = row["body"] as String
        }
        var seen = Set<String>()
        for body in unfinished + operations {
          let operation = try decoder.decode(StoredOperation.self, from: Data(body.utf8))
          if seen.insert(operation.record.id).inserted { state.operations.append(operation) }
        }
        return state
      }
    } catch {
      throw Self.openError(error, path: path)
    }
  }

  /// Group commit: a request's changes join the batch of every commit waiting while the
  /// previous transaction ran, and the whole batch is one transaction (one WAL append, one
  /// fsync with `power`). Should it fail, each request's changes are retried in a transaction
  /// of their own, so one request's failure is never another's.
  public func commit(_ changes: [StoreChange]) async throws(AgentError) {
    guard !changes.isEmpty else { return }
    let failure: AgentError? = await withCheckedContinuation { continuation in
      let startWriter = pending.withLock { pending -> Bool in
        pending.batches.append(Batch(changes: changes, done: continuation))
        if pending.writing { return false }
        pending.writing = true
        return true
      }
      if startWriter { writer.async { self.writeBatches() } }
    }
    if let failure { throw failure }
  }

  /// Commits waiting, with what each request learns.
  private struct Batch {
    var changes: [StoreChange]
    var done: CheckedContinuation<AgentError?, Never>
  }

  private struct Pending {
    var batches: [Batch] = []
    var writing = false
  }

  private let pending = Mutex(Pending())
  private let writer = DispatchQueue(label: "fpga-agent.state-writer")
  /// Transactions and the commits they carried (for the benchmark's figures).
  public let groupStatistics = Mutex((transactions: 0, commits: 0))

  private func writeBatches() {
    while true {
      let batches = pending.withLock { pending -> [Batch]? in
        if pending.batches.isEmpty {
          pending.writing = false
          return nil
        }
        defer { pending.batches.removeAll(keepingCapacity: true) }
        return pending.batches
      }
      guard let batches else { return }
      do {
        try queue.write { db in
          for batch in batches {
            for change in batch.changes { try self.write(change, db) }
          }
        }
        groupStatistics.withLock {
          $0.transactions += 1
          $0.commits += batches.count
        }
        for batch in batches { batch.done.resume(returning: nil) }
      } catch {
        for batch in batches {
          do {
            try queue.write { db in
              for change in batch.changes { try self.write(change, db) }
            }
            batch.done.resume(returning: nil)
          } catch {
            batch.done.resume(returning: Self.writeError(error, path: path))
          }
        }
      }
    }
  }

  private let idempotencyWrites = Atomic<Int>(0)

  private func write(_ change: StoreChange, _ db: Database) throws {
    switch change {
    case .putAllocation(let allocation):
      try db.cachedStatement(
        sql: """
          INSERT OR REPLACE INTO allocations (id, vf, pf, owner, vm, idempotency_key, created_s, created_ns, numa_node,
            iommu_group, attached, device_id, root_port, detaching, last_relayout)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
          """
      ).execute(
        arguments: [
          allocation.id, allocation.vf.description, allocation.pf.description, allocation.owner, allocation.vm,
          allocation.idempotencyKey, allocation.createdAt.seconds, allocation.createdAt.nanoseconds,
          allocation.numaNode,
          allocation.iommuGroup, allocation.attached, allocation.deviceID, allocation.rootPort, allocation.detaching,
          try allocation.lastRelayout.map { try json($0) },
        ])
    case .deleteAllocation(let id):
      try db.cachedStatement(sql: "DELETE FROM allocations WHERE id = ?").execute(arguments: [id])
    case .putIdempotency(let record):
      // Fingerprints hold NUL separators, which SQLite text does not keep: stored as JSON.
      try db.cachedStatement(
        sql: "INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, outcome) VALUES (?, ?, ?, ?)"
      ).execute(
        arguments: [record.scope, record.key, try json(record.fingerprint), try json(record.outcome)])
      if idempotencyWrites.add(1, ordering: .relaxed).newValue % 512 == 0 {
        try db.cachedStatement(
          sql: "DELETE FROM idempotency WHERE seq <= (SELECT MAX(seq) FROM idempotency) - ?"
        ).execute(
          arguments: [Self.idempotencyCapacity])
      }
    case .setEpoch(let epoch):
      try db.cachedStatement(
        sql: """
          INSERT INTO settings (name, value) VALUES ('epoch', ?)
          ON CONFLICT(name) DO UPDATE SET value = CASE
            WHEN length(excluded.value) > length(value)
              OR (length(excluded.value) = length(value) AND excluded.value > value) THEN excluded.value
            ELSE value END
          """
      ).execute(
        arguments: [String(epoch)])
    case .setStarts(let starts):
      try db.cachedStatement(
        sql:
          "INSERT INTO settings (name, value) VALUES ('starts', ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"
      ).execute(
        arguments: [String(starts)])
    case .putContext(let record):
      try db.cachedStatement(sql: "INSERT OR REPLACE INTO contexts (id, body) VALUES (?, ?)").execute(
        arguments: [record.id, try json(record)])
    case .deleteContext(let id):
      try db.cachedStatement(sql: "DELETE FROM contexts WHERE id = ?").execute(arguments: [id])
    case .putPolicy(let id, let policy):
      try db.cachedStatement(sql: "INSERT OR REPLACE INTO policies (accelerator_id, body) VALUES (?, ?)").execute(
        arguments: [id, try json(policy)])
    case .putRecord(let kind, let key, let body):
      try db.cachedStatement(sql: "INSERT OR REPLACE INTO records (kind, key, body) VALUES (?, ?, ?)").execute(
        arguments: [kind, key, body])
    case .deleteRecord(let kind, let key):
      try db.cachedStatement(sql: "DELETE FROM records WHERE kind = ? AND key = ?").execute(arguments: [kind, key])
    case .putHealth(let memory):
      try db.cachedStatement(sql: "INSERT OR REPLACE INTO device_health (address, body) VALUES (?, ?)").execute(
        arguments: [memory.address.description, try json(memory)])
    case .deleteHealth(let address):
      try db.cachedStatement(sql: "DELETE FROM device_health WHERE address = ?").execute(
        arguments: [address.description])
    case .putLayout(let layout):
      try db.cachedStatement(sql: "INSERT OR REPLACE INTO pf_layouts (pf, body) VALUES (?, ?)").execute(
        arguments: [layout.pf.description, try json(layout)])
    case .setBootID(let id):
      try db.cachedStatement(
        sql:
          "INSERT INTO settings (name, value) VALUES ('boot_id', ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"
      ).execute(arguments: [id])
    case .setDrain(let target, let on):
      if on {
        try db.cachedStatement(sql: "INSERT OR IGNORE INTO drains (target) VALUES (?)").execute(arguments: [target])
      } else {
        try db.cachedStatement(sql: "DELETE FROM drains WHERE target = ?").execute(arguments: [target])
      }
    case .putOperation(let operation):
      let record = operation.record
      try db.cachedStatement(
        sql: """
          INSERT INTO operations (id, kind, target, state, unfinished, created, body) VALUES (?, ?, ?, ?, ?, ?, ?)
          ON CONFLICT(id) DO UPDATE SET state = excluded.state, unfinished = excluded.unfinished, body = excluded.body
          """
      ).execute(
        arguments: [
          record.id, record.kind, record.target, record.state.rawValue, operation.journal != nil,
          record.createdAt.seconds, try json(operation),
        ])
      if operation.journal == nil {
        try db.cachedStatement(
          sql: """
            DELETE FROM operations WHERE unfinished = 0 AND rowid NOT IN
              (SELECT rowid FROM operations WHERE unfinished = 0 ORDER BY created DESC, rowid DESC LIMIT ?)
            """
        ).execute(
          arguments: [Self.operationHistory])
      }
    }
  }

  func allocation(_ row: Row) throws -> Allocation {
    let vf: String = row["vf"]
    let pf: String = row["pf"]
    guard let vfAddress = PCIAddress(vf), let pfAddress = PCIAddress(pf) else {
      throw DatabaseError(
        resultCode: .SQLITE_CORRUPT, message: "allocation \(row["id"] as String? ?? "?") has a bad address")
    }
    return Allocation(
      id: row["id"], vf: vfAddress, pf: pfAddress, owner: row["owner"], vm: row["vm"],
      idempotencyKey: row["idempotency_key"],
      createdAt: WallTime(seconds: row["created_s"], nanoseconds: row["created_ns"]),
      numaNode: row["numa_node"], iommuGroup: row["iommu_group"], attached: row["attached"], deviceID: row["device_id"],
      rootPort: row["root_port"], detaching: row["detaching"],
      lastRelayout: try (row["last_relayout"] as String?).map { try decoder.decode(Relayout.self, from: Data($0.utf8)) }
    )
  }

  private func json(_ value: some Encodable) throws -> String {
    String(decoding: try encoder.encode(value), as: UTF8.self)
  }

  // MARK: Errors

  static func openError(_ error: any Error, path: String) -> AgentError {
    guard let error = error as? DatabaseError else {
      return AgentError(
        .internal,
        "state store \(path) holds records this agent cannot read (\(error)); move the file aside to start empty, or restore a backup"
      )
    }
    switch error.resultCode {
    case .SQLITE_CORRUPT, .SQLITE_NOTADB:
      return AgentError(
        .internal,
        "state store \(path) is corrupt or not an SQLite database: the agent will not start on it and will not replace it. "
          + "Move it aside (the agent then starts empty and adopts the VFs it finds plugged into VMs) or restore a backup",
        cause: error.description)
    case .SQLITE_CANTOPEN, .SQLITE_PERM, .SQLITE_READONLY, .SQLITE_AUTH:
      return AgentError(
        .unavailable,
        "state store \(path) cannot be opened for writing: check that its directory exists and is writable by the agent",
        cause: error.description)
    case .SQLITE_FULL:
      return AgentError(
        .resourceExhausted, "state store \(path): the disk is full; free space in its directory",
        cause: error.description)
    default:
      return AgentError(.unavailable, "state store \(path) cannot be read", cause: error.description)
    }
  }

  static func writeError(_ error: any Error, path: String) -> AgentError {
    if let error = error as? DatabaseError, error.resultCode == .SQLITE_FULL {
      return AgentError(
        .resourceExhausted,
        "the state store could not record the change because the disk (or the store) is full: nothing changed; "
          + "free space in the directory of \(path)",
        cause: error.description)
    }
    return AgentError(
      .unavailable, "the state store \(path) could not record the change: nothing changed", cause: "\(error)")
  }
}
