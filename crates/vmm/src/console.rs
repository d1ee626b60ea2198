//! Serial console backends: where COM1's output goes and where its input comes from.

use crate::event::VmEvent;
use crate::terminal::{is_tty, RawModeGuard};
use config::SerialConfig;
use devices::console_socket::{self, SocketConsole};
use devices::legacy::Serial;
use devices::sync::lock;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Ctrl-A: the console escape key on a terminal (`Ctrl-A x` quits, `Ctrl-A c` sends a Ctrl-C to
/// the guest, `Ctrl-A Ctrl-A` sends a Ctrl-A).
pub const ESCAPE: u8 = 0x01;
/// Ctrl-C: on a terminal it stops the VM, like SIGINT would in cooked mode.
pub const CTRL_C: u8 = 0x03;

/// Output kept for socket clients: the last 64 KiB, replayed to every new client (the guest's
/// boot messages for the first one, e.g. the host daemon's console hub). The socket backend is a
/// [`SocketConsole`], as virtio-console's: see [`devices::console_socket`] for its behaviour
/// (output never blocks a vCPU, a client that stops reading is hung up on).
pub const SOCKET_BACKLOG: usize = console_socket::BACKLOG;

type SharedStream = Arc<Mutex<SocketConsole>>;

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
                // Never blocks: what the client's socket does not take waits for the
                // socket thread (woken through the console's wake event).
                let mut console = lock(s);
                console.output(buf);
                console.flush();
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
    /// The socket backend and the event that wakes its thread.
    socket: Option<(SharedStream, EventFd)>,
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
            socket: None,
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
                let err = |source| ConsoleError::Socket {
                    path: path.clone(),
                    source,
                };
                let wake = EventFd::new(EFD_NONBLOCK).map_err(err)?;
                let thread_wake = wake.try_clone().map_err(err)?;
                let mut console = SocketConsole::bind(path).map_err(err)?;
                c.socket_path = Some(path.clone());
                console.set_wake(wake);
                let console = Arc::new(Mutex::new(console));
                c.socket = Some((console.clone(), thread_wake));
                Output::Socket(console)
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
                if let Some((console, wake)) = self.socket.take() {
                    spawn("fv-serial-sock", move || {
                        serve_socket(&console, &wake, &serial)
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
        .spawn(move || {
            jail::seccomp::apply_or_abort(jail::seccomp::ThreadKind::EventLoop);
            f()
        })
        .map(|_| ())
}

/// The socket backend's thread: accepts clients (one at a time), sends the output vCPUs left
/// queued when a client's socket was full, and feeds the client's input into the UART's receive
/// FIFO, waiting for room there (the client's further input waits in its socket meanwhile).
fn serve_socket(console: &Mutex<SocketConsole>, wake: &EventFd, serial: &Mutex<Serial>) {
    let mut buf = [0u8; 256];
    let mut input: Vec<u8> = Vec::new();
    loop {
        if !input.is_empty() {
            let k = lock(serial).enqueue_input(&input).unwrap_or(0);
            input.drain(..k.min(input.len()));
        }
        let waiting = !input.is_empty();
        // The guest reading the FIFO raises no event: while it is full, look again every 2 ms.
        let timeout = waiting.then_some(Duration::from_millis(2));
        if let Err(e) = console_socket::wait(console, wake, !waiting, timeout) {
            tracing::warn!("serial socket: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Never the UART's lock while holding the console's: a vCPU takes them the other way.
        let mut c = lock(console);
        c.accept();
        c.flush();
        if !waiting {
            let n = c.read_input(&mut buf);
            input.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
    }
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
            let k = lock(serial).enqueue_input(&data[pos..]).unwrap_or(0);
            pos += k;
            if k == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}
