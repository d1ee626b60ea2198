//! Helpers of the API tests: a daemon API server on a temporary socket and state directory,
//! and a minimal HTTP/1.1 client over a Unix socket (one request per connection).
#![allow(dead_code)]

use daemon::api::{bind_socket, serve_with_shutdown, ApiConfig, AppState};
use daemon::manager::{Manager, ManagerConfig};
use daemon::Store;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running API server; stopped (and its directory removed) on drop.
pub struct Server {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub kernel: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    pub fn start(tag: &str) -> Server {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "api-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let kernel = dir.join("bzImage");
        std::fs::write(&kernel, fake_bzimage()).expect("kernel");
        let sock = dir.join("api.sock");
        let store = Arc::new(Store::open(&dir.join("state")).expect("open store"));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = sock.clone();
        let state_dir = dir.join("state");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let changed = Arc::new(tokio::sync::Notify::new());
            let manager = Manager::new(
                store,
                ManagerConfig {
                    binary: vmm_binary(),
                    run_dir: state_dir.join("vms"),
                    ready_timeout: Duration::from_secs(10),
                    // API tests do not touch the host's cgroups.
                    cgroups: Err(daemon::cgroup::Unavailable::NoCgroup2),
                    jail: Default::default(),
                },
                rt.handle().clone(),
                changed.clone(),
            )
            .expect("manager");
            let state = AppState::new(
                manager,
                changed,
                ApiConfig {
                    state_dir,
                    kvm_path: PathBuf::from("/dev/kvm"),
                    jail: Default::default(),
                },
            );
            rt.block_on(async move {
                let listener = bind_socket(&s, None).expect("bind");
                ready_tx.send(()).expect("ready");
                serve_with_shutdown(listener, state, async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
            });
        });
        ready_rx.recv().expect("server started");
        Server {
            dir,
            sock,
            kernel,
            stop: Some(stop_tx),
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        request(&self.sock, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        request(&self.sock, "POST", path, Some(body.as_bytes()))
    }

    pub fn delete(&self, path: &str) -> Resp {
        request(&self.sock, "DELETE", path, None)
    }

    /// A valid create request for `name`.
    pub fn create_body(&self, name: &str) -> String {
        serde_json::json!({
            "name": name,
            "config": { "kernel": self.kernel, "cpus": 2, "memory": "64M", "serial": "null" }
        })
        .to_string()
    }

    /// The VM list and the event log, to compare before and after a refused request.
    pub fn snapshot(&self) -> (Value, Value) {
        let vms = self.get("/v1/vms");
        assert_eq!(vms.status, 200, "{}", vms.text());
        let events = self.get("/v1/events?limit=1000");
        assert_eq!(events.status, 200, "{}", events.text());
        (vms.json(), events.json())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `ferrovisor` binary of the profile this test was built with (built by the root package;
/// absent when only this crate was built: starting a VM then fails with 422).
pub fn vmm_binary() -> PathBuf {
    // target/<profile>/deps/<test binary>
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|p| p.join("ferrovisor")))
        .unwrap_or_else(|| PathBuf::from("ferrovisor"))
}

/// A bzImage header: enough for VmConfig::validate.
pub fn fake_bzimage() -> Vec<u8> {
    let mut v = vec![0u8; 0x400];
    v[0x1fe] = 0x55;
    v[0x1ff] = 0xaa;
    v[0x202..0x206].copy_from_slice(b"HdrS");
    v
}

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let body = body.unwrap_or(b"");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // The server may answer (and close) before it has read a body it does not want: a failed
    // write is not an error as long as the answer can be read.
    let sent = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body));
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        panic!("{method} {path}: read: {e} (write: {sent:?})");
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..nl]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("chunk size");
        b = &b[nl + 2..];
        if size == 0 || b.len() < size {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

/// Checks an error answer: status, JSON ApiError with this field and a non-empty reason.
pub fn assert_error(r: &Resp, status: u16, field: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v.get("field").and_then(Value::as_str),
        field,
        "field of {v}"
    );
    for key in ["error", "reason", "code"] {
        assert!(
            v.get(key)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
            "{key} missing in {v}"
        );
    }
    v
}

/// Sends one request and returns the status line and headers only (for streams).
pub fn request_head(sock: &Path, method: &str, path: &str) -> String {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
    s.write_all(head.as_bytes()).expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}
