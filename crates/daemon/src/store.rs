//! The daemon's state store: VM definitions, desired state, runtime state and an append-only
//! event log in one SQLite database, `<state-dir>/state.db`.
//!
//! # Guarantees
//!
//! - Every operation is one `BEGIN IMMEDIATE` transaction: it sees and leaves a consistent
//!   store, or changes nothing (a refused request, an error, a panic, or a `kill -9` of the
//!   daemon at any point all leave the store as it was before the operation).
//! - A state change and its event are written in the same transaction, so the log never
//!   disagrees with the state; a VM row never exists without its `created` event.
//! - A VM's config is stored only after it has been serialised *and* read back, so every stored
//!   config parses.
//! - The connection is behind a mutex: operations from several threads are serialised.
//! - One daemon per state directory: [`Store::open`] takes an exclusive lock on
//!   `<state-dir>/lock` (released by the kernel when the process dies, however it dies).
//!
//! # Durability settings
//!
//! `journal_mode=WAL` (readers never block the writer, commits are sequential appends) and
//! `synchronous=FULL`: every commit is fsynced before the call returns. `NORMAL` would lose
//! nothing when the daemon is killed (committed pages are in the WAL, in the page cache), but
//! after a power loss or kernel crash it may roll back the last commits: a VM the API had
//! acknowledged as created (or deleted) would be missing (or back) after the reboot, and the
//! event log would no longer match what clients were told. Writes are control-plane sized (a
//! few per VM state change), so one fsync per commit costs nothing that matters.
//! `foreign_keys=ON` (no foreign keys in v1, but later migrations may add them) and
//! `busy_timeout=5s` (another process, e.g. a backup reading the file, may briefly hold a lock).
//!
//! # Schema (version 1)
//!
//! ```sql
//! -- PRAGMA application_id = 0x46565354 ('FVST'): marks the file as ours.
//! CREATE TABLE schema_migrations (
//!     version    INTEGER PRIMARY KEY,      -- one row per applied migration
//!     applied_at INTEGER NOT NULL          -- unix milliseconds
//! );
//! CREATE TABLE vms (
//!     seq              INTEGER PRIMARY KEY AUTOINCREMENT, -- creation order (list order)
//!     id               TEXT NOT NULL UNIQUE,  -- 32 lowercase hex digits, random, never reused
//!     name             TEXT NOT NULL UNIQUE,  -- see validate_name()
//!     config           TEXT NOT NULL,         -- VmConfig as JSON (json_valid)
//!     restart_policy   TEXT NOT NULL,         -- never | on-failure | always
//!     desired_state    TEXT NOT NULL,         -- running | stopped
//!     created_at       INTEGER NOT NULL,      -- unix milliseconds
//!     updated_at       INTEGER NOT NULL,      -- unix milliseconds, every change
//!     -- runtime
//!     state            TEXT NOT NULL,         -- created | starting | running | paused |
//!                                             -- stopping | stopped | crashed | exited
//!     pid              INTEGER,               -- the VMM's pid while it lives
//!     pid_start_time   INTEGER,               -- /proc/PID/stat field 22 of that pid
//!     control_socket   TEXT,                  -- the VMM's control socket while it lives
//!     console_socket   TEXT,                  -- its console socket, if any
//!     started_at       INTEGER,               -- last start, unix milliseconds
//!     restart_count    INTEGER NOT NULL DEFAULT 0,
//!     last_exit_reason TEXT,
//!     last_exit_code   INTEGER,
//!     uid              INTEGER UNIQUE,        -- (v3) its confined VMM's uid and gid, from the
//!                                             -- daemon's --uid-range, kept until deletion
//!     next_restart_at  INTEGER                -- unix milliseconds, when a restart is due
//! );
//! CREATE TABLE events (
//!     id     INTEGER PRIMARY KEY AUTOINCREMENT, -- strictly increasing, never reused
//!     at     INTEGER NOT NULL,                  -- unix milliseconds
//!     vm_id  TEXT,                              -- no foreign key: the log outlives its VMs
//!     kind   TEXT NOT NULL,                     -- see EventKind
//!     detail TEXT NOT NULL                      -- JSON (json_valid)
//! );
//! CREATE INDEX events_by_vm ON events (vm_id, id);
//! ```
//!
//! Every enumerated column has a `CHECK` constraint listing its values, `pid > 0`,
//! `restart_count >= 0`, and `pid`/`pid_start_time` are set together. Migrations are applied in
//! one transaction at open; a database from a newer schema is refused
//! ([`StoreError::SchemaTooNew`]).
//!
//! # Runtime transitions
//!
//! ```text
//! created/stopped/crashed/exited --set_state(Starting)--> starting
//! starting (or created/stopped/crashed/exited) --set_running--> running      [started]
//! running --set_state(Paused)--> paused                                      [paused]
//! paused --set_state(Running)--> running                                     [resumed]
//! starting/running/paused --set_state(Stopping)--> stopping
//! starting/running/paused/stopping --set_exited--> crashed                   [crashed]
//!                                                  stopped (stopping, or desired stopped) [stopped]
//!                                                  exited (otherwise)        [exited]
//! crashed/exited --schedule_restart--> (same state, restart_count+1)         [restarted]
//! ```
//! Anything else is a [`StoreError::Conflict`].

use crate::error::StoreError;
use crate::sync::lock;
use api::{DesiredState, EventKind, RestartPolicy, VmState};
use config::VmConfig;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = 4;

/// `PRAGMA application_id` of a Ferrovisor state database ("FVST").
const APPLICATION_ID: i32 = 0x4656_5354;

/// Longest VM name.
pub const NAME_MAX: usize = 63;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = i64;

/// An event's id: strictly increasing over the life of the store.
pub type EventId = i64;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, SCHEMA_V1),
    (2, SCHEMA_V2),
    (3, SCHEMA_V3),
    (4, SCHEMA_V4),
];

/// v4: the event kind `unconfined` (the daemon runs VMMs without some walls). SQLite cannot
/// change a `CHECK`, so the table is rebuilt: same rows, same ids, and its AUTOINCREMENT
/// counter carried over (ids are never reused, even those of events no longer kept).
const SCHEMA_V4: &str = "
CREATE TABLE events_v4 (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    vm_id  TEXT,
    kind   TEXT NOT NULL CHECK (kind IN ('created', 'started', 'paused', 'resumed', 'stopped',
                                         'crashed', 'exited', 'restarted', 'deleted',
                                         'adopted', 'unconfined')),
    detail TEXT NOT NULL CHECK (json_valid(detail))
);
INSERT INTO events_v4 (id, at, vm_id, kind, detail) SELECT id, at, vm_id, kind, detail FROM events;
DELETE FROM sqlite_sequence WHERE name = 'events_v4';
INSERT INTO sqlite_sequence (name, seq) SELECT 'events_v4', seq FROM sqlite_sequence WHERE name = 'events';
DROP TABLE events;
ALTER TABLE events_v4 RENAME TO events;
CREATE INDEX events_by_vm ON events (vm_id, id);
";

/// v3: the uid (and gid) a VM's confined VMM runs as, allocated at its first start from the
/// daemon's `--uid-range` and kept until the VM is deleted; unique among VMs.
const SCHEMA_V3: &str = "
ALTER TABLE vms ADD COLUMN uid INTEGER CHECK (uid IS NULL OR (uid > 0 AND uid < 4294967295));
CREATE UNIQUE INDEX vms_uid ON vms (uid);
";

/// v2: per-VM host resource limits (cgroups), as JSON ([`api::Resources`]).
const SCHEMA_V2: &str = "
ALTER TABLE vms ADD COLUMN resources TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(resources));
";

const SCHEMA_V1: &str = "
PRAGMA application_id = 1180062548;
CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    applied_at INTEGER NOT NULL
);
CREATE TABLE vms (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE CHECK (length(id) = 32),
    name             TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 63),
    config           TEXT NOT NULL CHECK (json_valid(config)),
    restart_policy   TEXT NOT NULL CHECK (restart_policy IN ('never', 'on-failure', 'always')),
    desired_state    TEXT NOT NULL CHECK (desired_state IN ('running', 'stopped')),
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('created', 'starting', 'running', 'paused',
                                                    'stopping', 'stopped', 'crashed', 'exited')),
    pid              INTEGER CHECK (pid IS NULL OR pid > 0),
    pid_start_time   INTEGER CHECK ((pid IS NULL) = (pid_start_time IS NULL)),
    control_socket   TEXT,
    console_socket   TEXT,
    started_at       INTEGER,
    restart_count    INTEGER NOT NULL DEFAULT 0 CHECK (restart_count >= 0),
    last_exit_reason TEXT,
    last_exit_code   INTEGER,
    next_restart_at  INTEGER
);
CREATE TABLE events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    vm_id  TEXT,
    kind   TEXT NOT NULL CHECK (kind IN ('created', 'started', 'paused', 'resumed', 'stopped',
                                         'crashed', 'exited', 'restarted', 'deleted',
                                         'adopted')),
    detail TEXT NOT NULL CHECK (json_valid(detail))
);
CREATE INDEX events_by_vm ON events (vm_id, id);
";

/// The state enums (the api crate's, one set) as the store keeps them: each in its column,
/// spelled as in the API ([`VmState::as_str`]); the schema's `CHECK` constraints list the
/// spellings.
trait Column: FromStr<Err = api::UnknownValue> {
    /// Its column (the field a parse error names).
    const COLUMN: &'static str;
}

impl Column for RestartPolicy {
    const COLUMN: &'static str = "restart_policy";
}

impl Column for DesiredState {
    const COLUMN: &'static str = "desired_state";
}

impl Column for VmState {
    const COLUMN: &'static str = "state";
}

impl Column for EventKind {
    const COLUMN: &'static str = "kind";
}

/// Parses the text of a state column.
fn from_column<T: Column>(s: &str) -> Result<T, StoreError> {
    s.parse()
        .map_err(|e: api::UnknownValue| StoreError::Invalid {
            field: T::COLUMN,
            reason: e.to_string(),
        })
}

/// A VM's id: 32 lowercase hex digits from the kernel's random source, fixed for life.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(String);

impl VmId {
    fn random() -> Result<VmId, StoreError> {
        let path = Path::new("/dev/urandom");
        let mut bytes = [0u8; 16];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(VmId(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// Whether `s` has the shape of an id.
    pub fn looks_like_id(s: &str) -> bool {
        s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VmId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// What the daemon knows about a VM's process.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Runtime {
    /// Where it is.
    pub state: VmState,
    /// The VMM's pid while it lives.
    pub pid: Option<u32>,
    /// That pid's start time (`/proc/PID/stat` field 22, clock ticks since boot), to tell our
    /// VMM from a later process that re-uses the pid.
    pub pid_start_time: Option<u64>,
    /// The VMM's control socket while it lives.
    pub control_socket: Option<PathBuf>,
    /// Its console socket, if it has one.
    pub console_socket: Option<PathBuf>,
    /// When it last started.
    pub started_at: Option<UnixMillis>,
    /// Restarts scheduled by the restart policy since the count was last reset.
    pub restart_count: u32,
    /// Why it last ended.
    pub last_exit_reason: Option<String>,
    /// Its last exit status, when it had one.
    pub last_exit_code: Option<i32>,
    /// When the next restart is due (back-off), if one is scheduled.
    pub next_restart_at: Option<UnixMillis>,
}

/// One VM as stored.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmRecord {
    /// Stable id.
    pub id: VmId,
    /// Unique name.
    pub name: String,
    /// Its configuration.
    pub config: VmConfig,
    /// What to do when it ends.
    pub restart_policy: RestartPolicy,
    /// What the user wants.
    pub desired_state: DesiredState,
    /// When it was defined.
    pub created_at: UnixMillis,
    /// When it last changed.
    pub updated_at: UnixMillis,
    /// Host resource limits of its VMM (cgroups).
    pub resources: api::Resources,
    /// Its process.
    pub runtime: Runtime,
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// Strictly increasing id.
    pub id: EventId,
    /// When it was recorded.
    pub at: UnixMillis,
    /// The VM it is about (it may since have been deleted).
    pub vm_id: Option<VmId>,
    /// What happened.
    pub kind: EventKind,
    /// Details (JSON).
    pub detail: Value,
}

/// Now, in milliseconds since the Unix epoch (0 for a clock before 1970).
pub fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Checks a VM name: 1–63 characters of `[A-Za-z0-9._-]`, not starting with `-` or `.`, and
/// not shaped like a VM id (32 lowercase hex digits), so "id or name" is never ambiguous.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let invalid = |reason: String| StoreError::Invalid {
        field: "name",
        reason,
    };
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(invalid(format!(
            "{name:?}: must be 1 to {NAME_MAX} characters long"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(format!(
            "{name:?}: character {c:?} not allowed (use A-Z a-z 0-9 . _ -)"
        )));
    }
    if name.starts_with(['-', '.']) {
        return Err(invalid(format!("{name:?}: must not start with '-' or '.'")));
    }
    if VmId::looks_like_id(name) {
        return Err(invalid(format!(
            "{name:?}: 32 hex digits is the shape of a VM id; choose another name"
        )));
    }
    Ok(())
}

/// The state store. `Send + Sync`: share it (`Arc<Store>`) between threads; operations are
/// serialised on one connection. The HTTP layer calls it from `spawn_blocking`.
pub struct Store {
    conn: Mutex<Connection>,
    db_path: PathBuf,
    _lock: File,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("db", &self.db_path).finish()
    }
}

const VM_COLUMNS: &str = "id, name, config, restart_policy, desired_state, created_at, \
    updated_at, state, pid, pid_start_time, control_socket, console_socket, started_at, \
    restart_count, last_exit_reason, last_exit_code, next_restart_at, resources";

/// A `vms` row as read, before its text columns are parsed.
struct RawVm {
    id: String,
    name: String,
    config: String,
    restart_policy: String,
    desired_state: String,
    created_at: i64,
    updated_at: i64,
    state: String,
    pid: Option<i64>,
    pid_start_time: Option<i64>,
    control_socket: Option<String>,
    console_socket: Option<String>,
    started_at: Option<i64>,
    restart_count: i64,
    last_exit_reason: Option<String>,
    last_exit_code: Option<i64>,
    next_restart_at: Option<i64>,
    resources: String,
}

impl RawVm {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<RawVm> {
        Ok(RawVm {
            id: r.get(0)?,
            name: r.get(1)?,
            config: r.get(2)?,
            restart_policy: r.get(3)?,
            desired_state: r.get(4)?,
            created_at: r.get(5)?,
            updated_at: r.get(6)?,
            state: r.get(7)?,
            pid: r.get(8)?,
            pid_start_time: r.get(9)?,
            control_socket: r.get(10)?,
            console_socket: r.get(11)?,
            started_at: r.get(12)?,
            restart_count: r.get(13)?,
            last_exit_reason: r.get(14)?,
            last_exit_code: r.get(15)?,
            next_restart_at: r.get(16)?,
            resources: r.get(17)?,
        })
    }

    fn into_record(self) -> Result<VmRecord, StoreError> {
        let id = self.id;
        let corrupt = |reason: String| StoreError::Corrupt {
            vm: id.clone(),
            reason,
        };
        let parse = |what: &str, e: StoreError| corrupt(format!("{what}: {e}"));
        let config = serde_json::from_str(&self.config)
            .map_err(|e| corrupt(format!("config does not parse: {e}")))?;
        let resources = serde_json::from_str(&self.resources)
            .map_err(|e| corrupt(format!("resources do not parse: {e}")))?;
        let int = |what: &str, v: i64| corrupt(format!("{what} {v} out of range"));
        Ok(VmRecord {
            resources,
            name: self.name,
            config,
            restart_policy: from_column(&self.restart_policy)
                .map_err(|e| parse("restart_policy", e))?,
            desired_state: from_column(&self.desired_state)
                .map_err(|e| parse("desired_state", e))?,
            created_at: self.created_at,
            updated_at: self.updated_at,
            runtime: Runtime {
                state: from_column(&self.state).map_err(|e| parse("state", e))?,
                pid: self
                    .pid
                    .map(|p| u32::try_from(p).map_err(|_| int("pid", p)))
                    .transpose()?,
                pid_start_time: self
                    .pid_start_time
                    .map(|t| u64::try_from(t).map_err(|_| int("pid_start_time", t)))
                    .transpose()?,
                control_socket: self.control_socket.map(PathBuf::from),
                console_socket: self.console_socket.map(PathBuf::from),
                started_at: self.started_at,
                restart_count: u32::try_from(self.restart_count)
                    .map_err(|_| int("restart_count", self.restart_count))?,
                last_exit_reason: self.last_exit_reason,
                last_exit_code: self
                    .last_exit_code
                    .map(|c| i32::try_from(c).map_err(|_| int("last_exit_code", c)))
                    .transpose()?,
                next_restart_at: self.next_restart_at,
            },
            id: VmId(id),
        })
    }
}

/// Looks a VM up by id or name inside a transaction.
fn find(tx: &Transaction<'_>, vm: &str) -> Result<VmRecord, StoreError> {
    let sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1 OR name = ?1 LIMIT 1");
    tx.query_row(&sql, [vm], RawVm::from_row)
        .optional()?
        .ok_or_else(|| StoreError::NotFound(vm.to_string()))?
        .into_record()
}

thread_local! {
    /// Who the store's writes on this thread are made for (see [`acting_as`]).
    static ACTOR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the events it writes on this thread recording `"by": by` in their detail (the
/// API's caller: a certificate's CN, or `local`); `None` records nothing (the daemon's own
/// doing: exits, restarts, adoption).
pub fn acting_as<R>(by: Option<&str>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<String>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let old = self.0.take();
            ACTOR.with(|a| *a.borrow_mut() = old);
        }
    }
    let old = ACTOR.with(|a| a.replace(by.map(str::to_string)));
    let _restore = Restore(old);
    f()
}

/// The user this thread's store writes are made for (see [`acting_as`]), if any.
pub fn current_actor() -> Option<String> {
    ACTOR.with(|a| a.borrow().clone())
}

fn insert_event(
    tx: &Transaction<'_>,
    vm_id: Option<&VmId>,
    kind: EventKind,
    detail: &Value,
    at: UnixMillis,
) -> Result<EventId, StoreError> {
    let detail = match (current_actor(), detail) {
        (Some(by), Value::Object(map)) => {
            let mut map = map.clone();
            map.insert("by".into(), Value::String(by));
            Value::Object(map)
        }
        _ => detail.clone(),
    };
    tx.execute(
        "INSERT INTO events (at, vm_id, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![
            at,
            vm_id.map(VmId::as_str),
            kind.as_str(),
            detail.to_string()
        ],
    )?;
    Ok(tx.last_insert_rowid())
}

fn path_text<'a>(field: &'static str, p: &'a Path) -> Result<&'a str, StoreError> {
    p.to_str().ok_or_else(|| StoreError::Invalid {
        field,
        reason: format!("{}: not UTF-8", p.display()),
    })
}

fn conflict(rec: &VmRecord, action: &'static str) -> StoreError {
    StoreError::Conflict {
        vm: rec.name.clone(),
        state: rec.runtime.state,
        action,
    }
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir`: the directory (mode 0700 when
    /// created), its lock, `state.db` (0600), and the schema (migrated to
    /// [`SCHEMA_VERSION`]).
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;

        let lock_path = state_dir.join("lock");
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(state_dir.to_path_buf()))
            }
            Err(TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }

        // Create the file ourselves so it gets 0600 (SQLite gives the -wal and -shm files the
        // database file's mode).
        let db_path = state_dir.join("state.db");
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&db_path)
            .map_err(io(&db_path))?;

        let mut conn = Connection::open(&db_path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Io {
                path: db_path,
                source: std::io::Error::other(format!(
                    "cannot switch to WAL journal mode (got {mode})"
                )),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, &db_path)?;
        Ok(Store {
            conn: Mutex::new(conn),
            db_path,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.db_path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic inside an operation rolled its transaction back when it unwound, so the
        // connection is still sound.
        lock(&self.conn)
    }

    /// Runs `f` in one write transaction (`BEGIN IMMEDIATE`): committed if it returns `Ok`,
    /// rolled back otherwise.
    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` in one read transaction (a consistent snapshot).
    fn read<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&tx)
    }

    /// Defines a VM (state `created`) and logs `created`. Refuses an invalid or taken name and
    /// a config that does not survive a JSON round trip. The caller validates the config
    /// against the host ([`VmConfig::validate`]) first.
    pub fn create(
        &self,
        name: &str,
        config: &VmConfig,
        restart_policy: RestartPolicy,
        desired_state: DesiredState,
    ) -> Result<VmRecord, StoreError> {
        self.create_with(
            name,
            config,
            restart_policy,
            desired_state,
            &api::Resources::default(),
        )
    }

    /// [`Store::create`] with host resource limits.
    pub fn create_with(
        &self,
        name: &str,
        config: &VmConfig,
        restart_policy: RestartPolicy,
        desired_state: DesiredState,
        resources: &api::Resources,
    ) -> Result<VmRecord, StoreError> {
        validate_name(name)?;
        let resources_json = serde_json::to_string(resources).map_err(|e| StoreError::Invalid {
            field: "resources",
            reason: e.to_string(),
        })?;
        let config_json = serde_json::to_string(config).map_err(|e| StoreError::Invalid {
            field: "config",
            reason: e.to_string(),
        })?;
        match serde_json::from_str::<VmConfig>(&config_json) {
            Ok(back) if back == *config => {}
            Ok(_) => {
                return Err(StoreError::Invalid {
                    field: "config",
                    reason: "does not survive a JSON round trip".into(),
                })
            }
            Err(e) => {
                return Err(StoreError::Invalid {
                    field: "config",
                    reason: format!("does not read back: {e}"),
                })
            }
        }
        let id = VmId::random()?;
        self.write(|tx| {
            let taken: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM vms WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(StoreError::NameTaken(name.to_string()));
            }
            let now = now_millis();
            tx.execute(
                "INSERT INTO vms (id, name, config, restart_policy, desired_state, created_at, \
                 updated_at, state, resources) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8)",
                params![
                    id.as_str(),
                    name,
                    config_json,
                    restart_policy.as_str(),
                    desired_state.as_str(),
                    now,
                    VmState::Created.as_str(),
                    resources_json
                ],
            )?;
            insert_event(
                tx,
                Some(&id),
                EventKind::Created,
                &json!({ "name": name }),
                now,
            )?;
            find(tx, id.as_str())
        })
    }

    /// The uid VM `vm`'s confined VMM runs as: the one it was given before, or the lowest of
    /// `range` that no other VM holds and `taken` (host accounts, running processes) does not
    /// contain, recorded now. `None` when the range is exhausted.
    pub fn assign_uid(
        &self,
        vm: &str,
        range: std::ops::RangeInclusive<u32>,
        taken: &std::collections::BTreeSet<u32>,
    ) -> Result<Option<u32>, StoreError> {
        self.write(|tx| {
            let rec = find(tx, vm)?;
            let had: Option<i64> = tx.query_row(
                "SELECT uid FROM vms WHERE id = ?1",
                [rec.id.as_str()],
                |r| r.get(0),
            )?;
            if let Some(uid) = had.and_then(|u| u32::try_from(u).ok()) {
                return Ok(Some(uid));
            }
            let mut stmt = tx.prepare("SELECT uid FROM vms WHERE uid IS NOT NULL")?;
            let held = stmt
                .query_map([], |r| r.get::<_, i64>(0))?
                .collect::<Result<std::collections::BTreeSet<_>, _>>()?;
            let Some(uid) = range
                .into_iter()
                .find(|u| !held.contains(&i64::from(*u)) && !taken.contains(u))
            else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE vms SET uid = ?2 WHERE id = ?1",
                params![rec.id.as_str(), i64::from(uid)],
            )?;
            Ok(Some(uid))
        })
    }

    /// The uid VM `vm` was given by [`Store::assign_uid`], if any.
    pub fn uid_of(&self, vm: &str) -> Result<Option<u32>, StoreError> {
        self.read(|tx| {
            let rec = find(tx, vm)?;
            let uid: Option<i64> = tx.query_row(
                "SELECT uid FROM vms WHERE id = ?1",
                [rec.id.as_str()],
                |r| r.get(0),
            )?;
            Ok(uid.and_then(|u| u32::try_from(u).ok()))
        })
    }

    /// A VM by id or name.
    pub fn get(&self, vm: &str) -> Result<VmRecord, StoreError> {
        self.read(|tx| find(tx, vm))
    }

    /// Every VM, in creation order.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.select_vms("ORDER BY seq")
    }

    /// The VMs whose VMM should still be running (state `running`, `paused` or `stopping`,
    /// with a pid): what a restarted daemon re-adopts after checking each pid with
    /// [`process_matches`](crate::process::process_matches). `stopping` is included because a
    /// daemon killed in the middle of a stop leaves that VMM alive.
    pub fn running_vmms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.select_vms(
            "WHERE state IN ('running', 'paused', 'stopping') AND pid IS NOT NULL ORDER BY seq",
        )
    }

    fn select_vms(&self, tail: &str) -> Result<Vec<VmRecord>, StoreError> {
        self.read(|tx| {
            let mut stmt = tx.prepare(&format!("SELECT {VM_COLUMNS} FROM vms {tail}"))?;
            let raws = stmt
                .query_map([], RawVm::from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            raws.into_iter().map(RawVm::into_record).collect()
        })
    }

    /// Sets what the user wants. Setting `stopped` cancels a scheduled restart.
    pub fn set_desired(&self, vm: &str, desired: DesiredState) -> Result<VmRecord, StoreError> {
        self.write(|tx| {
            let rec = find(tx, vm)?;
            tx.execute(
                "UPDATE vms SET desired_state = ?2, updated_at = ?3, next_restart_at = \
                 CASE WHEN ?2 = 'stopped' THEN NULL ELSE next_restart_at END WHERE id = ?1",
                params![rec.id.as_str(), desired.as_str(), now_millis()],
            )?;
            find(tx, rec.id.as_str())
        })
    }

    /// Records a state change that involves no process start or end (see the module's
    /// transition table): `starting`, `paused` (logs `paused`), `running` from `paused`
    /// (logs `resumed`), `stopping`. A transition the table does not have is a
    /// [`StoreError::Conflict`]; use [`Store::set_running`] and [`Store::set_exited`] for
    /// process starts and ends.
    pub fn set_state(&self, vm: &str, state: VmState) -> Result<VmRecord, StoreError> {
        use VmState::*;
        self.write(|tx| {
            let rec = find(tx, vm)?;
            let from = rec.runtime.state;
            let (allowed, action, event) = match state {
                Starting => (
                    matches!(from, Created | Stopped | Crashed | Exited),
                    "start",
                    None,
                ),
                Paused => (from == Running, "pause", Some(EventKind::Paused)),
                Running => (from == Paused, "resume", Some(EventKind::Resumed)),
                Stopping => (matches!(from, Starting | Running | Paused), "stop", None),
                Created | Stopped | Crashed | Exited => {
                    return Err(StoreError::Invalid {
                        field: "state",
                        reason: format!("{state}: a VM ends through set_exited, not set_state"),
                    })
                }
            };
            if !allowed {
                return Err(conflict(&rec, action));
            }
            let now = now_millis();
            tx.execute(
                "UPDATE vms SET state = ?2, updated_at = ?3, next_restart_at = \
                 CASE WHEN ?2 = 'starting' THEN NULL ELSE next_restart_at END WHERE id = ?1",
                params![rec.id.as_str(), state.as_str(), now],
            )?;
            if let Some(kind) = event {
                insert_event(tx, Some(&rec.id), kind, &json!({}), now)?;
            }
            find(tx, rec.id.as_str())
        })
    }

    /// Records that the VM's VMM runs: its pid and that pid's start time
    /// ([`proc_start_time`](crate::process::proc_start_time)), its control and console
    /// sockets. Allowed from `starting` (and from `created`, `stopped`, `crashed`, `exited`);
    /// logs `started`. Clears a scheduled restart.
    pub fn set_running(
        &self,
        vm: &str,
        pid: u32,
        pid_start_time: u64,
        control_socket: &Path,
        console_socket: Option<&Path>,
    ) -> Result<VmRecord, StoreError> {
        let pid_i =
            i32::try_from(pid)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| StoreError::Invalid {
                    field: "pid",
                    reason: format!("{pid}: not a process id"),
                })?;
        let start_i = i64::try_from(pid_start_time).map_err(|_| StoreError::Invalid {
            field: "pid_start_time",
            reason: format!("{pid_start_time}: out of range"),
        })?;
        let control = path_text("control_socket", control_socket)?;
        let console = console_socket
            .map(|p| path_text("console_socket", p))
            .transpose()?;
        self.write(|tx| {
            let rec = find(tx, vm)?;
            if matches!(
                rec.runtime.state,
                VmState::Running | VmState::Paused | VmState::Stopping
            ) {
                return Err(conflict(&rec, "record a start"));
            }
            let now = now_millis();
            tx.execute(
                "UPDATE vms SET state = 'running', pid = ?2, pid_start_time = ?3, \
                 control_socket = ?4, console_socket = ?5, started_at = ?6, updated_at = ?6, \
                 next_restart_at = NULL WHERE id = ?1",
                params![rec.id.as_str(), pid_i, start_i, control, console, now],
            )?;
            insert_event(
                tx,
                Some(&rec.id),
                EventKind::Started,
                &json!({
                    "pid": pid,
                    "control_socket": control,
                    "console_socket": console,
                    "restart_count": rec.runtime.restart_count,
                }),
                now,
            )?;
            find(tx, rec.id.as_str())
        })
    }

    /// Records that the VM's VMM ended (or never came up): `crashed` when `crashed`, else
    /// `stopped` when a stop was asked (state `stopping` or desired `stopped`), else `exited`.
    /// Clears the pid and sockets, keeps the reason and exit code, logs the matching event.
    /// Allowed from `starting`, `running`, `paused`, `stopping`.
    pub fn set_exited(
        &self,
        vm: &str,
        reason: &str,
        code: Option<i32>,
        crashed: bool,
    ) -> Result<VmRecord, StoreError> {
        self.record_exit(vm, None, reason, code, crashed)
    }

    /// [`Store::set_exited`] for the exit of the VMM `pid`: a [`StoreError::Conflict`] when the
    /// record holds another VMM's pid (a late notice about a process the VM no longer runs
    /// must not end the record of the one it runs now), checked in the same transaction.
    pub fn set_exited_of(
        &self,
        vm: &str,
        pid: u32,
        reason: &str,
        code: Option<i32>,
        crashed: bool,
    ) -> Result<VmRecord, StoreError> {
        self.record_exit(vm, Some(pid), reason, code, crashed)
    }

    fn record_exit(
        &self,
        vm: &str,
        pid: Option<u32>,
        reason: &str,
        code: Option<i32>,
        crashed: bool,
    ) -> Result<VmRecord, StoreError> {
        self.write(|tx| {
            let rec = find(tx, vm)?;
            if !rec.runtime.state.is_live() {
                return Err(conflict(&rec, "record an exit"));
            }
            if let (Some(pid), Some(current)) = (pid, rec.runtime.pid) {
                if pid != current {
                    return Err(conflict(&rec, "record the exit of a VMM it no longer runs"));
                }
            }
            let (state, kind) = if crashed {
                (VmState::Crashed, EventKind::Crashed)
            } else if rec.runtime.state == VmState::Stopping
                || rec.desired_state == DesiredState::Stopped
            {
                (VmState::Stopped, EventKind::Stopped)
            } else {
                (VmState::Exited, EventKind::Exited)
            };
            let now = now_millis();
            tx.execute(
                "UPDATE vms SET state = ?2, pid = NULL, pid_start_time = NULL, \
                 control_socket = NULL, console_socket = NULL, last_exit_reason = ?3, \
                 last_exit_code = ?4, updated_at = ?5 WHERE id = ?1",
                params![rec.id.as_str(), state.as_str(), reason, code, now],
            )?;
            insert_event(
                tx,
                Some(&rec.id),
                kind,
                &json!({ "reason": reason, "code": code, "pid": rec.runtime.pid }),
                now,
            )?;
            find(tx, rec.id.as_str())
        })
    }

    /// Schedules a restart by the restart policy at `at` (the caller's back-off): increments
    /// the restart count, sets the next restart time, logs `restarted` (detail: `attempt`,
    /// `at`). Allowed in `crashed` and `exited` while the desired state is `running`.
    pub fn schedule_restart(&self, vm: &str, at: UnixMillis) -> Result<VmRecord, StoreError> {
        self.write(|tx| {
            let rec = find(tx, vm)?;
            if !matches!(rec.runtime.state, VmState::Crashed | VmState::Exited) {
                return Err(conflict(&rec, "schedule a restart"));
            }
            if rec.desired_state != DesiredState::Running {
                return Err(conflict(
                    &rec,
                    "schedule a restart (its desired state is stopped)",
                ));
            }
            let attempt = rec.runtime.restart_count.saturating_add(1);
            let now = now_millis();
            tx.execute(
                "UPDATE vms SET restart_count = ?2, next_restart_at = ?3, updated_at = ?4 \
                 WHERE id = ?1",
                params![rec.id.as_str(), attempt, at, now],
            )?;
            insert_event(
                tx,
                Some(&rec.id),
                EventKind::Restarted,
                &json!({ "attempt": attempt, "at": at }),
                now,
            )?;
            find(tx, rec.id.as_str())
        })
    }

    /// Resets the restart count and cancels a scheduled restart (e.g. after the VM has run
    /// long enough for the back-off to start over).
    pub fn reset_restarts(&self, vm: &str) -> Result<VmRecord, StoreError> {
        self.write(|tx| {
            let rec = find(tx, vm)?;
            tx.execute(
                "UPDATE vms SET restart_count = 0, next_restart_at = NULL, updated_at = ?2 \
                 WHERE id = ?1",
                params![rec.id.as_str(), now_millis()],
            )?;
            find(tx, rec.id.as_str())
        })
    }

    /// Logs `adopted` for a VM whose VMM a restarted daemon found alive (detail: `pid`).
    /// The VM must be in a live state with a pid.
    pub fn record_adopted(&self, vm: &str) -> Result<EventId, StoreError> {
        self.write(|tx| {
            let rec = find(tx, vm)?;
            let Some(pid) = rec.runtime.pid.filter(|_| rec.runtime.state.is_live()) else {
                return Err(conflict(&rec, "adopt its VMM"));
            };
            insert_event(
                tx,
                Some(&rec.id),
                EventKind::Adopted,
                &json!({ "pid": pid, "control_socket": rec.runtime.control_socket }),
                now_millis(),
            )
        })
    }

    /// Deletes a VM and logs `deleted`. Refused while a VMM may exist (`starting`, `running`,
    /// `paused`, `stopping`) unless `force`. Returns the record as it was.
    pub fn delete(&self, vm: &str, force: bool) -> Result<VmRecord, StoreError> {
        self.write(|tx| {
            let rec = find(tx, vm)?;
            if rec.runtime.state.is_live() && !force {
                return Err(conflict(&rec, "delete it (stop it first, or force)"));
            }
            tx.execute("DELETE FROM vms WHERE id = ?1", [rec.id.as_str()])?;
            insert_event(
                tx,
                Some(&rec.id),
                EventKind::Deleted,
                &json!({
                    "name": rec.name,
                    "state": rec.runtime.state,
                    "forced": force && rec.runtime.state.is_live(),
                }),
                now_millis(),
            )?;
            Ok(rec)
        })
    }

    /// Appends an event (about `vm`, id or name, if given) and returns its id. State changes
    /// log their own events; this is for the rest.
    pub fn append_event(
        &self,
        vm: Option<&str>,
        kind: EventKind,
        detail: &Value,
    ) -> Result<EventId, StoreError> {
        self.write(|tx| {
            let id = vm.map(|vm| find(tx, vm).map(|r| r.id)).transpose()?;
            insert_event(tx, id.as_ref(), kind, detail, now_millis())
        })
    }

    /// Up to `limit` events with an id greater than `after`, oldest first. Start with 0.
    pub fn events_since(&self, after: EventId, limit: usize) -> Result<Vec<Event>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT id, at, vm_id, kind, detail FROM events WHERE id > ?1 ORDER BY id \
                 LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![after, limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, at, vm_id, kind, detail)| {
                    let corrupt = |reason: String| StoreError::Corrupt {
                        vm: format!("event {id}"),
                        reason,
                    };
                    Ok(Event {
                        id,
                        at,
                        vm_id: vm_id.map(VmId),
                        kind: from_column(&kind).map_err(|e| corrupt(format!("kind: {e}")))?,
                        detail: serde_json::from_str(&detail)
                            .map_err(|e| corrupt(format!("detail: {e}")))?,
                    })
                })
                .collect()
        })
    }

    /// The id of the newest event (0 when the log is empty).
    pub fn last_event_id(&self) -> Result<EventId, StoreError> {
        self.read(|tx| {
            Ok(tx.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
        })
    }

    /// Runs SQLite's `PRAGMA integrity_check`; returns the problems found (empty when sound).
    pub fn integrity_check(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction, or refuses a file that is not
/// ours or is newer.
fn migrate(conn: &mut Connection, db_path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let app_id: i32 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let has_versions: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND \
         name = 'schema_migrations')",
        [],
        |r| r.get(0),
    )?;
    let tables: i64 = tx.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        [],
        |r| r.get(0),
    )?;
    if (app_id != 0 && app_id != APPLICATION_ID) || (!has_versions && tables > 0) {
        return Err(StoreError::NotOurs(db_path.to_path_buf()));
    }
    let current: i64 = if has_versions {
        tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?
    } else {
        0
    };
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: db_path.to_path_buf(),
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, now_millis()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn schema_lists_every_enum_value() {
        let all: Vec<&str> = RestartPolicy::ALL
            .iter()
            .map(|v| v.as_str())
            .chain(DesiredState::ALL.iter().map(|v| v.as_str()))
            .chain(VmState::ALL.iter().map(|v| v.as_str()))
            .chain(EventKind::ALL.iter().map(|v| v.as_str()))
            .collect();
        for s in all {
            assert!(
                SCHEMA_V1.contains(&format!("'{s}'")) || SCHEMA_V4.contains(&format!("'{s}'")),
                "{s} missing"
            );
        }
        for s in EventKind::ALL {
            assert!(SCHEMA_V4.contains(&format!("'{s}'")), "{s} missing");
        }
        assert!(SCHEMA_V1.contains(&format!("application_id = {APPLICATION_ID}")));
    }

    /// A v3 database (as the previous release left it) keeps its VMs and events across the v4
    /// rebuild of `events`, with their ids; the id counter is carried over, so an id once given
    /// is never given again; the new kind is accepted.
    #[test]
    fn v3_events_survive_the_v4_rebuild() {
        let dir = std::env::temp_dir().join(format!("fv-store-v4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            let mut conn = Connection::open(dir.join("state.db")).unwrap();
            let tx = conn.transaction().unwrap();
            for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v <= 3) {
                tx.execute_batch(sql).unwrap();
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                    [version],
                )
                .unwrap();
            }
            for i in 0..5 {
                tx.execute(
                    "INSERT INTO events (at, vm_id, kind, detail) VALUES (?1, NULL, 'created', '{}')",
                    [i],
                )
                .unwrap();
            }
            // The two newest are gone: the counter, not MAX(id), must decide the next id.
            tx.execute("DELETE FROM events WHERE id > 3", []).unwrap();
            let bad = tx.execute(
                "INSERT INTO events (at, vm_id, kind, detail) VALUES (0, NULL, 'unconfined', '{}')",
                [],
            );
            assert!(bad.is_err(), "v3 must not know the new kind");
            tx.commit().unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let kept = store.events_since(0, 100).unwrap();
        assert_eq!(kept.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(kept[2].at, 2);
        let id = store
            .append_event(None, EventKind::Unconfined, &json!({"walls": ["seccomp"]}))
            .unwrap();
        assert_eq!(id, 6, "ids 4 and 5 were given once already");
        let conn = lock(&store.conn);
        let index: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'events_by_vm'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 1);
        drop(conn);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn enums_round_trip() {
        for p in RestartPolicy::ALL {
            assert_eq!(from_column::<RestartPolicy>(p.as_str()).ok(), Some(*p));
            assert_eq!(serde_json::to_value(p).ok(), Some(json!(p.as_str())));
        }
        for s in VmState::ALL {
            assert_eq!(from_column::<VmState>(s.as_str()).ok(), Some(*s));
        }
        assert!(matches!(
            from_column::<RestartPolicy>("sometimes"),
            Err(StoreError::Invalid {
                field: "restart_policy",
                ..
            })
        ));
    }

    #[test]
    fn names() {
        for ok in ["a", "web-1", "Web_1.prod", "0", &"x".repeat(63), "deadbeef"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            &"x".repeat(64),
            "-a",
            ".a",
            "a b",
            "a/b",
            "é",
            "a\0",
            "0123456789abcdef0123456789abcdef",
        ] {
            assert!(
                matches!(
                    validate_name(bad),
                    Err(StoreError::Invalid { field: "name", .. })
                ),
                "{bad:?}"
            );
        }
    }
}
