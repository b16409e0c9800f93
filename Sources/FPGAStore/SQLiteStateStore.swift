import FPGACore
import Foundation
import GRDB
import Synchronization

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
            vf TEXT NOT NULL UNIQUE,
            pf TEXT NOT NULL,
            owner TEXT NOT NULL,
            vm TEXT,
            attached INTEGER NOT NULL,
            body TEXT NOT NULL
          );
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
        for body in try String.fetchAll(db, sql: "SELECT body FROM allocations ORDER BY id") {
          state.allocations.append(try decoder.decode(Allocation.self, from: Data(body.utf8)))
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
        state.epoch = UInt64(try String.fetchOne(db, sql: "SELECT value FROM settings WHERE name = 'epoch'") ?? "0") ?? 0
        state.starts = UInt64(try String.fetchOne(db, sql: "SELECT value FROM settings WHERE name = 'starts'") ?? "0") ?? 0
        state.drains = Set(try String.fetchAll(db, sql: "SELECT target FROM drains"))
        let operations = try String.fetchAll(
          db,
          sql: "SELECT body FROM (SELECT body, created, rowid FROM operations ORDER BY created DESC, rowid DESC LIMIT ?) ORDER BY created, rowid",
          arguments: [Self.operationHistory])
        let unfinished = try String.fetchAll(
          db, sql: "SELECT body FROM operations WHERE unfinished = 1 ORDER BY created, rowid")
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

  public func commit(_ changes: [StoreChange]) throws(AgentError) {
    guard !changes.isEmpty else { return }
    do {
      try queue.write { db in
        for change in changes { try self.write(change, db) }
      }
    } catch let error as AgentError {
      throw error
    } catch {
      throw Self.writeError(error, path: path)
    }
  }

  private let idempotencyWrites = Atomic<Int>(0)

  private func write(_ change: StoreChange, _ db: Database) throws {
    switch change {
    case .putAllocation(let allocation):
      try db.execute(
        sql: "INSERT OR REPLACE INTO allocations (id, vf, pf, owner, vm, attached, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
        arguments: [
          allocation.id, allocation.vf.description, allocation.pf.description, allocation.owner, allocation.vm,
          allocation.attached, try json(allocation),
        ])
    case .deleteAllocation(let id):
      try db.execute(sql: "DELETE FROM allocations WHERE id = ?", arguments: [id])
    case .putIdempotency(let record):
      try db.execute(
        sql: "INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, outcome) VALUES (?, ?, ?, ?)",
        // Fingerprints hold NUL separators, which SQLite text does not keep: stored as JSON.
        arguments: [record.scope, record.key, try json(record.fingerprint), try json(record.outcome)])
      if idempotencyWrites.add(1, ordering: .relaxed).newValue % 512 == 0 {
        try db.execute(
          sql: "DELETE FROM idempotency WHERE seq <= (SELECT MAX(seq) FROM idempotency) - ?",
          arguments: [Self.idempotencyCapacity])
      }
    case .setEpoch(let epoch):
      try db.execute(
        sql: """
          INSERT INTO settings (name, value) VALUES ('epoch', ?)
          ON CONFLICT(name) DO UPDATE SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))
          """,
        arguments: [String(epoch)])
    case .setStarts(let starts):
      try db.execute(
        sql: "INSERT INTO settings (name, value) VALUES ('starts', ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        arguments: [String(starts)])
    case .setDrain(let target, let on):
      if on {
        try db.execute(sql: "INSERT OR IGNORE INTO drains (target) VALUES (?)", arguments: [target])
      } else {
        try db.execute(sql: "DELETE FROM drains WHERE target = ?", arguments: [target])
      }
    case .putOperation(let operation):
      let record = operation.record
      try db.execute(
        sql: """
          INSERT INTO operations (id, kind, target, state, unfinished, created, body) VALUES (?, ?, ?, ?, ?, ?, ?)
          ON CONFLICT(id) DO UPDATE SET state = excluded.state, unfinished = excluded.unfinished, body = excluded.body
          """,
        arguments: [
          record.id, record.kind, record.target, record.state.rawValue, operation.journal != nil,
          record.createdAt.seconds, try json(operation),
        ])
      if operation.journal == nil {
        try db.execute(
          sql: """
            DELETE FROM operations WHERE unfinished = 0 AND rowid NOT IN
              (SELECT rowid FROM operations WHERE unfinished = 0 ORDER BY created DESC, rowid DESC LIMIT ?)
            """,
          arguments: [Self.operationHistory])
      }
    }
  }

  private func json(_ value: some Encodable) throws -> String {
    String(decoding: try encoder.encode(value), as: UTF8.self)
  }

  // MARK: Errors

  static func openError(_ error: any Error, path: String) -> AgentError {
    guard let error = error as? DatabaseError else {
      return AgentError(
        .internal,
        "state store \(path) holds records this agent cannot read (\(error)); move the file aside to start empty, or restore a backup")
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
        .resourceExhausted, "state store \(path): the disk is full; free space in its directory", cause: error.description)
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
