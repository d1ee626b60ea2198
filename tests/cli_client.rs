//! The `ferrovisor vm ...` / `ferrovisor events` client against a fake daemon: a Unix socket
//! in the test that records each request (method, target, headers, body) and answers a canned
//! response, so each command's exact request, its table and JSON output, its errors and exit
//! statuses are checked without KVM or a real daemon.

mod common;

use common::pty::{openpty, Pty};
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// One request as the fake daemon received it.
#[derive(Debug)]
struct Recorded {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body {:?}: {e}", self.body))
    }
}

/// What the fake does with one connection once it has read the request.
type Handler = Box<dyn FnOnce(BufReader<UnixStream>, UnixStream) + Send>;

/// A fake daemon: serves one connection per handler, in order, recording each request.
struct Fake {
    socket: PathBuf,
    requests: Receiver<Recorded>,
}

impl Fake {
    fn start(name: &str, handlers: Vec<Handler>) -> Fake {
        let dir = scratch(&format!("cli-{name}"));
        let socket = dir.join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || serve(listener, handlers, tx));
        Fake {
            socket,
            requests: rx,
        }
    }

    /// The next request the client sent (waits for it).
    fn next(&self) -> Recorded {
        self.requests
            .recv_timeout(T)
            .expect("the client sent no (further) request")
    }

    /// Runs `ferrovisor ARGS --socket SOCKET` (stdin empty).
    fn run(&self, args: &[&str]) -> Output {
        run(self.command(args), T)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = ferrovisor();
        cmd.env_remove("FERROVISOR_SOCKET")
            .args(args)
            .arg("--socket")
            .arg(&self.socket);
        cmd
    }
}

fn serve(listener: UnixListener, handlers: Vec<Handler>, tx: Sender<Recorded>) {
    for handler in handlers {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let Some(req) = read_request(&mut reader) else {
            return;
        };
        if tx.send(req).is_err() {
            return;
        }
        handler(reader, stream);
    }
}

fn read_request(r: &mut impl BufRead) -> Option<Recorded> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{line:?}");
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        assert!(h.ends_with("\r\n"), "header lines end in CRLF: {h:?}");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some(Recorded {
        method,
        target,
        headers,
        body: String::from_utf8(body).unwrap(),
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Whatever",
    }
}

/// Answers `status` with a JSON body (Content-Length).
fn reply(status: u16, body: Value) -> Handler {
    Box::new(move |_, mut s: UnixStream| {
        let body = body.to_string();
        let _ = write!(
            s,
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            reason(status),
            body.len()
        );
    })
}

/// Answers 200 with a JSON body in chunks of 10 bytes (`Transfer-Encoding: chunked`).
fn reply_chunked(body: Value) -> Handler {
    Box::new(move |_, mut s: UnixStream| {
        let body = body.to_string();
        let mut out =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        for piece in body.as_bytes().chunks(10) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        let _ = s.write_all(&out);
    })
}

fn api_error(status: u16, error: &str, field: &str, code: &str) -> Handler {
    reply(
        status,
        json!({"error": error, "field": field, "reason": "see error", "code": code}),
    )
}

const ID: &str = "3f2a9c0d5e6b7a8190a1b2c3d4e5f607";

fn vm(name: &str, state: &str) -> Value {
    let mut v = json!({
        "id": ID, "name": name, "state": state, "desired_state": "running",
        "restart_policy": "on-failure",
        "config": {"kernel": "/img/vmlinuz", "cpus": 2, "memory": "512M", "serial": "null",
                   "pmu": false, "rng": false},
        "restart_count": 1, "created_at": 1_714_566_800_000i64, "resources": {}
    });
    if state == "running" {
        v["pid"] = json!(4242);
        v["uptime_ms"] = json!(192_000);
        v["started_at"] = json!(1_714_566_896_789i64);
    }
    v
}

fn assert_ok(out: &Output) {
    assert_eq!(out.code(), 0, "{out:?}");
}

#[test]
fn list_prints_a_table_and_json() {
    let mut db = vm("db", "stopped");
    db["id"] = json!("00112233445566778899aabbccddeeff");
    db["config"]["memory"] = json!("2G");
    db["restart_count"] = json!(0);
    let vms = json!([vm("web-1", "running"), db]);
    let fake = Fake::start(
        "list",
        vec![reply_chunked(vms.clone()), reply(200, vms.clone())],
    );

    let out = fake.run(&["vm", "list"]);
    assert_ok(&out);
    let req = fake.next();
    assert_eq!(
        (req.method.as_str(), req.target.as_str()),
        ("GET", "/v1/vms")
    );
    assert_eq!(req.header("host"), Some("localhost"));
    assert_eq!(req.header("connection"), Some("close"));
    assert_eq!(
        out.stdout,
        "NAME   ID            STATE    CPUS  MEMORY  PID   UPTIME  RESTARTS\n\
         web-1  3f2a9c0d5e6b  running  2     512M    4242  3m12s   1\n\
         db     001122334455  stopped  2     2G      -     -       0\n"
    );
    assert_eq!(out.stderr, "");

    let out = fake.run(&["vm", "list", "--json"]);
    assert_ok(&out);
    assert_eq!(fake.next().target, "/v1/vms");
    let printed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(printed, vms);
}

#[test]
fn create_sends_the_config_policy_and_limits() {
    let fake = Fake::start("create", vec![reply(201, vm("web-1", "created"))]);
    let out = fake.run(&[
        "vm",
        "create",
        "web-1",
        "--kernel",
        "/img/vmlinuz",
        "--cmdline",
        "quiet",
        "--cpus",
        "2",
        "--memory",
        "1G",
        "--serial",
        "null",
        "--disk",
        "path=/img/root.raw,readonly=on,id=root",
        "--rng",
        "--restart",
        "on-failure",
        "--start",
        "--cpu-weight",
        "200",
        "--cpu-max",
        "150",
        "--memory-max",
        "2G",
        "--pids-max",
        "64",
    ]);
    assert_ok(&out);
    let req = fake.next();
    assert_eq!(
        (req.method.as_str(), req.target.as_str()),
        ("POST", "/v1/vms")
    );
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert_eq!(
        req.json(),
        json!({
            "name": "web-1",
            "config": {
                "kernel": "/img/vmlinuz", "cmdline": "quiet", "cpus": 2, "memory": "1G",
                "serial": "null", "pmu": false, "rng": true,
                "disks": [{"path": "/img/root.raw", "readonly": true, "id": "root"}]
            },
            "restart_policy": "on-failure",
            "start": true,
            "resources": {"cpu_weight": 200, "cpu_max_percent": 150, "memory_max": "2G",
                          "pids_max": 64}
        })
    );
    assert!(out.stdout.starts_with("NAME   ID"), "{}", out.stdout);
    assert!(
        out.stdout.contains("\nweb-1  3f2a9c0d5e6b  created  2"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_create_whose_start_failed_exits_non_zero_with_the_reason() {
    let mut crashed = vm("w", "crashed");
    crashed["last_exit_reason"] =
        json!("the namespaces wall cannot go up: user namespaces are disabled");
    let fake = Fake::start("create-failed-start", vec![reply(201, crashed)]);
    let out = fake.run(&["vm", "create", "w", "--kernel", "/k", "--start"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(
        out.stdout.contains("\nw  "),
        "the VM is still shown: {}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("VM w was created but did not start: the namespaces wall cannot go up"),
        "{}",
        out.stderr
    );
    let _ = fake.next();
}

#[test]
fn create_from_a_config_file_with_defaults() {
    let dir = scratch("cli-config-file");
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/k", "memory": "256M"}"#).unwrap();
    let fake = Fake::start("create-config", vec![reply(201, vm("b", "created"))]);
    let out = fake.run(&[
        "vm",
        "create",
        "b",
        "--config",
        cfg.to_str().unwrap(),
        "--cpus",
        "3",
        "--json",
    ]);
    assert_ok(&out);
    let body = fake.next().json();
    assert_eq!(body["config"]["kernel"], "/k");
    assert_eq!(body["config"]["memory"], "256M");
    assert_eq!(body["config"]["cpus"], 3);
    assert_eq!(body["restart_policy"], "never");
    assert_eq!(body["start"], false);
    assert_eq!(body["resources"], json!({}));
    let printed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(printed["name"], "b");
}

/// Runs `args` against a fake answering the VM in `state`; checks the request (`"METHOD
/// TARGET"` and body) and the first line printed.
fn action(args: &[&str], request: &str, body: &str, state: &str, printed: &str) {
    let fake = Fake::start("actions", vec![reply(200, vm("web-1", state))]);
    let out = fake.run(args);
    assert_ok(&out);
    let req = fake.next();
    assert_eq!(
        format!("{} {}", req.method, req.target),
        request,
        "{args:?}"
    );
    assert_eq!(req.body, body, "{args:?}");
    if req.method == "POST" {
        assert!(req.header("content-length").is_some(), "{args:?}: {req:?}");
    }
    assert_eq!(out.stdout.lines().next(), Some(printed), "{args:?}");
}

#[test]
fn actions_send_the_right_requests() {
    let resume = format!("POST /v1/vms/{ID}/resume");
    let timeout = r#"{"timeout_s":5}"#;
    action(
        &["vm", "start", "web-1"],
        "POST /v1/vms/web-1/start",
        "",
        "running",
        "web-1: running",
    );
    action(
        &["vm", "kill", "web-1"],
        "POST /v1/vms/web-1/kill",
        "",
        "stopped",
        "web-1: stopped",
    );
    action(
        &["vm", "reboot", "web-1"],
        "POST /v1/vms/web-1/reboot",
        "",
        "running",
        "web-1: running",
    );
    action(
        &["vm", "pause", "web-1"],
        "POST /v1/vms/web-1/pause",
        "",
        "paused",
        "web-1: paused",
    );
    action(
        &["vm", "resume", ID],
        &resume,
        "",
        "running",
        "web-1: running",
    );
    action(
        &["vm", "stop", "web-1"],
        "POST /v1/vms/web-1/shutdown",
        "",
        "stopped",
        "web-1: stopped",
    );
    action(
        &["vm", "stop", "web-1", "--timeout", "5"],
        "POST /v1/vms/web-1/shutdown",
        timeout,
        "stopped",
        "web-1: stopped",
    );
    action(
        &["vm", "stop", "--force", "web-1"],
        "POST /v1/vms/web-1/kill",
        "",
        "stopped",
        "web-1: stopped",
    );
    action(
        &["vm", "delete", "web-1"],
        "DELETE /v1/vms/web-1",
        "",
        "stopped",
        "web-1: deleted",
    );
    action(
        &["vm", "delete", "web-1", "--force"],
        "DELETE /v1/vms/web-1?force=true",
        "",
        "running",
        "web-1: deleted",
    );
    // Names are escaped: a name cannot change the route.
    action(
        &["vm", "info", "my vm/x"],
        "GET /v1/vms/my%20vm%2Fx",
        "",
        "running",
        "name:            web-1",
    );
}

#[test]
fn action_json_is_the_daemons_answer() {
    let fake = Fake::start("action-json", vec![reply(200, vm("web-1", "paused"))]);
    let out = fake.run(&["vm", "pause", "web-1", "--json"]);
    assert_ok(&out);
    let printed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(printed, vm("web-1", "paused"));
}

#[test]
fn info_lists_the_vm() {
    let mut v = vm("web-1", "running");
    v["last_exit_reason"] = json!("crashed");
    v["last_exit_code"] = json!(3);
    v["resources"] = json!({"cpu_weight": 200, "memory_max": "1G"});
    let fake = Fake::start("info", vec![reply(200, v)]);
    let out = fake.run(&["vm", "info", "web-1"]);
    assert_ok(&out);
    assert_eq!(fake.next().target, "/v1/vms/web-1");
    for line in [
        "state:           running",
        "restart policy:  on-failure",
        "pid:             4242",
        "uptime:          3m12s",
        "last exit:       crashed (code 3)",
        "memory:          512M",
        "kernel:          /img/vmlinuz",
        "resources:       cpu-weight=200 memory-max=1G",
    ] {
        assert!(out.stdout.contains(line), "{line:?} in:\n{}", out.stdout);
    }
}

#[test]
fn stats_prints_vcpus_and_devices() {
    let stats = json!({
        "id": ID, "name": "web-1", "state": "running", "pid": 4242, "uptime_ms": 5000,
        "rss_bytes": 314_572_800u64, "memory_bytes": 536_870_912u64,
        "vcpus": [
            {"vcpu": 0, "exits": {"total": 100, "io_in": 10, "io_out": 20, "mmio_read": 3,
                                  "mmio_write": 4, "hlt": 50}, "cpu_time_ms": 1250},
            {"vcpu": 1, "exits": {"total": 7, "hlt": 7}}
        ],
        "devices": [{"type": "net", "id": "net0", "counters": {"rx_bytes": 10, "tx_bytes": 20}}]
    });
    let fake = Fake::start(
        "stats",
        vec![reply(200, stats.clone()), reply(200, stats.clone())],
    );
    let out = fake.run(&["vm", "stats", "web-1"]);
    assert_ok(&out);
    assert_eq!(fake.next().target, "/v1/vms/web-1/stats");
    assert!(out.stdout.contains("rss:     300M\n"), "{}", out.stdout);
    assert!(
        out.stdout.contains(
            "VCPU  EXITS  IO  MMIO  HLT  CPU TIME\n\
             0     100    30  7     50   1.250s\n\
             1     7      0   0     7    -\n"
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("TYPE  ID    COUNTERS\nnet   net0  rx_bytes=10 tx_bytes=20\n"),
        "{}",
        out.stdout
    );
    let out = fake.run(&["vm", "stats", "web-1", "--json"]);
    assert_ok(&out);
    fake.next();
    assert_eq!(serde_json::from_str::<Value>(&out.stdout).unwrap(), stats);
}

#[test]
fn an_api_error_is_printed_and_exits_1() {
    let fake = Fake::start(
        "conflict",
        vec![api_error(
            409,
            "VM web-1 is running: stop it first, or delete with force=true",
            "state",
            "conflict",
        )],
    );
    let out = fake.run(&["vm", "delete", "web-1"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        "ferrovisor: error: VM web-1 is running: stop it first, or delete with force=true\n"
    );
    fake.next();
}

#[test]
fn a_missing_socket_says_how_to_fix_it() {
    let dir = scratch("cli-missing");
    let socket = dir.join("api.sock");
    let mut cmd = ferrovisor();
    cmd.args(["vm", "list"]).env("FERROVISOR_SOCKET", &socket);
    let out = run(cmd, T);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        out.stderr,
        format!(
            "ferrovisor: error: cannot reach the daemon at {}: No such file or directory — is \
             `ferrovisor daemon` running? (--socket / FERROVISOR_SOCKET)\n",
            socket.display()
        )
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = run(
        {
            let mut c = ferrovisor();
            c.args(["vm", "stop", "x", "--force", "--timeout", "3"]);
            c
        },
        T,
    );
    assert_eq!(out.code(), 2, "{out:?}");
    let out = run(
        {
            let mut c = ferrovisor();
            c.args(["vm", "create", "x", "--restart", "sometimes"]);
            c
        },
        T,
    );
    assert_eq!(out.code(), 2, "{out:?}");
}

/// Answers the upgrade with 101 and `greeting` (in the same write, so the client gets bytes
/// past the head with it), then echoes until the client closes the connection (as the daemon
/// does: it does not close first while the VM runs), or until it has echoed `close_after`
/// bytes (as when the VM ends).
fn console_echo(greeting: &'static [u8], close_after: Option<usize>) -> Handler {
    Box::new(move |mut r: BufReader<UnixStream>, mut s: UnixStream| {
        let mut out = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: ferrovisor-console\r\n\r\n".to_vec();
        out.extend_from_slice(greeting);
        s.write_all(&out).unwrap();
        let mut buf = [0u8; 256];
        let mut echoed = 0;
        while close_after.is_none_or(|n| echoed < n) {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    echoed += n;
                }
            }
        }
    })
}

#[test]
fn console_upgrades_and_relays_piped_stdin() {
    let input = b"hello\nworld\x1d\n";
    let fake = Fake::start(
        "console",
        vec![console_echo(b"Welcome\r\n", Some(input.len()))],
    );
    let mut child = fake
        .command(&["vm", "console", "web-1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let out = wait_with_timeout(child, T);
    assert_ok(&out);
    let req = fake.next();
    assert_eq!(
        (req.method.as_str(), req.target.as_str()),
        ("GET", "/v1/vms/web-1/console")
    );
    assert_eq!(req.header("connection"), Some("Upgrade"));
    assert_eq!(req.header("upgrade"), Some("ferrovisor-console"));
    // Ctrl-] is only a detach key on a terminal: piped, it is data like any other byte.
    assert_eq!(out.stdout, "Welcome\r\nhello\nworld\x1d\n");
    assert_eq!(out.stderr, "");
}

#[test]
fn console_ends_when_stdin_has_ended_and_the_output_is_quiet() {
    // The daemon keeps the console open: after its input the client waits for the output to
    // go quiet (a second), then closes.
    let fake = Fake::start("console-drain", vec![console_echo(b"login: ", None)]);
    let mut child = fake
        .command(&["vm", "console", "web-1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = wait_with_timeout(child, T);
    assert_ok(&out);
    assert_eq!(out.stdout, "login: ");
    assert!(out.elapsed >= Duration::from_millis(900), "{out:?}");
    fake.next();
}

#[test]
fn console_output_only() {
    let fake = Fake::start(
        "console-ro",
        vec![Box::new(|_r, mut s: UnixStream| {
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: ferrovisor-console\r\n\r\n")
                .unwrap();
            s.write_all(b"login: ").unwrap();
        })],
    );
    // stdin is not read: a stdin that never ends does not keep the session open.
    let child = fake
        .command(&["vm", "console", "web-1", "--no-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, T);
    assert_ok(&out);
    assert_eq!(out.stdout, "login: ");
    fake.next();
}

#[test]
fn console_refused() {
    let fake = Fake::start(
        "console-refused",
        vec![api_error(
            409,
            "VM web-1 is not running",
            "state",
            "conflict",
        )],
    );
    let out = fake.run(&["vm", "console", "web-1"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(out.stderr, "ferrovisor: error: VM web-1 is not running\n");
}

fn event(id: i64, vm_id: &str, kind: &str, detail: Value) -> Value {
    json!({"id": id, "at": 1_714_566_896_789i64 + id, "vm_id": vm_id, "kind": kind,
           "detail": detail})
}

const GONE: &str = "ffffffffffffffffffffffffffffffff";

#[test]
fn events_are_listed_page_by_page() {
    let e1 = event(1, ID, "created", json!({"name": "web-1"}));
    let e2 = event(2, GONE, "created", json!({"name": "old"}));
    let e3 = event(3, GONE, "deleted", json!({}));
    let e4 = event(4, ID, "exited", json!({"reason": "poweroff", "code": 0}));
    let fake = Fake::start(
        "events",
        vec![
            reply(200, json!([vm("web-1", "running")])),
            reply(200, json!([e1, e2, e3])),
            reply_chunked(json!([e4])),
            reply(200, json!([])),
        ],
    );
    let out = fake.run(&["events"]);
    assert_ok(&out);
    let targets: Vec<String> = (0..4).map(|_| fake.next().target).collect();
    assert_eq!(
        targets,
        [
            "/v1/vms",
            "/v1/events?after=0&limit=1000",
            "/v1/events?after=3&limit=1000",
            "/v1/events?after=4&limit=1000"
        ]
    );
    assert_eq!(
        out.stdout,
        "ID  TIME                      VM     KIND     DETAIL\n\
         1   2024-05-01T12:34:56.790Z  web-1  created  {\"name\":\"web-1\"}\n\
         2   2024-05-01T12:34:56.791Z  old    created  {\"name\":\"old\"}\n\
         3   2024-05-01T12:34:56.792Z  old    deleted\n\
         4   2024-05-01T12:34:56.793Z  web-1  exited   {\"code\":0,\"reason\":\"poweroff\"}\n"
    );

    // JSON, one event per line, filtered by a deleted VM's name, from an id on.
    let fake = Fake::start(
        "events-json",
        vec![
            reply(200, json!([vm("web-1", "running")])),
            reply(200, json!([e2, e3, e4])),
            reply(200, json!([])),
        ],
    );
    let out = fake.run(&["events", "--json", "--vm", "old", "--after", "1"]);
    assert_ok(&out);
    assert_eq!(fake.next().target, "/v1/vms");
    assert_eq!(fake.next().target, "/v1/events?after=1&limit=1000");
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, [e2, e3]);
}

/// Answers an event stream: `first` at once, then `rest` once `go` says so, then the end.
fn stream(first: Vec<Value>, go: Receiver<()>, rest: Vec<Value>) -> Handler {
    fn chunk(s: &mut UnixStream, text: &str) {
        let _ = write!(s, "{:x}\r\n{text}\r\n", text.len());
    }
    fn sse(e: &Value) -> String {
        format!(
            "id: {}\nevent: {}\ndata: {e}\n\n",
            e["id"],
            e["kind"].as_str().unwrap()
        )
    }
    Box::new(move |_, mut s: UnixStream| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
        );
        chunk(&mut s, ":\n\n");
        for e in &first {
            chunk(&mut s, &sse(e));
        }
        if go.recv_timeout(T).is_err() {
            return;
        }
        for e in &rest {
            // Split in the middle of a line, as a network may.
            let text = sse(e);
            let (a, b) = text.split_at(7);
            chunk(&mut s, a);
            chunk(&mut s, b);
        }
        let _ = s.write_all(b"0\r\n\r\n");
    })
}

#[test]
fn events_follow_prints_each_event_as_it_arrives() {
    let e6 = event(6, ID, "started", json!({}));
    let e7 = event(7, ID, "paused", json!({}));
    let (go, wait) = channel();
    let fake = Fake::start(
        "events-follow",
        vec![
            reply(200, json!([vm("web-1", "running")])),
            stream(vec![e6], wait, vec![e7]),
        ],
    );
    let mut child = fake
        .command(&["events", "--follow", "--after", "5"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("ID      TIME"), "{line:?}");
    line.clear();
    // The first event is printed while the stream stays open.
    stdout.read_line(&mut line).unwrap();
    assert_eq!(
        line,
        "6       2024-05-01T12:34:56.795Z  web-1             started\n"
    );
    go.send(()).unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("7       2024-05-01T12:34:56.796Z  web-1             paused"),
        "{line:?}"
    );
    child.stdout = Some(stdout.into_inner());
    let out = wait_with_timeout(child, T);
    assert_eq!(fake.next().target, "/v1/vms");
    let req = fake.next();
    assert_eq!(req.target, "/v1/events/stream?after=5");
    assert_eq!(req.header("accept"), Some("text/event-stream"));
    // The stream ended (the fake closed it): said, with where to resume.
    assert_eq!(out.code(), 1, "{out:?}");
    assert_eq!(
        out.stderr,
        "ferrovisor: error: the daemon closed the event stream; resume with --after 7\n"
    );
}

#[test]
fn events_follow_json() {
    let e8 = event(8, ID, "stopped", json!({}));
    let (go, wait) = channel();
    go.send(()).unwrap();
    let fake = Fake::start(
        "events-follow-json",
        vec![stream(vec![e8.clone()], wait, vec![])],
    );
    let out = fake.run(&["events", "-f", "--json"]);
    assert_eq!(fake.next().target, "/v1/events/stream");
    assert_eq!(out.code(), 1, "{out:?}");
    let printed: Value = serde_json::from_str(out.stdout.trim_end()).unwrap();
    assert_eq!(printed, e8);
}

fn canonical(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and struct.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag & libc::ICANON != 0
}

/// Starts `vm console web-1` with a terminal as stdin; returns once it says it is connected
/// (raw mode is on by then), with its stdout to read.
fn console_on_pty(
    fake: &Fake,
    pty: &Pty,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    assert!(canonical(&pty.slave), "a fresh pty is in canonical mode");
    let mut child = fake
        .command(&["vm", "console", "web-1"])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert_eq!(line, "Connected to web-1's console; Ctrl-] to detach\r\n");
    child.stderr = Some(stderr.into_inner());
    assert!(!canonical(&pty.slave), "raw mode while attached");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdout)
}

fn read_exactly(r: &mut impl Read, n: usize) -> String {
    let mut buf = vec![0; n];
    r.read_exact(&mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

#[test]
fn console_on_a_terminal_detaches_on_ctrl_bracket_and_restores_it() {
    let fake = Fake::start("console-tty", vec![console_echo(b"guest> ", None)]);
    let mut pty = openpty();
    let (mut child, mut stdout) = console_on_pty(&fake, &pty);
    assert_eq!(read_exactly(&mut stdout, 7), "guest> ");
    // Raw mode: Ctrl-C is a byte for the guest, not a signal.
    pty.master.write_all(b"ls\r\x03").unwrap();
    assert_eq!(read_exactly(&mut stdout, 4), "ls\r\x03");
    pty.master.write_all(b"\x1d").unwrap();
    child.stdout = Some(stdout.into_inner());
    let out = wait_with_timeout(child, T);
    assert_ok(&out);
    assert!(
        out.stderr.contains("Detached from web-1's console"),
        "{out:?}"
    );
    assert!(canonical(&pty.slave), "the terminal is restored");
    fake.next();
}

#[test]
fn console_on_a_terminal_restores_it_when_killed() {
    let fake = Fake::start("console-tty-kill", vec![console_echo(b"guest> ", None)]);
    let pty = openpty();
    let (mut child, mut stdout) = console_on_pty(&fake, &pty);
    assert_eq!(read_exactly(&mut stdout, 7), "guest> ");
    // SAFETY: kill has no memory effects.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0);
    child.stdout = Some(stdout.into_inner());
    let out = wait_with_timeout(child, T);
    assert_eq!(out.code(), 128 + libc::SIGTERM, "{out:?}");
    assert!(canonical(&pty.slave), "the terminal is restored");
}
