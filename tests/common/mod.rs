//! Helpers shared by the integration tests: the binary, skip rules, tiny real-mode guests, and
//! running a command with a timeout (a test never hangs).
#![allow(dead_code)]

pub mod daemon;
pub mod firmware;
#[path = "../../crates/daemon/tests/http/mod.rs"]
pub mod http;
pub mod lab;
pub mod pty;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `ferrovisor` binary under test.
pub fn ferrovisor() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
    c.env_remove("FERROVISOR_LOG").env_remove("FERROVISOR_KVM");
    c
}

/// The confinement walls, by name, in the order of the docs, `/v1/host` and `ferrovisor host`.
#[allow(dead_code)]
pub const WALL_NAMES: [&str; 8] = [
    "namespaces",
    "filesystem",
    "identity",
    "seccomp",
    "landlock",
    "cgroups",
    "apparmor",
    "selinux",
];

/// Path of the binary.
pub fn ferrovisor_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovisor"))
}

fn required(var: &str) -> bool {
    std::env::var(var).map(|v| v == "1").unwrap_or(false) || std::env::var("CI").is_ok()
}

/// Whether this machine's `/dev/kvm` can be opened; when not, prints why the test is skipped
/// (or fails when CI, or `FERROVISOR_REQUIRE_KVM=1`, says KVM must be there).
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if required("FERROVISOR_REQUIRE_KVM") {
                panic!("{test}: /dev/kvm is required here but cannot be opened: {e}");
            }
            eprintln!("SKIPPED {test}: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// Project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fv-it-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// What a finished process left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// Waits for `child` at most `timeout`, killing it (and failing) past that.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let start = Instant::now();
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let mut b = Vec::new();
            let _ = p.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = err_pipe.as_mut() {
            let mut b = Vec::new();
            let _ = p.read_to_end(&mut b);
            s = String::from_utf8_lossy(&b).into_owned();
        }
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let st = child.wait().unwrap();
            let stdout = out_t.join().unwrap();
            let stderr = err_t.join().unwrap();
            panic!(
                "timed out after {timeout:?} (status {st}); stdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// Runs `cmd` with piped output, no stdin, and a timeout.
pub fn run(mut cmd: Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_with_timeout(child, timeout)
}

/// Writes a firmware image into `dir` and returns its path.
/// Reads `n` bytes (or more) from `s` within `limit`, discarding them; panics with how far it
/// got (a read timeout on `s` bounds each read).
pub fn read_at_least(s: &mut impl Read, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while total < n {
        assert!(
            Instant::now() < deadline,
            "only {total} of {n} bytes in {limit:?}"
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("closed after {total} of {n} bytes"),
            Ok(k) => total += k,
            Err(e) => panic!("read after {total} of {n} bytes: {e}"),
        }
    }
}

/// Connects to a VMM's console socket at `sock` (waiting up to 5 s for it to appear), with a
/// 20 s read timeout.
pub fn connect_console(sock: &Path) -> std::os::unix::net::UnixStream {
    for _ in 0..500 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(sock) {
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("read timeout");
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("console socket {} never appeared", sock.display());
}

pub fn write_firmware(dir: &Path, name: &str, image: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, image).unwrap();
    p
}

/// Parses the `exits:` summary line the VMM logs at info level into (key, value) pairs.
pub fn exit_counts(stderr: &str) -> std::collections::HashMap<String, u64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("exits: total="))
        .unwrap_or_else(|| panic!("no exit summary in:\n{stderr}"));
    let tail = &line[line.find("exits:").unwrap() + 6..];
    tail.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

/// The guest-asset cache (`guest/assets.sh` fills it).
pub fn assets_dir() -> PathBuf {
    if let Ok(c) = std::env::var("FERROVISOR_CACHE") {
        return PathBuf::from(c).join("assets");
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
        });
    base.join("ferrovisor/assets")
}

/// The guest assets, when built; prints why a test is skipped otherwise (fails in CI).
pub fn guest_assets(test: &str) -> Option<PathBuf> {
    let d = assets_dir();
    if d.join("vmlinuz").exists() && d.join("initramfs.cpio.gz").exists() {
        return Some(d);
    }
    if required("FERROVISOR_REQUIRE_ASSETS") {
        panic!(
            "{test}: guest assets missing in {} (run guest/assets.sh)",
            d.display()
        );
    }
    eprintln!(
        "SKIPPED {test}: guest assets missing in {} (run guest/assets.sh)",
        d.display()
    );
    None
}
