//! Where the console's output goes: nowhere, a file, or the socket console (and its client's
//! input on its way to the guest).

use super::ConsoleMetrics;
use crate::console_socket::SocketConsole;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;

/// The socket side of the console.
pub(super) struct SocketSink {
    /// The backlog, the listener and the client.
    pub(super) console: SocketConsole,
    /// Input read from the client, not yet in guest buffers.
    pub(super) pending_in: Vec<u8>,
}

impl SocketSink {
    /// Adds what the socket console counted to the device's counters.
    pub(super) fn count(&mut self, metrics: &ConsoleMetrics) {
        let c = self.console.take_counters();
        metrics.errors.fetch_add(c.errors, Ordering::Relaxed);
        metrics
            .dropped_bytes
            .fetch_add(c.dropped_bytes, Ordering::Relaxed);
    }
}

pub(super) enum Sink {
    Null,
    File(File),
    Socket(SocketSink),
}

impl Sink {
    /// Takes guest output (a socket console sends it on its next flush).
    pub(super) fn output(&mut self, data: &[u8], metrics: &ConsoleMetrics) {
        match self {
            Sink::Null => {}
            Sink::File(f) => {
                if let Err(e) = f.write_all(data) {
                    tracing::debug!("console output file: {e}");
                    metrics.error();
                }
            }
            Sink::Socket(s) => s.console.output(data),
        }
    }
}
