//! The VMM control protocol: what a supervisor (the daemon, `ferrovisor ctl`) asks one running
//! VMM, and what it answers. One type of each, used by both processes: the VMM handles every
//! [`VmCommand`] in one place (its VM loop) and answers a [`VmResponse`] or a refusal; the
//! daemon sends typed commands and gets typed answers.
//!
//! # Wire format
//!
//! A Unix stream socket (`ferrovisor run --control PATH`, mode 0600), one JSON object per line
//! each way:
//!
//! ```text
//! → {"cmd":"status"}     ← {"ok":true,"state":"running","pid":1234,"uptime_ms":5000,"cpus":2,"memory":536870912}
//! → {"cmd":"stats"}      ← {"ok":true,"state":"running","uptime_ms":...,"rss_bytes":...,"vcpus":[...],"devices":[...],"balloon":null}
//! → {"cmd":"pause"}      ← {"ok":true,"state":"paused"}          (also resume, stop, shutdown)
//! → {"cmd":"balloon","size":"256M"}  ← {"ok":true,"target":268435456,"actual":0}
//! any refusal            ← {"ok":false,"error":"why"}
//! ```
//!
//! `shutdown` presses the ACPI power button and answers at once (`"state":"shutting-down"`); a
//! guest that handles the button powers off and the VMM exits 0. A guest that ignores it keeps
//! running: the supervisor's timeout, then `stop`, ends it. Room is left for `snapshot` and
//! `restore` (new variants; old peers refuse them with an error, never by misreading them).

use crate::{DeviceStats, VcpuStats};
use config::ByteSize;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use utoipa::ToSchema;

/// Longest request line a VMM accepts.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Longest answer line a client reads.
pub const MAX_ANSWER: usize = 4 << 20;

/// How long [`send`] waits for an answer by default (a pause parks every vCPU first).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One command to a running VMM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum VmCommand {
    /// Run state, pid, uptime, size.
    Status,
    /// Counters: vCPU exits, devices, RSS, balloon.
    Stats,
    /// Park every vCPU.
    Pause,
    /// Let them run again.
    Resume,
    /// End the VM now (the VMM exits 0).
    Stop,
    /// Press the ACPI power button; the guest decides (normally: it powers off).
    Shutdown,
    /// Set the balloon's target size (memory taken from the guest).
    Balloon {
        /// The new target: `"256M"` or bytes.
        size: ByteSize,
    },
}

impl VmCommand {
    /// Its wire name (`status`, `pause`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            VmCommand::Status => "status",
            VmCommand::Stats => "stats",
            VmCommand::Pause => "pause",
            VmCommand::Resume => "resume",
            VmCommand::Stop => "stop",
            VmCommand::Shutdown => "shutdown",
            VmCommand::Balloon { .. } => "balloon",
        }
    }
}

/// The VM's run state as its VMM sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
    /// The power button was pressed; the guest has not powered off yet.
    ShuttingDown,
    /// The VM is ending (the answer to `stop`).
    Stopped,
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Run state.
    pub state: RunState,
    /// The VMM's pid (as the VMM sees it).
    pub pid: u32,
    /// Milliseconds since the vCPUs started.
    pub uptime_ms: u64,
    /// vCPU count.
    pub cpus: u32,
    /// Guest memory, bytes.
    pub memory: u64,
}

/// The guest's own memory statistics, as its balloon driver last reported them (each null
/// until reported).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BalloonGuestStats {
    /// Bytes swapped in.
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    pub swap_out: Option<u64>,
    /// Major page faults.
    pub major_faults: Option<u64>,
    /// Minor page faults.
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    pub disk_caches: Option<u64>,
}

/// A balloon's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BalloonStats {
    /// Target size, bytes (what the host asks the guest to give back).
    pub target: u64,
    /// What the guest has given back, bytes.
    pub actual: u64,
    /// The guest's memory statistics.
    pub guest: BalloonGuestStats,
}

/// The answer to `balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonTarget {
    /// The new target, bytes.
    pub target: u64,
    /// What the guest has given back so far, bytes.
    pub actual: u64,
}

/// The answer to `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmmStats {
    /// Run state.
    pub state: RunState,
    /// Milliseconds since the vCPUs started.
    pub uptime_ms: u64,
    /// The VMM process's resident memory (guest RAM it touched included).
    pub rss_bytes: Option<u64>,
    /// Per vCPU: exits by reason (`cpu_time_ms` is left to the supervisor, which reads /proc).
    pub vcpus: Vec<VcpuStats>,
    /// Per virtio device: its counters.
    pub devices: Vec<DeviceStats>,
    /// The balloon, when there is one.
    pub balloon: Option<BalloonStats>,
}

/// What a VMM answers a command it carried out.
#[derive(Clone, Debug, PartialEq)]
pub enum VmResponse {
    /// To `status`.
    Status(VmStatus),
    /// To `stats`.
    Stats(Box<VmmStats>),
    /// To `pause`, `resume`, `stop`, `shutdown`: the state it is in now.
    State(RunState),
    /// To `balloon`.
    Balloon(BalloonTarget),
}

/// A command's outcome: carried out, or refused with the reason (a paused VM cannot see the
/// power button, there is no balloon, ...).
pub type VmReply = Result<VmResponse, String>;

#[derive(Serialize, Deserialize)]
struct StateOnly {
    state: RunState,
}

fn object<T: Serialize>(v: &T) -> Map<String, Value> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// The answer line for `reply` (without the newline).
pub fn encode_reply(reply: &VmReply) -> String {
    let mut m = match reply {
        Ok(VmResponse::Status(s)) => object(s),
        Ok(VmResponse::Stats(s)) => object(s.as_ref()),
        Ok(VmResponse::State(state)) => object(&StateOnly { state: *state }),
        Ok(VmResponse::Balloon(b)) => object(b),
        Err(e) => {
            let mut m = Map::new();
            m.insert("error".into(), Value::String(e.clone()));
            m
        }
    };
    m.insert("ok".into(), Value::Bool(reply.is_ok()));
    Value::Object(m).to_string()
}

/// Reads the answer `line` to `cmd`: `Ok(Err(reason))` is the VMM's refusal, `Err` an answer
/// that is not one (malformed, or of the wrong shape for `cmd`).
pub fn decode_reply(cmd: &VmCommand, line: &str) -> Result<VmReply, String> {
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("malformed answer: {e}"))?;
    let bad = |e: serde_json::Error| format!("answer to {} of the wrong shape: {e}", cmd.name());
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => {}
        Some(false) => {
            let why = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            return Ok(Err(why.to_string()));
        }
        None => return Err(format!("answer without \"ok\": {v}")),
    }
    let resp = match cmd {
        VmCommand::Status => VmResponse::Status(serde_json::from_value(v).map_err(bad)?),
        VmCommand::Stats => VmResponse::Stats(serde_json::from_value(v).map_err(bad)?),
        VmCommand::Balloon { .. } => VmResponse::Balloon(serde_json::from_value(v).map_err(bad)?),
        VmCommand::Pause | VmCommand::Resume | VmCommand::Stop | VmCommand::Shutdown => {
            let s: StateOnly = serde_json::from_value(v).map_err(bad)?;
            VmResponse::State(s.state)
        }
    };
    Ok(Ok(resp))
}

/// Why [`send`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached, or the connection failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The VMM answered something that is not an answer.
    #[error("control socket {path}: {reason}")]
    BadAnswer {
        /// The socket.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Sends `cmd` to the VMM whose control socket is `path` and waits up to `timeout` for its
/// answer. The outer error: no answer; the inner one: the VMM's refusal.
pub fn send(path: &Path, cmd: &VmCommand, timeout: Duration) -> Result<VmReply, ControlError> {
    let io = |source: std::io::Error| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(cmd).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    let mut reader = BufReader::new(std::io::Read::take(&stream, MAX_ANSWER as u64));
    reader.read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ControlError::BadAnswer {
            path: path.display().to_string(),
            reason: "the VMM closed the connection without answering".into(),
        });
    }
    decode_reply(cmd, &answer).map_err(|reason| ControlError::BadAnswer {
        path: path.display().to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn commands_keep_their_wire_names() {
        let cases = [
            (VmCommand::Status, r#"{"cmd":"status"}"#),
            (VmCommand::Stats, r#"{"cmd":"stats"}"#),
            (VmCommand::Pause, r#"{"cmd":"pause"}"#),
            (VmCommand::Resume, r#"{"cmd":"resume"}"#),
            (VmCommand::Stop, r#"{"cmd":"stop"}"#),
            (VmCommand::Shutdown, r#"{"cmd":"shutdown"}"#),
        ];
        for (cmd, text) in cases {
            assert_eq!(serde_json::to_string(&cmd).unwrap(), text);
            assert_eq!(serde_json::from_str::<VmCommand>(text).unwrap(), cmd);
            assert_eq!(format!(r#"{{"cmd":"{}"}}"#, cmd.name()), text);
        }
        let b: VmCommand = serde_json::from_str(r#"{"cmd":"balloon","size":"256M"}"#).unwrap();
        assert_eq!(
            b,
            VmCommand::Balloon {
                size: ByteSize(256 << 20)
            }
        );
        for bad in [
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"balloon","size":"lots"}"#,
            r#"{"cmd":"balloon"}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<VmCommand>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_round_trip() {
        let stats = VmmStats {
            state: RunState::Paused,
            uptime_ms: 7,
            rss_bytes: Some(4096),
            vcpus: vec![VcpuStats {
                vcpu: 0,
                exits: BTreeMap::from([("total".to_string(), 3)]),
                cpu_time_ms: None,
            }],
            devices: vec![DeviceStats {
                kind: "block".into(),
                id: "vda".into(),
                counters: BTreeMap::from([("requests".to_string(), 9)]),
            }],
            balloon: Some(BalloonStats {
                target: 1,
                actual: 0,
                guest: BalloonGuestStats::default(),
            }),
        };
        let cases: Vec<(VmCommand, VmReply)> = vec![
            (
                VmCommand::Status,
                Ok(VmResponse::Status(VmStatus {
                    state: RunState::Running,
                    pid: 1,
                    uptime_ms: 2,
                    cpus: 3,
                    memory: 4,
                })),
            ),
            (VmCommand::Stats, Ok(VmResponse::Stats(Box::new(stats)))),
            (
                VmCommand::Shutdown,
                Ok(VmResponse::State(RunState::ShuttingDown)),
            ),
            (
                VmCommand::Balloon { size: ByteSize(1) },
                Ok(VmResponse::Balloon(BalloonTarget {
                    target: 1,
                    actual: 0,
                })),
            ),
            (VmCommand::Pause, Err("the VM is stopping".into())),
        ];
        for (cmd, reply) in cases {
            let line = encode_reply(&reply);
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["ok"], reply.is_ok(), "{line}");
            assert_eq!(decode_reply(&cmd, &line).unwrap(), reply, "{line}");
        }
        let line = encode_reply(&Ok(VmResponse::State(RunState::ShuttingDown)));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap()["state"],
            "shutting-down"
        );
        assert!(decode_reply(&VmCommand::Status, "nonsense").is_err());
        assert!(decode_reply(&VmCommand::Status, r#"{"ok":true}"#).is_err());
        assert!(decode_reply(&VmCommand::Status, r#"{"state":"running"}"#).is_err());
    }
}
