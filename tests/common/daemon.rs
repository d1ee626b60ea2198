//! A real `ferrovisor daemon` on a temporary socket and state directory, for tests that run
//! tiny guests through the API.

use super::http::{request, Resp};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon process. Dropping it force-deletes its VMs (so no VMM outlives the test), stops
/// it and removes its directory (kept when the test failed).
pub struct Daemon {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub state: PathBuf,
    child: Option<Child>,
    /// Extra `daemon` flags.
    args: Vec<String>,
}

impl Daemon {
    /// Starts a daemon on `dir/api.sock` with state in `dir/state` and waits until it answers.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// [`Daemon::start`] with extra `daemon` flags.
    #[allow(dead_code)]
    pub fn start_with(dir: &Path, args: &[&str]) -> Daemon {
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            sock: dir.join("api.sock"),
            state: dir.join("state"),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
            .args(["--log-level", "info", "daemon", "--socket"])
            .arg(&self.sock)
            .arg("--state-dir")
            .arg(&self.state)
            .args(&self.args)
            .env_remove("FERROVISOR_SOCKET")
            .env_remove("FERROVISOR_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if UnixStream::connect(&self.sock).is_ok() && self.get("/v1/host").status == 200 {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("daemon exited at start ({status}): {}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon never answered: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Kills the daemon with `sig` and reaps it (its VMMs keep running).
    pub fn signal_and_wait(&mut self, sig: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill has no memory effects; the child is not reaped yet.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("daemon ignored signal {sig}: {}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the daemon again on the same socket and state.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
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

    /// `POST path` that must answer `status`; returns the JSON.
    pub fn post_ok(&self, path: &str, body: &str, status: u16) -> Value {
        let r = self.post(path, body);
        assert_eq!(
            r.status,
            status,
            "POST {path}: {}\n{}",
            r.text(),
            self.log()
        );
        r.json()
    }

    /// GET /v1/vms/{vm}.
    pub fn vm(&self, vm: &str) -> Value {
        let r = self.get(&format!("/v1/vms/{vm}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Waits until `pred` holds for VM `vm`, at most 30 s.
    pub fn wait_vm(&self, vm: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.vm(vm);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "VM {vm} never {what}: {v}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The event kinds logged for VM `id`, oldest first.
    pub fn event_kinds(&self, id: &str) -> Vec<String> {
        self.events(id)
            .iter()
            .filter_map(|e| e["kind"].as_str().map(str::to_string))
            .collect()
    }

    /// The events logged for VM `id`, oldest first.
    pub fn events(&self, id: &str) -> Vec<Value> {
        let all = self.get("/v1/events?limit=1000").json();
        all.as_array()
            .expect("events")
            .iter()
            .filter(|e| e["vm_id"] == id)
            .cloned()
            .collect()
    }

    /// Opens the console of `vm` (HTTP upgrade); returns the stream after the 101.
    pub fn console(&self, vm: &str) -> UnixStream {
        let mut s = UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            s,
            "GET /v1/vms/{vm}/console HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
             Upgrade: ferrovisor-console\r\n\r\n"
        )
        .expect("write");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).expect("read head");
            assert_eq!(
                n,
                1,
                "closed during the head: {}",
                String::from_utf8_lossy(&head)
            );
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: ferrovisor-console"), "{head}");
        s
    }
}

/// Reads from `s` until what was read contains `needle` (20 s at most); returns it all.
pub fn read_until(s: &mut UnixStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got.windows(needle.len()).any(|w| w == needle) {
        assert!(
            Instant::now() < deadline,
            "never got {:?}: {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&got)
        );
        match s.read(&mut buf) {
            Ok(0) => panic!(
                "closed before {:?}: {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            ),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}; got {:?}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.clean_up();
        // Kept when the test failed, for its logs.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Daemon {
    fn clean_up(&mut self) {
        let listed = if self.child.is_some() && self.sock.exists() {
            self.get("/v1/vms").json().as_array().cloned()
        } else {
            None
        };
        match listed {
            Some(vms) => {
                for v in vms {
                    if let Some(id) = v["id"].as_str() {
                        let _ = self.delete(&format!("/v1/vms/{id}?force=true"));
                    }
                }
            }
            // No daemon: stop the VMMs through their control sockets.
            None => {
                if let Ok(dirs) = std::fs::read_dir(self.state.join("vms")) {
                    for d in dirs.flatten() {
                        let _ = vmm::control::request(
                            &d.path().join("control.sock"),
                            &serde_json::json!({"cmd": "stop"}),
                        );
                    }
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill has no memory effects; the child is not reaped yet.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}
