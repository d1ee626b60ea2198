//! The VMM's control socket (`ferrovisor run --control PATH`): the transport of the control
//! protocol ([`api::control`]), nothing more. Each request line is parsed into a
//! [`VmCommand`] and handed to the VM loop, which carries out every command in one place
//! ([`crate::vm`]) and sends back the reply this thread writes. The socket is created mode 0600.

use crate::event::{CommandRequest, VmEvent};
use api::control::{encode_reply, VmCommand, VmReply, MAX_REQUEST};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::time::Duration;

/// How long a connection waits for the VM loop's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening socket; removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (which must not exist) and serves it on a thread; commands go to `events`.
pub fn serve(path: &Path, events: Sender<VmEvent>) -> std::io::Result<ControlSocket> {
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
    std::thread::Builder::new()
        .name("fv-control".into())
        .spawn(move || {
            jail::seccomp::apply_or_abort(jail::seccomp::ThreadKind::Control);
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Some(&allowed) = PEER_UID.get() {
                            match jail::peer_uid(&stream) {
                                Ok(uid) if uid == allowed => {}
                                Ok(uid) => {
                                    tracing::warn!(
                                        "control socket: refused a connection from uid {uid} \
                                         (only uid {allowed} may use it)"
                                    );
                                    continue;
                                }
                                Err(e) => {
                                    tracing::warn!("control socket: SO_PEERCRED: {e}");
                                    continue;
                                }
                            }
                        }
                        let events = events.clone();
                        let _ = std::thread::Builder::new()
                            .name("fv-control-conn".into())
                            .spawn(move || serve_conn(stream, &events));
                    }
                    Err(e) => tracing::warn!("control socket accept: {e}"),
                }
            }
        })?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
    })
}

fn serve_conn(stream: UnixStream, events: &Sender<VmEvent>) {
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
        let too_long = line.len() > MAX_REQUEST;
        let reply = if too_long {
            Err(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match parse_request(&line) {
                Ok(command) => submit(events, command, ANSWER_TIMEOUT),
                Err(e) => Err(e),
            }
        };
        let mut text = encode_reply(&reply);
        text.push('\n');
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
            || too_long
        {
            return;
        }
    }
}

/// Parses one request line into a command, or says what is wrong with it.
pub fn parse_request(line: &[u8]) -> Result<VmCommand, String> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return Err(
            "empty request; send one JSON object per line, e.g. {\"cmd\":\"status\"}".into(),
        );
    }
    serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))
}

/// Hands `command` to the VM loop behind `events` and waits up to `timeout` for its reply.
pub fn submit(events: &Sender<VmEvent>, command: VmCommand, timeout: Duration) -> VmReply {
    let (tx, rx) = channel();
    if events
        .send(VmEvent::Command(CommandRequest { command, reply: tx }))
        .is_err()
    {
        return Err("the VM is stopping".into());
    }
    match rx.recv_timeout(timeout) {
        Ok(reply) => reply,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "the VM did not answer within {} s",
            timeout.as_secs()
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err("the VM is stopping".into()),
    }
}

/// `/proc/self/statm`, opened before the jail hides `/proc` ([`preopen_proc`]).
static STATM: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// The peer uid the control socket accepts ([`accept_only_uid`]).
static PEER_UID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Opens what [`rss_bytes`] reads, while `/proc` is still visible (the jail hides it).
pub fn preopen_proc() {
    STATM.get_or_init(|| std::fs::File::open("/proc/self/statm").ok());
}

/// From now on the control socket serves only connections from `uid` (checked with
/// `SO_PEERCRED`); others are closed unanswered. Set once.
pub fn accept_only_uid(uid: u32) {
    let _ = PEER_UID.set(uid);
}

/// The VMM process's resident set size in bytes (guest RAM it touched included).
pub fn rss_bytes() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let statm = match STATM.get() {
        Some(Some(f)) => {
            let mut buf = [0u8; 256];
            let n = f.read_at(&mut buf, 0).ok()?;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
        _ => std::fs::read_to_string("/proc/self/statm").ok()?,
    };
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}

/// Sends one raw JSON request to the control socket at `path` and returns the raw answer: for
/// `ferrovisor ctl` (which prints it) and tests that speak the wire format. Typed clients use
/// [`api::control::send`].
pub fn request(path: &Path, request: &Value) -> std::io::Result<Value> {
    let stream = UnixStream::connect(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    stream.set_read_timeout(Some(api::control::DEFAULT_TIMEOUT))?;
    let mut w = stream.try_clone()?;
    let mut text = request.to_string();
    text.push('\n');
    w.write_all(text.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream.take(api::control::MAX_ANSWER as u64)).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_why_not() {
        assert_eq!(
            parse_request(b"{\"cmd\":\"stats\"}\n"),
            Ok(VmCommand::Stats)
        );
        assert!(parse_request(b"  \n")
            .unwrap_err()
            .contains("empty request"));
        assert!(parse_request(b"{\"cmd\":\"fly\"}")
            .unwrap_err()
            .starts_with("bad request"));
        assert!(parse_request(&[0xff, 0xfe, b'{']).is_err());
    }

    #[test]
    fn a_vm_loop_that_is_gone_is_reported() {
        let (tx, rx) = channel();
        drop(rx);
        assert_eq!(
            submit(&tx, VmCommand::Status, Duration::from_millis(10)),
            Err("the VM is stopping".into())
        );
        let (tx, _rx) = channel();
        let r = submit(&tx, VmCommand::Status, Duration::from_millis(10));
        assert!(r.unwrap_err().contains("did not answer"));
    }
}
