//! Serial console backends: where COM1's output goes and where its input comes from.

use crate::event::VmEvent;
use crate::terminal::{is_tty, RawModeGuard};
use config::SerialConfig;
use devices::legacy::Serial;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Ctrl-A: the console escape key on a terminal (`Ctrl-A x` quits, `Ctrl-A c` sends a Ctrl-C to
/// the guest, `Ctrl-A Ctrl-A` sends a Ctrl-A).
pub const ESCAPE: u8 = 0x01;
/// Ctrl-C: on a terminal it stops the VM, like SIGINT would in cooked mode.
pub const CTRL_C: u8 = 0x03;

/// Output kept while no socket client is connected (the guest's early boot messages, for the
/// first client, e.g. the host daemon's console hub).
pub const SOCKET_BACKLOG: usize = 64 * 1024;

/// How long a write to a socket client may block before the client is dropped (a client that
/// stops reading must not stall the vCPU writing to the UART).
const SOCKET_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The socket backend's client and the output kept while there is none.
#[derive(Default)]
struct SocketOut {
    client: Option<UnixStream>,
    backlog: std::collections::VecDeque<u8>,
}

impl SocketOut {
    fn keep(&mut self, buf: &[u8]) {
        self.backlog.extend(buf.iter().copied());
        let excess = self.backlog.len().saturating_sub(SOCKET_BACKLOG);
        self.backlog.drain(..excess);
    }

    /// A new client: it gets the backlog first.
    fn connect(&mut self, mut client: UnixStream) {
        let _ = client.set_write_timeout(Some(SOCKET_WRITE_TIMEOUT));
        let (a, b) = self.backlog.as_slices();
        if client
            .write_all(a)
            .and_then(|_| client.write_all(b))
            .is_ok()
        {
            self.backlog.clear();
            self.client = Some(client);
        } else {
            hang_up(&client);
        }
    }
}

/// Ends a socket client's connection both ways: the thread reading its input sees the end (it
/// holds a clone of the socket, so dropping ours would not close it) and so does the client.
fn hang_up(stream: &UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

type SharedStream = Arc<Mutex<SocketOut>>;

/// The output half, handed to the UART.
enum Output {
    Stdout,
    File(File),
    Socket(SharedStream),
    Null,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
            }
            Output::File(f) => f.write_all(buf)?,
            Output::Socket(s) => {
                let mut guard = s.lock().unwrap_or_else(|e| e.into_inner());
                let sent = match guard.client.as_mut() {
                    Some(stream) => stream.write_all(buf).is_ok(),
                    None => false,
                };
                if !sent {
                    // No client, or it went away (or stopped reading): keep the output for
                    // the next one. A client that stopped reading is hung up on, so that it
                    // sees the end (and may connect again) and the listener accepts the next.
                    if let Some(stream) = guard.client.take() {
                        hang_up(&stream);
                    }
                    guard.keep(buf);
                }
            }
            Output::Null => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An opened console backend.
pub struct Console {
    config: SerialConfig,
    output: Option<Output>,
    listener: Option<UnixListener>,
    socket_stream: SharedStream,
    raw: Option<RawModeGuard>,
    socket_path: Option<PathBuf>,
}

/// Errors opening a console backend.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file cannot be opened.
    #[error("serial output file {path}: {source}")]
    File {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The socket cannot be created.
    #[error("serial socket {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl Console {
    /// Opens the backend (creates the file or the listening socket).
    pub fn open(config: &SerialConfig) -> Result<Console, ConsoleError> {
        let mut c = Console {
            config: config.clone(),
            output: None,
            listener: None,
            socket_stream: Arc::new(Mutex::new(SocketOut::default())),
            raw: None,
            socket_path: None,
        };
        c.output = Some(match config {
            SerialConfig::Stdio => Output::Stdout,
            SerialConfig::Null => Output::Null,
            SerialConfig::File(path) => Output::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::File {
                        path: path.clone(),
                        source,
                    })?,
            ),
            SerialConfig::Socket(path) => {
                let l = UnixListener::bind(path).map_err(|source| ConsoleError::Socket {
                    path: path.clone(),
                    source,
                })?;
                c.socket_path = Some(path.clone());
                c.listener = Some(l);
                Output::Socket(c.socket_stream.clone())
            }
        });
        Ok(c)
    }

    /// Whether the guest should be told to use the serial console (`console=ttyS0`).
    pub fn wants_kernel_console(&self) -> bool {
        self.config != SerialConfig::Null
    }

    /// The writer for the UART (can be taken once).
    pub fn take_output(&mut self) -> Box<dyn Write + Send> {
        Box::new(self.output.take().unwrap_or(Output::Null))
    }

    /// Starts feeding input into `serial` (from the terminal or socket clients). On a terminal,
    /// switches it to raw mode until the console is dropped; Ctrl-C and `Ctrl-A x` send
    /// [`VmEvent::UserQuit`].
    pub fn start_input(
        &mut self,
        serial: Arc<Mutex<Serial>>,
        events: Sender<VmEvent>,
    ) -> io::Result<()> {
        match self.config {
            SerialConfig::Stdio => {
                let tty = is_tty(0);
                if tty {
                    self.raw = Some(RawModeGuard::new(0)?);
                }
                spawn("fv-serial-in", move || {
                    let stdin = io::stdin();
                    pump(stdin.lock(), &serial, tty.then_some(&events));
                })?;
            }
            SerialConfig::Socket(_) => {
                if let Some(listener) = self.listener.take() {
                    let shared = self.socket_stream.clone();
                    spawn("fv-serial-sock", move || {
                        for client in listener.incoming() {
                            let Ok(client) = client else { continue };
                            let Ok(reader) = client.try_clone() else {
                                continue;
                            };
                            shared
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .connect(client);
                            // One client at a time: serve it until it hangs up.
                            pump(reader, &serial, None);
                            shared.lock().unwrap_or_else(|e| e.into_inner()).client = None;
                        }
                    })?;
                }
            }
            SerialConfig::File(_) | SerialConfig::Null => {}
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.raw.take();
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
}

/// Copies `input` into the UART's receive FIFO, waiting for room when it is full. With
/// `escape_events`, interprets the `Ctrl-A` escape.
fn pump(mut input: impl Read, serial: &Mutex<Serial>, escape_events: Option<&Sender<VmEvent>>) {
    let mut buf = [0u8; 256];
    let mut escaped = false;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut data: Vec<u8> = Vec::with_capacity(n);
        for &b in &buf[..n] {
            match (escape_events, escaped, b) {
                (Some(_), false, ESCAPE) => escaped = true,
                (Some(ev), false, CTRL_C) | (Some(ev), true, b'x' | b'X') => {
                    let _ = ev.send(VmEvent::UserQuit);
                    return;
                }
                (Some(_), true, b'c' | b'C') => {
                    escaped = false;
                    data.push(CTRL_C);
                }
                (Some(_), true, _) => {
                    escaped = false;
                    data.push(b);
                }
                _ => data.push(b),
            }
        }
        let mut pos = 0;
        while pos < data.len() {
            let k = serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(&data[pos..])
                .unwrap_or(0);
            pos += k;
            if k == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
