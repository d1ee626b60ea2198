//! The remote API's transport: TLS 1.3 with client certificates (mutual TLS), and who a client
//! is and may do.
//!
//! A client is refused in the handshake, before any request is read, when it has no
//! certificate, when its certificate is expired or not yet valid, or when the client CA did not
//! sign it (rustls' WebPKI client verifier). TLS 1.2 and older are not offered.
//!
//! Its certificate then names it: the subject's `CN` is the user (what the event log records
//! as `"by"`), its Organization(s) (`O`, groups, as Kubernetes reads client certificates) the
//! role: `reader`, `operator` or `admin`. The local Unix socket's clients are `local`, admin
//! (the socket's mode and group are its access control).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The files of the TLS listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1); readable by its owner only.
    pub key: PathBuf,
    /// The CA(s) whose signature a client certificate must carry (PEM).
    pub client_ca: PathBuf,
}

/// Why the TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable, malformed, or too open.
    #[error("{option} {path}: {reason}")]
    File {
        /// The option that named it.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The files do not go together (e.g. the key is not the certificate's).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// aws-lc-rs: TLS 1.3 suites, X25519MLKEM768 (post-quantum hybrid) preferred, then X25519.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads `files` and makes the server's TLS configuration: TLS 1.3 only, a client certificate
/// signed by the client CA required, ALPN `http/1.1`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    check_key_mode(&files.key)?;
    let certs = read_certs("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
        option: "--tls-key",
        path: files.key.clone(),
        reason: format!("no private key in PEM form: {e}"),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs("--tls-client-ca", &files.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::File {
            option: "--tls-client-ca",
            path: files.client_ca.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "--tls-cert {} and --tls-key {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No resumption: a resumed session carries the client certificate of its first handshake
    // without checking it again, so an expired (or since distrusted) one would keep working.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A private key that others than its owner can read is refused (it may already be known).
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    let md = std::fs::metadata(path).map_err(|e| TlsError::File {
        option: "--tls-key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mode = md.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::File {
            option: "--tls-key",
            path: path.to_path_buf(),
            reason: format!(
                "open to others than its owner (mode {mode:04o}); chmod 600 {}",
                path.display()
            ),
        });
    }
    Ok(())
}

/// The certificates of a PEM file (`option` names it in errors); at least one.
pub fn read_certs(
    option: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        option,
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "no certificate in it (PEM \"CERTIFICATE\" blocks)".into()
        ));
    }
    Ok(certs)
}

/// The current server configuration, replaced on SIGHUP (connections in progress keep theirs).
#[derive(Clone)]
pub struct Reloadable {
    files: TlsFiles,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl Reloadable {
    /// Reads `files` once (an error here stops the daemon from starting).
    pub fn new(files: TlsFiles) -> Result<Reloadable, TlsError> {
        let cfg = server_config(&files)?;
        Ok(Reloadable {
            files,
            current: Arc::new(RwLock::new(cfg)),
        })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reads the files again; on an error the old configuration stays (and the error is
    /// returned for the log).
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = server_config(&self.files)?;
        match self.current.write() {
            Ok(mut g) => *g = cfg,
            Err(p) => *p.into_inner() = cfg,
        }
        Ok(())
    }
}

/// What a client may do. Ordered: each role may do what the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// GET routes, `/metrics`, events.
    Reader,
    /// Also start, shutdown, kill, reboot, pause, resume, console.
    Operator,
    /// Everything, create and delete included.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Reader, Role::Operator, Role::Admin];

    /// Its name, as in a certificate's `O`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The user the event log records for the Unix socket's clients.
pub const LOCAL_USER: &str = "local";

/// Who sent a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The user: the certificate's CN, or `local` on the Unix socket.
    pub user: String,
    /// The role its certificate names (the highest of its `O`s), if any.
    pub role: Option<Role>,
    /// The certificate's `O`s, for the refusal's message.
    pub organizations: Vec<String>,
}

impl Caller {
    /// A client of the local Unix socket.
    pub fn local() -> Caller {
        Caller {
            user: LOCAL_USER.into(),
            role: Some(Role::Admin),
            organizations: Vec::new(),
        }
    }

    /// The caller a verified client certificate (DER) names.
    pub fn from_certificate(der: &[u8]) -> Caller {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            // The verifier accepted it, so this does not happen; refuse all the same.
            return Caller {
                user: "(unparsable certificate)".into(),
                role: None,
                organizations: Vec::new(),
            };
        };
        let subject = cert.subject();
        let user = subject
            .iter_common_name()
            .find_map(|a| a.as_str().ok().map(str::to_string))
            .unwrap_or_else(|| "(no CN)".into());
        let organizations: Vec<String> = subject
            .iter_organization()
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect();
        // `local` is the Unix socket's user in the event log: no certificate may pass for it.
        let role = if user == LOCAL_USER {
            None
        } else {
            organizations
                .iter()
                .filter_map(|o| Role::from_name(o))
                .max()
        };
        Caller {
            user,
            role,
            organizations,
        }
    }
}

/// The role a request needs: reading (GET, HEAD) is `reader` — but a console, though a GET, is
/// `operator`; the lifecycle actions are `operator`; everything else (create, delete, and any
/// route not listed here) is `admin`.
pub fn role_needed(method: &axum::http::Method, path: &str) -> Role {
    use axum::http::Method;
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let read = *method == Method::GET || *method == Method::HEAD;
    match segments.as_slice() {
        ["v1", "vms", _, "console"] if read => Role::Operator,
        _ if read => Role::Reader,
        ["v1", "vms", _, "start" | "shutdown" | "kill" | "reboot" | "pause" | "resume"]
            if *method == Method::POST =>
        {
            Role::Operator
        }
        _ => Role::Admin,
    }
}

/// Why `caller` may not send a `method` request to `path`, if it may not.
pub fn refusal(caller: &Caller, method: &axum::http::Method, path: &str) -> Option<String> {
    let needed = role_needed(method, path);
    match caller.role {
        None if caller.user == LOCAL_USER => Some(format!(
            "client certificate CN={LOCAL_USER} is refused: that name is the Unix socket's in \
             the event log"
        )),
        None => Some(format!(
            "client certificate CN={} has no role: its organization (O) must be one of reader, \
             operator, admin (it has {})",
            caller.user,
            if caller.organizations.is_empty() {
                "none".to_string()
            } else {
                caller.organizations.join(", ")
            }
        )),
        Some(role) if role < needed => Some(format!(
            "{method} {path} needs the {needed} role; CN={} has {role}",
            caller.user
        )),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn routes_need_the_roles_the_docs_give() {
        let cases = [
            (Method::GET, "/v1/vms", Role::Reader),
            (Method::GET, "/v1/vms/a", Role::Reader),
            (Method::GET, "/v1/vms/a/stats", Role::Reader),
            (Method::GET, "/v1/events", Role::Reader),
            (Method::GET, "/v1/events/stream", Role::Reader),
            (Method::GET, "/v1/host", Role::Reader),
            (Method::GET, "/metrics", Role::Reader),
            (Method::GET, "/openapi.json", Role::Reader),
            (Method::GET, "/v1/vms/a/console", Role::Operator),
            (Method::POST, "/v1/vms/a/start", Role::Operator),
            (Method::POST, "/v1/vms/a/shutdown", Role::Operator),
            (Method::POST, "/v1/vms/a/kill", Role::Operator),
            (Method::POST, "/v1/vms/a/reboot", Role::Operator),
            (Method::POST, "/v1/vms/a/pause", Role::Operator),
            (Method::POST, "/v1/vms/a/resume", Role::Operator),
            (Method::POST, "/v1/vms", Role::Admin),
            (Method::DELETE, "/v1/vms/a", Role::Admin),
            (Method::POST, "/v1/vms/a/agent/exec", Role::Admin),
            (Method::PUT, "/v1/vms/a", Role::Admin),
            (Method::POST, "/v1/vms/a/start/x", Role::Admin),
        ];
        for (m, p, r) in cases {
            assert_eq!(role_needed(&m, p), r, "{m} {p}");
        }
    }

    #[test]
    fn refusals_name_the_role_needed() {
        let reader = Caller {
            user: "alice".into(),
            role: Some(Role::Reader),
            organizations: vec!["reader".into()],
        };
        assert_eq!(refusal(&reader, &Method::GET, "/v1/vms"), None);
        let r = refusal(&reader, &Method::POST, "/v1/vms/a/start").unwrap();
        assert!(r.contains("needs the operator role"), "{r}");
        assert!(r.contains("CN=alice has reader"), "{r}");
        let nobody = Caller {
            user: "bob".into(),
            role: None,
            organizations: vec!["staff".into()],
        };
        let r = refusal(&nobody, &Method::GET, "/v1/vms").unwrap();
        assert!(r.contains("no role") && r.contains("staff"), "{r}");
        assert_eq!(
            refusal(&Caller::local(), &Method::DELETE, "/v1/vms/a"),
            None
        );
    }
}
