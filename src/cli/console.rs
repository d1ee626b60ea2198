//! `ferrovisor vm console`: the daemon's console relay (an upgraded HTTP connection carrying
//! the guest's serial console both ways) attached to this terminal or to stdin/stdout.
//!
//! Three threads at most feed one channel: console → stdout, stdin → console, and (on a
//! terminal) the signal watcher. The first to finish decides; the main thread then restores
//! the terminal (the raw-mode guard is dropped on every path: detach, close, error, signal,
//! panic unwinding) and returns.
//!
//! When stdin is not a terminal and ends (a script's input), the client does not half-close
//! the connection (the daemon ends the console when its client's input ends, and the answer to
//! that input would be lost): it keeps printing output until the console has been silent for
//! [`DRAIN_IDLE`], then closes.

use super::client::Client;
use anyhow::Context;
use std::io::{self, IsTerminal, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vmm::terminal::RawModeGuard;

/// Ctrl-]: detaches from a console on a terminal.
const DETACH: u8 = 0x1d;
/// Once stdin has ended (a script's input), how long the console may stay silent before the
/// client stops waiting for more output.
const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Why the session ended.
enum End {
    /// Ctrl-] on the terminal.
    Detached,
    /// The daemon closed the console (or the output was drained after stdin ended).
    Closed,
    /// Stdin ended (not an end yet: the output is drained first).
    InputEnded,
    /// A signal (terminal mode only).
    Signal(i32),
    /// An I/O error.
    Failed(io::Error),
}

/// Attaches to the console at `target` (`/v1/vms/{vm}/console`); `vm` names it in messages.
pub fn attach(client: &Client, target: &str, vm: &str, no_stdin: bool) -> anyhow::Result<u8> {
    let (stream, leftover) = client.console(target)?;
    let tty = !no_stdin && io::stdin().is_terminal();
    let (tx, rx) = mpsc::channel();

    let started = Instant::now();
    // When output was last written, in milliseconds since `started`.
    let last_output = Arc::new(AtomicU64::new(0));
    let reader = stream.try_clone().context("console connection")?;
    let out_tx = tx.clone();
    let seen = Arc::clone(&last_output);
    std::thread::spawn(move || {
        let mark = || seen.store(millis_since(started), Ordering::Relaxed);
        let end = match pump_out(reader, &leftover, mark) {
            Ok(()) => End::Closed,
            Err(e) => End::Failed(e),
        };
        let _ = out_tx.send(end);
    });

    let mut raw = None;
    if tty {
        raw = Some(RawModeGuard::new(0).context("putting the terminal in raw mode")?);
        watch_signals(tx.clone())?;
        eprint!("Connected to {vm}'s console; Ctrl-] to detach\r\n");
    }
    if !no_stdin {
        let writer = stream.try_clone().context("console connection")?;
        let in_tx = tx.clone();
        std::thread::spawn(move || {
            if let Some(end) = pump_in(writer, tty) {
                let _ = in_tx.send(end);
            }
        });
    }
    drop(tx);

    let mut input_ended_at = None;
    let end = loop {
        let Some(ended) = input_ended_at else {
            match rx.recv() {
                Ok(End::InputEnded) => input_ended_at = Some(millis_since(started)),
                Ok(end) => break end,
                Err(_) => break End::Closed,
            }
            continue;
        };
        let quiet_since = last_output.load(Ordering::Relaxed).max(ended);
        let idle = Duration::from_millis(millis_since(started).saturating_sub(quiet_since));
        if idle >= DRAIN_IDLE {
            break End::Closed;
        }
        match rx.recv_timeout(DRAIN_IDLE - idle) {
            Ok(End::InputEnded) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(end) => break end,
            Err(mpsc::RecvTimeoutError::Disconnected) => break End::Closed,
        }
    };
    drop(raw);
    let _ = stream.shutdown(Shutdown::Both);
    if tty {
        match end {
            End::Detached => eprintln!("\nDetached from {vm}'s console"),
            End::Closed => eprintln!("\n{vm}'s console was closed"),
            _ => {}
        }
    }
    match end {
        End::Detached | End::Closed | End::InputEnded => Ok(0),
        End::Signal(s) => Ok(u8::try_from(128 + s).unwrap_or(1)),
        End::Failed(e) => Err(e).context(format!("{vm}'s console")),
    }
}

/// On a terminal in raw mode the keys send no signals, but `kill` and a closed terminal do:
/// they end the session through the main thread, which restores the terminal.
fn watch_signals(tx: mpsc::Sender<End>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
        .context("installing signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = tx.send(End::Signal(sig));
        }
    });
    Ok(())
}

fn millis_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Console → stdout until the console closes or stdout's reader goes away; `mark` after each
/// write.
fn pump_out(mut console: UnixStream, leftover: &[u8], mark: impl Fn()) -> io::Result<()> {
    let mut out = io::stdout();
    let write = |out: &mut io::Stdout, b: &[u8]| -> io::Result<bool> {
        match out.write_all(b).and_then(|_| out.flush()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(e),
        }
    };
    if !leftover.is_empty() {
        if !write(&mut out, leftover)? {
            return Ok(());
        }
        mark();
    }
    let mut buf = [0u8; 8192];
    loop {
        let n = match console.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        };
        if !write(&mut out, &buf[..n])? {
            return Ok(());
        }
        mark();
    }
}

/// Stdin → console. On a terminal, Ctrl-] detaches. `None` when the console closed (the
/// output thread reports that).
fn pump_in(mut console: UnixStream, tty: bool) -> Option<End> {
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return Some(End::InputEnded),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Some(End::Failed(e)),
        };
        let chunk = &buf[..n];
        let detach_at = if tty {
            chunk.iter().position(|&b| b == DETACH)
        } else {
            None
        };
        let to_send = &chunk[..detach_at.unwrap_or(n)];
        if console.write_all(to_send).is_err() {
            // The daemon closed the console: the output thread, reading what is left, reports
            // it.
            return None;
        }
        if detach_at.is_some() {
            return Some(End::Detached);
        }
    }
}
