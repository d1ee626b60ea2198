//! Ferrovisor's host daemon: VM registry, process supervision, store, metrics, HTTP server.
#![deny(missing_docs)]

pub mod launcher;
pub mod supervisor;
