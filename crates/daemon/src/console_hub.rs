//! One VM's serial console, shared by every client attached through the API.
//!
//! The VMM serves its console on a Unix socket (`console.sock`) to one client at a time through
//! a `devices::console_socket::SocketConsole`: it always keeps its last 64 KiB of output and
//! replays them to each new client, and hangs up on a client that stops reading for a second
//! (it must not stall the guest's serial writes). So after a reconnect the hub receives again
//! up to 64 KiB it may already have (console.log and attached clients then see that stretch
//! twice); nothing is lost that fits the VMM's backlog. A [`ConsoleHub`] is
//! that one client, for the whole life of the VMM (reconnecting if it is hung up on): it always
//! reads, keeps the last [`HISTORY`] bytes (so an attaching user sees the recent output, e.g.
//! the login prompt), fans output out to every attached client (a slow one loses output, never
//! stalls the guest) and forwards their input.

use crate::sync::lock;
use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};

/// Bytes of console output kept for clients that attach later.
pub const HISTORY: usize = 64 * 1024;

/// A console log larger than this is cut down to its last [`HISTORY`] bytes when a hub starts.
const LOG_MAX: u64 = 4 * 1024 * 1024;

/// After this long without a connection to the VMM's console socket the hub logs a warning
/// (it keeps trying for as long as it lives).
const CONNECT_WARN_AFTER: Duration = Duration::from_secs(10);

/// The longest pause between two connection attempts.
const CONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A running hub; stops (and disconnects its clients) when dropped.
pub struct ConsoleHub {
    history: Arc<Mutex<VecDeque<u8>>>,
    // Weak: when the pump ends (the VMM went away), its sender is the last one and every
    // attached client sees the stream close.
    output: broadcast::WeakSender<Vec<u8>>,
    input: mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

/// One attached client's view of the console.
pub struct Attachment {
    /// The recent output, to replay first.
    pub history: Vec<u8>,
    /// Output from now on; closed when the VMM's console goes away.
    pub output: broadcast::Receiver<Vec<u8>>,
    /// Where to send input.
    pub input: mpsc::Sender<Vec<u8>>,
}

impl ConsoleHub {
    /// Starts a hub on the console socket at `path` (on `rt`). Output is also appended to
    /// `log` (the VM's `console.log`), whose tail seeds the history: a re-adopted VM's console
    /// still shows what its guest wrote before the daemon restarted.
    pub fn spawn(rt: &tokio::runtime::Handle, path: &Path, log: &Path) -> ConsoleHub {
        let mut seed = tail(log, HISTORY as u64);
        // Keep the log bounded: rewrite it with its tail once it is large.
        if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_MAX) {
            let _ = std::fs::write(log, &seed);
        }
        if seed.len() > HISTORY {
            seed.drain(..seed.len() - HISTORY);
        }
        let history = Arc::new(Mutex::new(VecDeque::from(seed)));
        let (output, _) = broadcast::channel(256);
        let (input, input_rx) = mpsc::channel(64);
        let weak = output.downgrade();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .map_err(|e| tracing::warn!("console log {}: {e}", log.display()))
            .ok();
        let task = rt.spawn(pump(
            path.to_path_buf(),
            history.clone(),
            output,
            input_rx,
            log,
        ));
        ConsoleHub {
            history,
            output: weak,
            input,
            task,
        }
    }

    /// Attaches one more client.
    pub fn attach(&self) -> Attachment {
        // Subscribe before copying the history, so no byte falls between the two.
        let output = match self.output.upgrade() {
            Some(tx) => tx.subscribe(),
            // Already ended: a receiver that is closed at once.
            None => broadcast::channel(1).1,
        };
        let history = lock(&self.history).iter().copied().collect();
        Attachment {
            history,
            output,
            input: self.input.clone(),
        }
    }
}

impl Drop for ConsoleHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to the console socket, trying until it answers: at a VMM's start the socket may
/// not be there yet, and after a lost connection the VMM accepts a new one. The hub lives as long
/// as the VMM (the manager drops it at the VMM's exit), which bounds the attempts.
async fn connect(path: &Path) -> tokio::net::UnixStream {
    let start = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    let mut warned = false;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return s,
            Err(e) => {
                if !warned && start.elapsed() >= CONNECT_WARN_AFTER {
                    tracing::warn!("console {}: {e} (still trying)", path.display());
                    warned = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(CONNECT_BACKOFF_MAX);
            }
        }
    }
}

/// The last `n` bytes of the file at `path` (empty when it cannot be read).
fn tail(path: &Path, n: u64) -> Vec<u8> {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(n)))?;
        let mut v = Vec::new();
        f.take(n).read_to_end(&mut v)?;
        Ok(v)
    };
    read().unwrap_or_default()
}

async fn pump(
    path: PathBuf,
    history: Arc<Mutex<VecDeque<u8>>>,
    output: broadcast::Sender<Vec<u8>>,
    mut input: mpsc::Receiver<Vec<u8>>,
    mut log: Option<std::fs::File>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let stream = connect(&path).await;
        let (mut rd, mut wr) = stream.into_split();
        // Serves one connection until it ends. The VMM drops a client whose socket stayed full
        // for a second (a daemon starved of CPU, a burst of output), keeping what it could not
        // send for the next one: connect again and carry on, or the VM's console would stay
        // dark for the rest of its life.
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    if let Some(f) = log.as_mut() {
                        // Small appends to a local file; a failing disk only loses the log.
                        if f.write_all(chunk).is_err() {
                            log = None;
                        }
                    }
                    {
                        let mut h = lock(&history);
                        h.extend(chunk.iter().copied());
                        let excess = h.len().saturating_sub(HISTORY);
                        h.drain(..excess);
                    }
                    // No receiver is fine: output is kept in the history only.
                    let _ = output.send(chunk.to_vec());
                }
                Some(bytes) = input.recv() => {
                    if wr.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::debug!("console {}: connection ended; reconnecting", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_fan_out_and_input() {
        let dir = std::env::temp_dir().join(format!("fv-hub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let sock = dir.join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let hub = ConsoleHub::spawn(rt.handle(), &sock, &dir.join("console.log"));
        let (mut vmm, _) = listener.accept().expect("hub connects");
        // More than the history holds: only the last HISTORY bytes stay.
        let big: Vec<u8> = (0..HISTORY + 1000).map(|i| (i % 251) as u8).collect();
        vmm.write_all(&big).expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hub.history.lock().expect("lock").len() < HISTORY
            || hub.history.lock().expect("lock").back() != big.last()
        {
            assert!(std::time::Instant::now() < deadline, "history never filled");
            std::thread::sleep(Duration::from_millis(10));
        }
        let a = hub.attach();
        assert_eq!(a.history.as_slice(), &big[big.len() - HISTORY..]);
        let mut out = a.output;
        vmm.write_all(b"live").expect("write");
        let got =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), out.recv()).await });
        assert_eq!(got.expect("in time").expect("open"), b"live");
        rt.block_on(a.input.send(b"typed".to_vec())).expect("send");
        let mut buf = [0u8; 5];
        vmm.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        vmm.read_exact(&mut buf).expect("input reaches the VMM");
        assert_eq!(&buf, b"typed");
        // The VMM drops the hub's connection (it does when the socket stays full for a second):
        // the hub connects again and the attached client goes on receiving.
        drop(vmm);
        let (mut vmm, _) = listener.accept().expect("hub reconnects");
        vmm.write_all(b"again").expect("write");
        let got =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), out.recv()).await });
        assert_eq!(got.expect("in time").expect("open"), b"again");
        // The VMM ends (the manager then drops its hub): attached clients see the end.
        drop(vmm);
        drop(hub);
        let end =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), out.recv()).await });
        assert!(matches!(
            end.expect("in time"),
            Err(broadcast::error::RecvError::Closed)
        ));
        // Everything went to the log too; a new hub starts from its tail.
        let log = std::fs::read(dir.join("console.log")).expect("log");
        assert_eq!(log.len(), big.len() + 4 + 5);
        let hub = ConsoleHub::spawn(rt.handle(), &sock, &dir.join("console.log"));
        assert_eq!(hub.attach().history.as_slice(), &log[log.len() - HISTORY..]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
