//! The daemon's error type.

use api::VmState;
use std::path::PathBuf;

/// Everything a [`Store`](crate::store::Store) operation can fail with. The first four are the
/// caller's mistakes (the HTTP layer maps them to 409/404/400/409); nothing was changed in the
/// store when one of them is returned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another VM already has this name.
    #[error("a VM named {0:?} already exists")]
    NameTaken(String),
    /// No VM has this id or name.
    #[error("no VM with id or name {0:?}")]
    NotFound(String),
    /// A value that is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which input.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The VM's current state does not allow the action.
    #[error("VM {vm} is {state}: cannot {action}")]
    Conflict {
        /// The VM's name.
        vm: String,
        /// Its current state.
        state: VmState,
        /// What was asked.
        action: &'static str,
    },
    /// The database was written by a newer Ferrovisor.
    #[error(
        "state database {path}: schema version {found} is newer than this Ferrovisor supports \
         ({supported}); run the newer version or restore a backup"
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The file is an SQLite database, but not a Ferrovisor state store.
    #[error(
        "{0}: not a Ferrovisor state database (it has other tables or another application id)"
    )]
    NotOurs(PathBuf),
    /// Another process (another daemon) has the state directory open.
    #[error("state directory {0}: in use by another ferrovisor daemon")]
    Locked(PathBuf),
    /// A stored row that does not parse (edited by hand, or written by an incompatible build).
    #[error("stored VM {vm}: {reason}")]
    Corrupt {
        /// The VM's id, or the table and row.
        vm: String,
        /// What does not parse.
        reason: String,
    },
    /// Creating or opening the state directory or its files.
    #[error("state directory {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An SQLite error (disk full, I/O error, a corrupt file, …).
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}
