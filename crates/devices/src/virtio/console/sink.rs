//! Where the console's output goes: nowhere, a file, or the socket and its client.

use super::{ConsoleMetrics, MAX_PENDING_OUTPUT, SCROLLBACK};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;

/// Appends `data` to `q`, keeping at most `cap` bytes (the newest); returns how many were dropped.
pub(super) fn push_bounded(q: &mut VecDeque<u8>, data: &[u8], cap: usize) -> usize {
    let data = data.get(data.len().saturating_sub(cap)..).unwrap_or(data);
    let mut dropped = 0;
    let over = (q.len() + data.len()).saturating_sub(cap);
    if over > 0 {
        q.drain(..over.min(q.len()));
        dropped = over;
    }
    q.extend(data);
    dropped
}

/// The socket side of the console.
pub(super) struct SocketSink {
    pub(super) listener: UnixListener,
    pub(super) client: Option<UnixStream>,
    /// The last output, replayed to a new client.
    pub(super) history: VecDeque<u8>,
    /// Output not yet written to the client.
    pub(super) pending_out: VecDeque<u8>,
    /// Input read from the client, not yet in guest buffers.
    pub(super) pending_in: Vec<u8>,
}

impl SocketSink {
    pub(super) fn disconnect(&mut self) {
        if self.client.take().is_some() {
            tracing::debug!("console client disconnected");
        }
        self.pending_out.clear();
    }

    /// Writes as much pending output as the client takes without blocking.
    pub(super) fn flush(&mut self, metrics: &ConsoleMetrics) {
        while let Some(client) = &self.client {
            let (chunk, _) = self.pending_out.as_slices();
            if chunk.is_empty() {
                return;
            }
            // SAFETY: send reads at most `chunk.len()` bytes from the valid slice `chunk`;
            // MSG_NOSIGNAL turns a closed peer into EPIPE instead of a process-wide SIGPIPE.
            let r = unsafe {
                libc::send(
                    client.as_raw_fd(),
                    chunk.as_ptr().cast(),
                    chunk.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ => {
                        tracing::debug!("console client write: {e}");
                        if e.kind() != io::ErrorKind::BrokenPipe {
                            metrics.error();
                        }
                        self.disconnect();
                        return;
                    }
                }
            }
            self.pending_out
                .drain(..(r as usize).min(self.pending_out.len()));
        }
    }
}

pub(super) enum Sink {
    Null,
    File(File),
    Socket(SocketSink),
}

impl Sink {
    pub(super) fn output(&mut self, data: &[u8], metrics: &ConsoleMetrics) {
        match self {
            Sink::Null => {}
            Sink::File(f) => {
                if let Err(e) = f.write_all(data) {
                    tracing::debug!("console output file: {e}");
                    metrics.error();
                }
            }
            Sink::Socket(s) => {
                push_bounded(&mut s.history, data, SCROLLBACK);
                if s.client.is_some() {
                    let dropped = push_bounded(&mut s.pending_out, data, MAX_PENDING_OUTPUT);
                    metrics
                        .dropped_bytes
                        .fetch_add(dropped as u64, Ordering::Relaxed);
                }
            }
        }
    }
}
