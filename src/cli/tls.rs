//! The client's side of the remote API (`--remote HOST:PORT`): mutual TLS 1.3 to a daemon's
//! `--listen-tls`, bridged to a local socket pair, so that everything else in the client —
//! requests, event streams, the console's two threads — reads and writes a `UnixStream` as it
//! does on the daemon's own socket.
//!
//! Per connection: the handshake on the calling thread (its errors are the connection's), then
//! two threads: network → plaintext → local end, and local end → TLS records → network. They
//! share the rustls connection under a mutex and write to the network only while holding it. A
//! TLS error the daemon's side reports after the handshake (TLS 1.3 sends a refused client
//! certificate's alert after the client's last handshake message) is kept for the client to
//! explain the connection's end with.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// Where a remote daemon is and how to prove who we are to it.
pub struct Remote {
    /// `HOST:PORT`, as given.
    pub addr: String,
    host: ServerName<'static>,
    config: Arc<ClientConfig>,
}

/// What ended a bridged connection on the TLS side, if anything did.
pub type TlsFailure = Arc<Mutex<Option<String>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Remote {
    /// Reads the client certificate, its key and the CA that signed the daemon's certificate.
    pub fn new(addr: &str, cert: &Path, key: &Path, ca: &Path) -> Result<Remote, String> {
        let host = server_name(addr)?;
        let file = |what: &str, p: &Path, e: String| format!("{what} {}: {e}", p.display());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| file("--tls-ca", ca, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file("--tls-ca", ca, format!("malformed PEM: {e}")))?;
        if cas.is_empty() {
            return Err(file("--tls-ca", ca, "no certificate in it".into()));
        }
        for c in cas {
            roots
                .add(c)
                .map_err(|e| file("--tls-ca", ca, format!("not a usable CA certificate: {e}")))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file("--tls-cert", cert, e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| file("--tls-cert", cert, format!("malformed PEM: {e}")))?;
        if chain.is_empty() {
            return Err(file("--tls-cert", cert, "no certificate in it".into()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| file("--tls-key", key, format!("no private key in PEM form: {e}")))?;
        let mut config = ClientConfig::builder_with_provider(provider)
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
    /// slot where the TLS side leaves the reason it ended, if it failed.
    pub fn connect(&self) -> io::Result<(UnixStream, TlsFailure)> {
        let tcp = TcpStream::connect(&self.addr)?;
        let _ = tcp.set_nodelay(true);
        let mut conn = ClientConnection::new(self.config.clone(), self.host.clone())
            .map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut &tcp)?;
        }
        let (local, bridge) = UnixStream::pair()?;
        let failure: TlsFailure = Arc::default();
        let conn = Arc::new(Mutex::new(conn));
        {
            let (conn, failure) = (conn.clone(), failure.clone());
            let (net_in, net_out, out) = (tcp.try_clone()?, tcp.try_clone()?, bridge.try_clone()?);
            std::thread::spawn(move || network_to_local(&conn, net_in, net_out, out, &failure));
        }
        std::thread::spawn(move || local_to_network(&conn, bridge, tcp));
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

/// Sends what the TLS connection has to send, while its lock is held.
fn flush(conn: &mut ClientConnection, net: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(net)?;
    }
    Ok(())
}

fn network_to_local(
    conn: &Mutex<ClientConnection>,
    mut net_in: TcpStream,
    mut net_out: TcpStream,
    mut out: UnixStream,
    failure: &Mutex<Option<String>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut plain = Vec::new();
    let fail = |why: String| *lock(failure) = Some(why);
    'net: loop {
        let n = match net_in.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                fail(e.to_string());
                break;
            }
        };
        let mut closed = false;
        {
            let mut c = lock(conn);
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                if let Err(e) = c.read_tls(&mut rest) {
                    fail(e.to_string());
                    break 'net;
                }
                match c.process_new_packets() {
                    Ok(state) => closed |= state.peer_has_closed(),
                    Err(e) => {
                        fail(e.to_string());
                        let _ = flush(&mut c, &mut net_out);
                        break 'net;
                    }
                }
            }
            loop {
                let mut chunk = [0u8; 16 * 1024];
                match c.reader().read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(k) => plain.extend_from_slice(&chunk[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        fail(e.to_string());
                        closed = true;
                        break;
                    }
                }
            }
            if flush(&mut c, &mut net_out).is_err() {
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

fn local_to_network(conn: &Mutex<ClientConnection>, mut local: UnixStream, mut net: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match local.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut c = lock(conn);
        if c.writer().write_all(&buf[..n]).is_err() || flush(&mut c, &mut net).is_err() {
            return;
        }
    }
    let mut c = lock(conn);
    c.send_close_notify();
    let _ = flush(&mut c, &mut net);
    let _ = net.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

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
