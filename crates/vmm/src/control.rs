//! The VMM's control socket (`ferrovisor run --control PATH`): one JSON request per line, one
//! JSON answer per line. It is how a supervisor (the host daemon, `ferrovisor ctl`) asks a
//! running VMM for its state and counters and changes it (pause, resume, stop, shutdown, balloon
//! size).
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"stats"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`,
//! `{"cmd":"stop"}`, `{"cmd":"shutdown"}`, `{"cmd":"balloon","size":"256M"}`. Answers:
//! `{"ok":true,...}` or `{"ok":false,"error":"..."}`. The socket is created mode 0600.
//!
//! `shutdown` presses the ACPI power button and answers at once (`"state":"shutting-down"`);
//! a guest that handles the button powers off through ACPI S5 and the VMM exits 0. A guest that
//! ignores it keeps running: the supervisor's timeout, then `stop`, ends it.

use crate::config::ByteSize;
use crate::cpu::{ExitCounts, VcpuStats};
use crate::vm::VmEvent;
use devices::virtio::balloon::BalloonControl;
use devices::virtio::Metrics;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A change of run state the VM's main loop carries out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Park every vCPU.
    Pause,
    /// Let them run again.
    Resume,
    /// Stop the VM (the process exits 0).
    Stop,
    /// Press the ACPI power button; the guest decides what to do (normally: power off).
    Shutdown,
}

/// An [`Action`] with where to send its outcome.
#[derive(Debug)]
pub struct ActionRequest {
    /// What to do.
    pub action: Action,
    /// Ok(new state) or Err(why not).
    pub reply: Sender<Result<&'static str, String>>,
}

/// A virtio device as the monitoring side sees it.
pub struct DeviceEntry {
    /// `block`, `net`, `vsock`, `rng`, `balloon`, `console`.
    pub kind: &'static str,
    /// Its id (`--disk id=`), or kind + index.
    pub id: String,
    /// Its counters.
    pub metrics: Option<Arc<dyn Metrics>>,
}

/// What the control thread reads.
pub struct ControlState {
    /// When the VM started running.
    pub started: Instant,
    /// vCPU count.
    pub cpus: u32,
    /// Guest memory bytes.
    pub memory: u64,
    /// Per-vCPU exit counters.
    pub vcpu_stats: Vec<Arc<VcpuStats>>,
    /// Devices and their counters.
    pub devices: Vec<DeviceEntry>,
    /// The balloon, when there is one.
    pub balloon: Option<BalloonControl>,
    /// Where run-state changes go (the VM's main loop).
    pub events: Sender<VmEvent>,
    /// Current run state, shared with the main loop.
    pub paused: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the power button was pressed (`shutdown`).
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Status,
    Stats,
    Pause,
    Resume,
    Stop,
    Shutdown,
    Balloon { size: ByteSize },
}

/// The listening socket; removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (which must not exist) and serves it on a thread.
pub fn serve(path: &Path, state: ControlState) -> std::io::Result<ControlSocket> {
    if path.symlink_metadata().is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "control socket {}: the path already exists; remove it or choose another",
                path.display()
            ),
        ));
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("control socket {}: {e}", path.display()))
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let state = Arc::new(state);
    std::thread::Builder::new()
        .name("fv-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let state = state.clone();
                        let _ = std::thread::Builder::new()
                            .name("fv-control-conn".into())
                            .spawn(move || serve_conn(stream, &state));
                    }
                    Err(e) => tracing::warn!("control socket accept: {e}"),
                }
            }
        })?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
    })
}

fn serve_conn(stream: UnixStream, state: &ControlState) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = std::io::BufWriter::new(write_half);
    let mut reader = BufReader::new(stream).take(u64::MAX);
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(MAX_REQUEST as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() > MAX_REQUEST {
            json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")})
        } else {
            handle_line(&line, state)
        };
        let mut text = answer.to_string();
        text.push('\n');
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
        if line.len() > MAX_REQUEST {
            return;
        }
    }
}

/// Answers one request line.
pub fn handle_line(line: &[u8], state: &ControlState) -> Value {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return json!({"ok": false, "error": "empty request; send one JSON object per line, e.g. {\"cmd\":\"status\"}"});
    }
    let req: Request = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match req {
        Request::Status => status(state),
        Request::Stats => stats(state),
        Request::Pause => action(state, Action::Pause),
        Request::Resume => action(state, Action::Resume),
        Request::Stop => action(state, Action::Stop),
        Request::Shutdown => action(state, Action::Shutdown),
        Request::Balloon { size } => match &state.balloon {
            None => {
                json!({"ok": false, "error": "this VM has no balloon (start it with --balloon)"})
            }
            Some(_) if size.0 >= state.memory => json!({"ok": false, "error": format!(
                "size: {size} is not smaller than the guest's memory ({})", ByteSize(state.memory))}),
            Some(b) => {
                b.set_target_bytes(size.0);
                json!({"ok": true, "target": size.0, "actual": b.actual_bytes()})
            }
        },
    }
}

fn run_state(state: &ControlState) -> &'static str {
    if state.paused.load(std::sync::atomic::Ordering::SeqCst) {
        "paused"
    } else if state
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        "shutting-down"
    } else {
        "running"
    }
}

fn status(state: &ControlState) -> Value {
    json!({
        "ok": true,
        "state": run_state(state),
        "pid": std::process::id(),
        "uptime_ms": state.started.elapsed().as_millis() as u64,
        "cpus": state.cpus,
        "memory": state.memory,
    })
}

/// The VMM process's resident set size in bytes (guest RAM it touched included).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}

/// Exit counters as JSON.
pub fn exits_json(e: &ExitCounts) -> Value {
    json!({
        "total": e.total(), "io_in": e.io_in, "io_out": e.io_out,
        "mmio_read": e.mmio_read, "mmio_write": e.mmio_write,
        "unhandled_pio": e.unhandled_pio, "unhandled_mmio": e.unhandled_mmio,
        "hlt": e.hlt, "interrupted": e.interrupted, "other": e.other,
    })
}

fn stats(state: &ControlState) -> Value {
    let vcpus: Vec<Value> = state
        .vcpu_stats
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"vcpu": i, "exits": exits_json(&s.snapshot())}))
        .collect();
    let devices: Vec<Value> = state
        .devices
        .iter()
        .map(|d| {
            let counters: serde_json::Map<String, Value> = d
                .metrics
                .as_ref()
                .map(|m| {
                    m.counters()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), json!(v)))
                        .collect()
                })
                .unwrap_or_default();
            json!({"type": d.kind, "id": d.id, "counters": counters})
        })
        .collect();
    let balloon = state.balloon.as_ref().map(|b| {
        let s = b.stats();
        json!({
            "target": b.target_bytes(),
            "actual": b.actual_bytes(),
            "guest": {
                "swap_in": s.swap_in, "swap_out": s.swap_out,
                "major_faults": s.major_faults, "minor_faults": s.minor_faults,
                "free_memory": s.free_memory, "total_memory": s.total_memory,
                "available_memory": s.available_memory, "disk_caches": s.disk_caches,
            }
        })
    });
    json!({
        "ok": true,
        "state": run_state(state),
        "uptime_ms": state.started.elapsed().as_millis() as u64,
        "rss_bytes": rss_bytes(),
        "vcpus": vcpus,
        "devices": devices,
        "balloon": balloon,
    })
}

fn action(state: &ControlState, action: Action) -> Value {
    let (tx, rx) = channel();
    if state
        .events
        .send(VmEvent::Control(ActionRequest { action, reply: tx }))
        .is_err()
    {
        return json!({"ok": false, "error": "the VM is stopping"});
    }
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(new_state)) => json!({"ok": true, "state": new_state}),
        Ok(Err(e)) => json!({"ok": false, "error": e}),
        Err(_) => json!({"ok": false, "error": "the VM did not answer within 10 s"}),
    }
}

/// Sends one request to the control socket at `path` and returns the answer (for `ferrovisor
/// ctl` and tests).
pub fn request(path: &Path, request: &Value) -> std::io::Result<Value> {
    let stream = UnixStream::connect(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = stream.try_clone()?;
    let mut text = request.to_string();
    text.push('\n');
    w.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
