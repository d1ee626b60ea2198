//! The remote API: a real daemon with `--listen-tls`, certificates made here with rcgen, a
//! rustls client and `curl`/`openssl` as outside clients. Handshake refusals (no certificate,
//! expired, another CA, TLS 1.2), roles from the certificate's O, the user from its CN in the
//! event log, a key readable by others refused at start, SIGHUP rotation, 50 clients at once.

mod common;

use common::daemon::Daemon;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// When a certificate is valid.
#[derive(Clone, Copy)]
enum Valid {
    Now,
    Expired,
    NotYet,
}

/// A CA and the certificates it signs, as files in `dir`.
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca_pem,
        }
    }

    /// A certificate for `cn` (organizations `orgs`), client or server, valid `when`; returns
    /// (cert, key) paths (the key 0600).
    fn issue(
        &self,
        file: &str,
        cn: &str,
        orgs: &[&str],
        server: bool,
        when: Valid,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        for o in orgs {
            params.distinguished_name.push(DnType::OrganizationName, *o);
        }
        if server {
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        match when {
            Valid::Now => {}
            Valid::Expired => {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            Valid::NotYet => {
                params.not_before = rcgen::date_time_ymd(2090, 1, 1);
                params.not_after = rcgen::date_time_ymd(2091, 1, 1);
            }
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }
}

/// A free TCP port on the loopback (the daemon binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Remote {
    daemon: Daemon,
    daemon_pid: u32,
    dir: PathBuf,
    port: u16,
    pki: Pki,
}

fn start(tag: &str) -> Remote {
    let dir = scratch(tag);
    let pki = Pki::new(&dir, "ca");
    let (cert, key) = pki.issue("server", "ferrovisor-test", &[], true, Valid::Now);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(
        &dir,
        &[
            "--listen-tls",
            &addr,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca_pem.to_str().unwrap(),
        ],
    );
    let daemon_pid = d.pid();
    // The TLS listener comes up right after the Unix socket.
    for _ in 0..100 {
        if TcpStream::connect(&addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Remote {
        daemon: d,
        daemon_pid,
        dir,
        port,
        pki,
    }
}

impl Remote {
    /// A client configuration with a certificate for `cn` in roles `orgs`, valid now.
    fn client(&self, cn: &str, orgs: &[&str]) -> Arc<rustls::ClientConfig> {
        self.client_with(cn, cn, orgs, Valid::Now)
    }

    /// The same, in file `file`, valid `when`.
    fn client_with(
        &self,
        file: &str,
        cn: &str,
        orgs: &[&str],
        when: Valid,
    ) -> Arc<rustls::ClientConfig> {
        let files = self.pki.issue(file, cn, orgs, false, when);
        client_config(&self.pki.ca_pem, Some(&files))
    }
}

/// The client's configuration: trusts `ca`, presents `client` (cert, key) if given.
fn client_config(ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(cfg)
}

/// One request over TLS; `Err` when the connection failed (a refused handshake).
fn tls_request(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Value), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap())
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify after a full response is fine.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let json = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    Ok((status, json))
}

fn fw_config(dir: &Path) -> Value {
    let fw = write_firmware(
        dir,
        "idle.bin",
        &common::firmware::Program::new().print("up\n").build(),
    );
    json!({"firmware": fw, "memory": "32M"})
}

#[test]
fn roles_from_the_certificate_and_the_user_in_the_event_log() {
    let r = start("tls-roles");
    let reader = r.client("alice", &["reader"]);
    let operator = r.client("olga", &["operator"]);
    let admin = r.client_with("root-ann", "ann", &["staff", "admin"], Valid::Now);
    let nobody = r.client("bob", &["staff"]);
    let create = json!({"name": "t1", "config": fw_config(&r.dir)}).to_string();

    // reader: lists and reads metrics; 403 naming the role on the rest.
    let (s, v) = tls_request(r.port, &reader, "GET", "/v1/vms", None).unwrap();
    assert_eq!((s, v), (200, json!([])));
    let (s, _) = tls_request(r.port, &reader, "GET", "/metrics", None).unwrap();
    assert_eq!(s, 200);
    let (s, v) = tls_request(r.port, &reader, "POST", "/v1/vms", Some(&create)).unwrap();
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["code"], "forbidden", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("needs the admin role"),
        "{v}"
    );
    let (s, v) = tls_request(r.port, &reader, "POST", "/v1/vms/t1/start", None).unwrap();
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("needs the operator role"),
        "{v}"
    );

    // The event stream over TLS.
    {
        let tcp = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn =
            rustls::ClientConnection::new(reader.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(b"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && tls.read(&mut b).unwrap() == 1 {
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("text/event-stream"), "{head}");
    }

    // No known role: 403 on everything, saying why.
    let (s, v) = tls_request(r.port, &nobody, "GET", "/v1/vms", None).unwrap();
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("no role"), "{v}");

    // CN=local would pass for the Unix socket in the event log: refused whatever its O.
    let fake_local = r.client_with("fake-local", "local", &["admin"], Valid::Now);
    let (s, v) = tls_request(r.port, &fake_local, "GET", "/v1/vms", None).unwrap();
    assert_eq!(s, 403, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("CN=local is refused"),
        "{v}"
    );

    // operator may not create or delete.
    let (s, _) = tls_request(r.port, &operator, "POST", "/v1/vms", Some(&create)).unwrap();
    assert_eq!(s, 403);

    // admin may; the events record who.
    let (s, v) = tls_request(r.port, &admin, "POST", "/v1/vms", Some(&create)).unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = tls_request(r.port, &operator, "DELETE", "/v1/vms/t1", None).unwrap();
    assert_eq!(s, 403, "{v}");
    let (s, v) = tls_request(r.port, &admin, "DELETE", "/v1/vms/t1", None).unwrap();
    assert!(s == 200 || s == 204, "{s} {v}");
    let (_, events) = tls_request(r.port, &reader, "GET", "/v1/events?limit=100", None).unwrap();
    let by: Vec<(String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["detail"]["by"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert!(by.contains(&("created".into(), "ann".into())), "{by:?}");
    assert!(by.contains(&("deleted".into(), "ann".into())), "{by:?}");

    // The Unix socket's changes are `local`'s.
    let local = r.daemon.post(
        "/v1/vms",
        &json!({"name": "t2", "config": fw_config(&r.dir)}).to_string(),
    );
    assert_eq!(local.status, 201, "{}", local.text());
    let events = r.daemon.get("/v1/events?limit=100").json();
    let last = events.as_array().unwrap().last().cloned().unwrap();
    assert_eq!(last["kind"], "created");
    assert_eq!(last["detail"]["by"], "local", "{last}");
}

#[test]
fn bad_clients_are_refused_in_the_handshake() {
    let r = start("tls-refused");
    let ca = &r.pki.ca_pem;
    let expired = r.client_with("old", "old", &["admin"], Valid::Expired);
    let future = r.client_with("early", "early", &["admin"], Valid::NotYet);
    let other = Pki::new(&r.dir, "other-ca");
    let foreign = client_config(
        ca,
        Some(&other.issue("mallory", "mallory", &["admin"], false, Valid::Now)),
    );
    let anonymous = client_config(ca, None);
    for (what, cfg) in [
        ("expired", &expired),
        ("not yet valid", &future),
        ("another CA", &foreign),
        ("no certificate", &anonymous),
    ] {
        let got = tls_request(r.port, cfg, "GET", "/v1/vms", None);
        assert!(got.is_err(), "{what}: got an answer: {got:?}");
    }
    // Outside clients: openssl with TLS 1.2 only, curl without a certificate.
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect"])
        .arg(format!("127.0.0.1:{}", r.port))
        .arg("-CAfile")
        .arg(ca)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "TLS 1.2 accepted: {text}");
    assert!(
        text.contains("alert")
            || text.contains("handshake failure")
            || text.contains("wrong version"),
        "{text}"
    );
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(format!("https://127.0.0.1:{}/v1/vms", r.port))
        .output()
        .expect("curl");
    assert!(!out.status.success(), "curl without a certificate got in");
    // With one, curl is served.
    let (cert, key) = r.pki.issue("curl", "carol", &["reader"], false, Valid::Now);
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg(format!("https://127.0.0.1:{}/v1/host", r.port))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(host["walls"].is_array(), "{host}");
}

#[test]
fn a_key_readable_by_others_is_refused_at_start() {
    let dir = scratch("tls-key-mode");
    let pki = Pki::new(&dir, "ca");
    let (cert, key) = pki.issue("server", "s", &[], true, Valid::Now);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["daemon", "--socket"])
        .arg(dir.join("api.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--listen-tls")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--tls-client-ca")
        .arg(&pki.ca_pem)
        .output()
        .expect("daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--tls-key") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!dir.join("state").exists(), "nothing was created: {err}");
}

#[test]
fn sighup_rotates_the_certificate_and_keeps_serving() {
    let r = start("tls-rotate");
    let reader = r.client("alice", &["reader"]);
    assert_eq!(
        tls_request(r.port, &reader, "GET", "/v1/vms", None)
            .unwrap()
            .0,
        200
    );
    // A new server certificate in the same files, then SIGHUP.
    let (cert, key) = r.pki.issue("server", "rotated", &[], true, Valid::Now);
    assert!(cert.ends_with("server.pem") && key.ends_with("server.key"));
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(r.daemon_pid as i32, libc::SIGHUP) }, 0);
    let mut seen = String::new();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let tcp = TcpStream::connect(("127.0.0.1", r.port)).unwrap();
        let conn =
            rustls::ClientConnection::new(reader.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let _ = tls.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut buf = Vec::new();
        let _ = tls.read_to_end(&mut buf);
        let der = tls
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        seen = der
            .map(|d| {
                use x509_parser::prelude::{FromDer, X509Certificate};
                X509Certificate::from_der(&d)
                    .map(|(_, c)| c.subject().to_string())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        if seen.contains("rotated") {
            assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
            break;
        }
    }
    assert!(
        seen.contains("rotated"),
        "still the old certificate: {seen}"
    );
    // A broken file on the next SIGHUP keeps the current configuration.
    std::fs::write(r.dir.join("server.pem"), "not a certificate").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(r.daemon_pid as i32, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tls_request(r.port, &reader, "GET", "/v1/vms", None)
            .unwrap()
            .0,
        200
    );
}

#[test]
fn fifty_tls_clients_at_once() {
    let r = start("tls-fifty");
    let reader = r.client("alice", &["reader"]);
    let port = r.port;
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let cfg = reader.clone();
            std::thread::spawn(move || {
                tls_request(port, &cfg, "GET", "/v1/host", None).map(|r| r.0)
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), Ok(200));
    }
}

#[test]
fn the_cli_works_remotely_end_to_end() {
    if !kvm_available("the_cli_works_remotely_end_to_end") {
        return;
    }
    let r = start("tls-cli");
    let fw = write_firmware(
        &r.dir,
        "hello.bin",
        &common::firmware::Program::new()
            .print("remote-hello\n")
            .build(),
    );
    let remote = |cn: &str, role: &str| {
        let (cert, key) = r.pki.issue(cn, cn, &[role], false, Valid::Now);
        let (port, ca) = (r.port, r.pki.ca_pem.clone());
        move |args: &[&str]| {
            let mut cmd = ferrovisor();
            cmd.arg("--remote")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--tls-cert")
                .arg(&cert)
                .arg("--tls-key")
                .arg(&key)
                .arg("--tls-ca")
                .arg(&ca)
                // Not the local socket: there is none at the default path for this daemon.
                .env("FERROVISOR_SOCKET", "/nonexistent/api.sock")
                .args(args);
            cmd
        }
    };
    let admin = remote("cli-admin", "admin");
    let reader = remote("cli-reader", "reader");
    let create = [
        "vm",
        "create",
        "rc",
        "--firmware",
        fw.to_str().unwrap(),
        "--memory",
        "32M",
    ];

    // A reader may not create: the CLI says which role it needs.
    let out = run(reader(&create), T);
    assert_ne!(out.code(), 0, "{out:?}");
    assert!(
        out.stderr.contains("needs the admin role"),
        "{}",
        out.stderr
    );

    let out = run(admin(&create), T);
    assert_eq!(out.code(), 0, "{out:?}");
    let out = run(reader(&["vm", "list"]), T);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout.contains("\nrc "), "{}", out.stdout);
    let out = run(admin(&["vm", "start", "rc"]), T);
    assert_eq!(out.code(), 0, "{out:?}");

    // The console over TLS: the guest's greeting (from the console history) arrives.
    let mut console = admin(&["vm", "console", "rc", "--no-stdin"]);
    console
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = console.spawn().expect("console");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("remote-hello") {
                let _ = tx.send(());
                break;
            }
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    assert!(got.is_ok(), "no guest output on the remote console");

    let out = run(admin(&["vm", "stop", "rc", "--force"]), T);
    assert_eq!(out.code(), 0, "{out:?}");
    let out = run(admin(&["vm", "delete", "rc"]), T);
    assert_eq!(out.code(), 0, "{out:?}");
    let out = run(reader(&["events", "--json"]), T);
    assert_eq!(out.code(), 0, "{out:?}");
    for kind in ["created", "started", "stopped", "deleted"] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.contains(&format!("\"kind\":\"{kind}\""))
                    && l.contains("\"by\":\"cli-admin\"")),
            "{kind} by cli-admin: {}",
            out.stdout
        );
    }
}

/// Time limit of one CLI call.
const T: Duration = Duration::from_secs(60);
