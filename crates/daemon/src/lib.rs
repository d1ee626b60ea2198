//! Ferrovisor's host daemon: its state store — VM definitions, desired and runtime state, and
//! the event log, in SQLite ([`store`]) — and its HTTP/JSON API on a Unix socket ([`api`]).
//! Process supervision is built on top of [`Store`].
#![deny(missing_docs)]

pub mod api;
pub mod error;
pub mod store;

pub use error::StoreError;
pub use store::{
    now_millis, proc_start_time, process_matches, validate_name, DesiredState, Event, EventId,
    EventKind, RestartPolicy, Runtime, Store, UnixMillis, VmId, VmRecord, VmState, SCHEMA_VERSION,
};
