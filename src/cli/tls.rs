//! The client's side of the remote API (`--remote HOST:PORT`): mutual TLS 1.3 to a daemon's
//! `--listen-tls`, bridged to a local socket pair, so that everything else in the client —
//! requests, event streams, the console's two threads — reads and writes a `UnixStream` as it
//! does on the daemon's own socket.
//!
//! Per connection: the handshake on the calling thread (its errors are the connection's), then
//! three threads: network → plaintext → local end; local end → TLS records; TLS records →
//! network. The first two share the rustls connection under a mutex and never block on a
//! socket while holding it: the records either makes go, in order, through a channel to the
//! third, which alone writes to the network. A TLS error the daemon's side reports after the
//! handshake (TLS 1.3 sends a refused client certificate's alert after the client's last
//! handshake message) is kept for the client to explain the connection's end with.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a remote daemon is and how to prove who we are to it.
pub struct Remote {
    /// `HOST:PORT`, as given.
    pub addr: String,
    host: ServerName<'static>,
    config: Arc<ClientConfig>,
}

/// What ended a bridged connection on the TLS side, if TLS did.
pub type TlsFailure = Arc<Mutex<Option<String>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Remote {
    /// Reads the client certificate, its key and the CA that signed the daemon's certificate.
    pub fn new(addr: &str, cert: &Path, key: &Path, ca: &Path) -> Result<Remote, String> {
        let host = server_name(addr)?;
        let mut roots = RootCertStore::empty();
        for c in daemon::tls::read_certs("--tls-ca", ca).map_err(|e| e.to_string())? {
            roots.add(c).map_err(|e| {
                format!(
                    "--tls-ca {}: not a usable CA certificate: {e}",
                    ca.display()
                )
            })?;
        }
        let chain = daemon::tls::read_certs("--tls-cert", cert).map_err(|e| e.to_string())?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            format!(
                "--tls-key {}: no private key in PEM form: {e}",
                key.display()
            )
        })?;
        let mut config = ClientConfig::builder_with_provider(daemon::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| format!("--tls-cert and --tls-key: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Remote {
            addr: addr.to_string(),
            host,
            config: Arc::new(config),
        })
    }

    /// Connects, completes the handshake, and returns the local end of the bridge with the
    /// slot where the TLS side leaves the reason it ended, if TLS ended it.
    pub fn connect(&self) -> io::Result<(UnixStream, TlsFailure)> {
        let mut last = None;
        let mut tcp = None;
        for a in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(t) => {
                    tcp = Some(t);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
        })?;
        let _ = tcp.set_nodelay(true);
        let mut conn = ClientConnection::new(self.config.clone(), self.host.clone())
            .map_err(io::Error::other)?;
        tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        tcp.set_write_timeout(Some(CONNECT_TIMEOUT))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut &tcp)?;
        }
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)?;
        let (local, bridge) = UnixStream::pair()?;
        let failure: TlsFailure = Arc::default();
        let conn = Arc::new(Mutex::new(conn));
        let (records, outgoing) = mpsc::channel::<Vec<u8>>();
        {
            let net = tcp.try_clone()?;
            std::thread::spawn(move || records_to_network(&outgoing, net));
        }
        {
            let (conn, failure, records) = (conn.clone(), failure.clone(), records.clone());
            let (net, out) = (tcp.try_clone()?, bridge.try_clone()?);
            std::thread::spawn(move || network_to_local(&conn, net, out, &records, &failure));
        }
        std::thread::spawn(move || local_to_records(&conn, bridge, &records));
        Ok((local, failure))
    }
}

/// `HOST` of `HOST:PORT` (`[v6]:PORT` too) as the name the daemon's certificate must carry.
fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("--remote {addr}: expected HOST:PORT"))?;
    if port.parse::<u16>().is_err() {
        return Err(format!("--remote {addr}: {port:?} is not a port number"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("--remote {addr}: {host:?} is not a host name or address: {e}"))
}

/// Takes the records the connection has to send (with its lock held) and queues them.
fn queue(conn: &mut ClientConnection, records: &mpsc::Sender<Vec<u8>>) -> bool {
    let mut out = Vec::new();
    while conn.wants_write() {
        if conn.write_tls(&mut out).is_err() {
            return false;
        }
    }
    out.is_empty() || records.send(out).is_ok()
}

fn records_to_network(records: &mpsc::Receiver<Vec<u8>>, mut net: TcpStream) {
    for r in records {
        if net.write_all(&r).is_err() {
            break;
        }
    }
    // Every sender is gone: both directions ended (or the network failed).
    let _ = net.shutdown(Shutdown::Write);
}

fn network_to_local(
    conn: &Mutex<ClientConnection>,
    mut net: TcpStream,
    mut out: UnixStream,
    records: &mpsc::Sender<Vec<u8>>,
    failure: &Mutex<Option<String>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut chunk = vec![0u8; 16 * 1024];
    let mut plain = Vec::new();
    'net: loop {
        let n = match net.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut closed = false;
        {
            let mut c = lock(conn);
            let mut rest = &buf[..n];
            // Record by record: the plaintext is taken out after each, so rustls' buffer of
            // received plaintext never fills.
            while !rest.is_empty() {
                match c.read_tls(&mut rest) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        *lock(failure) = Some(e.to_string());
                        break 'net;
                    }
                }
                if let Err(e) = c.process_new_packets() {
                    *lock(failure) = Some(e.to_string());
                    let _ = queue(&mut c, records);
                    break 'net;
                }
                loop {
                    match c.reader().read(&mut chunk) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(k) => plain.extend_from_slice(&chunk[..k]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // The peer ended without close_notify: what was read stands.
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                }
            }
            if !queue(&mut c, records) {
                closed = true;
            }
        }
        if !plain.is_empty() && out.write_all(&plain).is_err() {
            break;
        }
        plain.clear();
        if closed {
            break;
        }
    }
    // The client reads the end of the stream only after the reason is in place.
    let _ = out.shutdown(Shutdown::Write);
}

fn local_to_records(
    conn: &Mutex<ClientConnection>,
    mut local: UnixStream,
    records: &mpsc::Sender<Vec<u8>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match local.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut c = lock(conn);
        if c.writer().write_all(&buf[..n]).is_err() || !queue(&mut c, records) {
            return;
        }
    }
    let mut c = lock(conn);
    c.send_close_notify();
    let _ = queue(&mut c, records);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A CA, a server and a client certificate in `dir`; returns the daemon's TLS files and
    /// the client's (cert, key).
    fn pki(
        dir: &Path,
    ) -> (
        daemon::tls::TlsFiles,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, cn: &str, org: Option<&str>, sans: Vec<String>| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            if let Some(o) = org {
                p.distinguished_name.push(DnType::OrganizationName, o);
            }
            let cert = p.signed_by(&key, &issuer).unwrap();
            let (c, k) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
            (c, k)
        };
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        let (cert, key) = write("server", "localhost", None, vec!["localhost".into()]);
        let (ccert, ckey) = write("client", "tester", Some("admin"), vec![]);
        (
            daemon::tls::TlsFiles {
                cert,
                key,
                client_ca: ca_path,
            },
            ccert,
            ckey,
        )
    }

    /// 4 MiB each way at once through the bridge, against a server that echoes what it
    /// reads: nothing lost, nothing stuck (both directions full at the same time).
    #[test]
    fn the_bridge_moves_megabytes_both_ways_at_once() {
        let dir = std::env::temp_dir().join(format!("fv-cli-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (files, ccert, ckey) = pki(&dir);
        let server_cfg = daemon::tls::server_config(&files).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(server_cfg).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut buf = vec![0u8; 64 * 1024];
            let mut echoed = 0usize;
            loop {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        tls.write_all(&buf[..n]).unwrap();
                        echoed += n;
                    }
                }
            }
            tls.conn.send_close_notify();
            let _ = tls.flush();
            echoed
        });
        let remote = Remote::new(
            &format!("localhost:{port}"),
            &ccert,
            &ckey,
            &files.client_ca,
        )
        .unwrap();
        let (local, _failure) = remote.connect().unwrap();
        const TOTAL: usize = 4 << 20;
        let pattern = |i: usize| (i % 251) as u8;
        let mut writer = local.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
            for chunk in data.chunks(100_000) {
                writer.write_all(chunk).unwrap();
            }
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut reader = local;
        reader
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut got = Vec::with_capacity(TOTAL);
        reader.read_to_end(&mut got).unwrap();
        sender.join().unwrap();
        assert_eq!(server.join().unwrap(), TOTAL);
        assert_eq!(got.len(), TOTAL);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn server_names_from_addresses() {
        assert!(matches!(
            server_name("vmhost.example:8443"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("127.0.0.1:8443"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:8443"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(server_name("vmhost").unwrap_err().contains("HOST:PORT"));
        assert!(server_name("vmhost:https")
            .unwrap_err()
            .contains("port number"));
    }
}
