//! Ferrovisor's host daemon: VM registry and event log in SQLite ([`store`]), the one function
//! that starts VMM processes ([`launcher`]) and their supervision ([`supervisor`]), and the
//! HTTP/JSON API on a Unix socket ([`api`]).
#![deny(missing_docs)]

pub mod api;
pub use jail::cgroup;
pub mod console_hub;
pub mod error;
pub mod launcher;
pub mod manager;
pub mod process;
pub mod server;
pub mod store;
pub mod supervisor;
mod sync;
pub mod tls;

pub use ::api::{DesiredState, EventKind, RestartPolicy, VmState};
pub use error::StoreError;
pub use process::{proc_start_time, process_matches};
pub use store::{
    now_millis, validate_name, Event, EventId, Runtime, Store, UnixMillis, VmId, VmRecord,
    SCHEMA_VERSION,
};
