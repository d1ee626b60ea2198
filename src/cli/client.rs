//! A small blocking client of the daemon's API over its Unix socket, or over mutual TLS to a
//! remote daemon (`--remote`, bridged to a local socket pair by [`super::tls`]): one connection
//! per request (`Connection: close`), JSON in and out, [`api::ApiError`] on failure, the event
//! stream, and the console upgrade.

use super::http::{read_head, Body, Head, Request};
use super::sse::SseReader;
use api::ApiError;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// The daemon's socket unless `--socket` or `FERROVISOR_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ferrovisor/api.sock";

/// The protocol name of the console upgrade.
pub const CONSOLE_PROTOCOL: &str = "ferrovisor-console";

/// What can go wrong talking to the daemon; each message is the user's explanation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon cannot be connected to.
    #[error("cannot reach the daemon at {at}: {}{}", os_message(cause), hint(cause, at, *remote))]
    Connect {
        /// The socket's path, or the remote `HOST:PORT`.
        at: String,
        /// Whether it is remote (`--remote`).
        remote: bool,
        /// Why (not a `source`: the message already says it).
        cause: io::Error,
    },
    /// The connection failed during the exchange.
    #[error("talking to the daemon at {at}: {}", os_message(cause))]
    Io {
        /// The socket or `HOST:PORT`.
        at: String,
        /// Why.
        cause: io::Error,
    },
    /// The remote daemon ended the TLS connection (e.g. it refused this client's certificate).
    #[error("the daemon at {at} ended the TLS connection: {reason} (if the daemon refused this client's certificate: check that --tls-cert is signed by the CA the daemon's --tls-client-ca names and valid now)")]
    Tls {
        /// `HOST:PORT`.
        at: String,
        /// What TLS said.
        reason: String,
    },
    /// The daemon refused the request.
    #[error("{}", error.error)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's explanation.
        error: ApiError,
    },
    /// The daemon answered something that is not the API's.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

/// An I/O error's message without Rust's " (os error N)" suffix.
fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

fn hint(e: &io::Error, at: &str, remote: bool) -> String {
    match e.kind() {
        _ if remote && e.kind() == io::ErrorKind::InvalidData => {
            " — the TLS handshake failed (is --tls-ca the CA of the daemon's certificate, and \
             does that certificate name this host?)"
                .to_string()
        }
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused if remote => {
            " — is `ferrovisor daemon --listen-tls` running there? (--remote / FERROVISOR_REMOTE)"
                .to_string()
        }
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            " — is `ferrovisor daemon` running? (--socket / FERROVISOR_SOCKET)".to_string()
        }
        io::ErrorKind::PermissionDenied if !remote => format!(
            " — the socket's group and mode decide who may connect (`ls -l {at}`: join its \
             group, or run as root)"
        ),
        _ => String::new(),
    }
}

/// Where the daemon is.
enum Target {
    /// Its Unix socket.
    Unix(PathBuf),
    /// A remote daemon's TLS listener.
    Remote(super::tls::Remote),
}

/// The client: where the daemon is.
pub struct Client {
    target: Target,
    /// Why the last TLS connection ended, when it failed (remote only).
    failure: std::cell::RefCell<Option<super::tls::TlsFailure>>,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            target: Target::Unix(socket.into()),
            failure: Default::default(),
        }
    }

    /// A client of a remote daemon (`--remote`).
    pub fn remote(remote: super::tls::Remote) -> Client {
        Client {
            target: Target::Remote(remote),
            failure: Default::default(),
        }
    }

    fn at(&self) -> String {
        match &self.target {
            Target::Unix(p) => p.display().to_string(),
            Target::Remote(r) => r.addr.clone(),
        }
    }

    fn io(&self, cause: io::Error) -> ClientError {
        let failure = self.failure.borrow();
        if let Some(reason) = failure
            .as_ref()
            .and_then(|f| f.lock().unwrap_or_else(|p| p.into_inner()).clone())
        {
            return ClientError::Tls {
                at: self.at(),
                reason,
            };
        }
        ClientError::Io {
            at: self.at(),
            cause,
        }
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        let connect_error = |cause| ClientError::Connect {
            at: self.at(),
            remote: matches!(self.target, Target::Remote(_)),
            cause,
        };
        match &self.target {
            Target::Unix(p) => UnixStream::connect(p).map_err(connect_error),
            Target::Remote(r) => {
                let (stream, failure) = r.connect().map_err(connect_error)?;
                *self.failure.borrow_mut() = Some(failure);
                Ok(stream)
            }
        }
    }

    /// Sends a request and reads its head; the body follows on the returned reader.
    fn send(&self, req: &Request<'_>) -> Result<(Head, BufReader<UnixStream>), ClientError> {
        let mut stream = self.connect()?;
        req.write_to(&mut stream).map_err(|e| self.io(e))?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader).map_err(|e| self.io(e))?;
        Ok((head, reader))
    }

    /// Sends `method target` with an optional JSON body and reads the whole answer's body; a
    /// non-2xx answer is an error.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<Vec<u8>, ClientError> {
        let bytes = match body {
            Some(v) => {
                Some(serde_json::to_vec(v).map_err(|e| ClientError::Protocol(e.to_string()))?)
            }
            None => None,
        };
        let req = Request {
            method,
            target,
            headers: &[("Accept", "application/json")],
            body: bytes.as_deref(),
            close: true,
        };
        let (head, reader) = self.send(&req)?;
        let body = Body::new(&head, reader)
            .and_then(Body::read_all)
            .map_err(|e| self.io(e))?;
        if !head.is_success() {
            return Err(failure(&head, &body));
        }
        Ok(body)
    }

    /// Like [`Client::request`], the answer parsed as JSON.
    pub fn json(
        &self,
        method: &str,
        target: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let bytes = self.request(method, target, body)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Protocol(format!("{method} {target}: the answer is not JSON: {e}"))
        })
    }

    /// `GET target`, parsed into `T`.
    pub fn get<T: DeserializeOwned>(&self, target: &str) -> Result<T, ClientError> {
        decode(self.json("GET", target, None)?)
    }

    /// `GET target` as a stream of server-sent events.
    pub fn events(
        &self,
        target: &str,
    ) -> Result<SseReader<BufReader<Body<BufReader<UnixStream>>>>, ClientError> {
        let req = Request {
            method: "GET",
            target,
            headers: &[("Accept", "text/event-stream")],
            body: None,
            close: true,
        };
        let (head, reader) = self.send(&req)?;
        let body = Body::new(&head, reader).map_err(|e| self.io(e))?;
        if !head.is_success() {
            let bytes = body.read_all().map_err(|e| self.io(e))?;
            return Err(failure(&head, &bytes));
        }
        Ok(SseReader::new(BufReader::new(body)))
    }

    /// Asks for the console of the VM at `target` (`/v1/vms/{vm}/console`): on `101 Switching
    /// Protocols`, the connection, now carrying the console's bytes both ways, and the bytes
    /// already read past the answer's head.
    pub fn console(&self, target: &str) -> Result<(UnixStream, Vec<u8>), ClientError> {
        let req = Request {
            method: "GET",
            target,
            headers: &[("Connection", "Upgrade"), ("Upgrade", CONSOLE_PROTOCOL)],
            body: None,
            close: false,
        };
        let (head, reader) = self.send(&req)?;
        if head.status != 101 {
            let bytes = Body::new(&head, reader)
                .and_then(Body::read_all)
                .map_err(|e| self.io(e))?;
            if head.is_success() {
                return Err(ClientError::Protocol(format!(
                    "the console was not opened ({} {} instead of 101 Switching Protocols)",
                    head.status, head.reason
                )));
            }
            return Err(failure(&head, &bytes));
        }
        let leftover = reader.buffer().to_vec();
        Ok((reader.into_inner(), leftover))
    }
}

/// A JSON value as `T`.
pub fn decode<T: DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v)
        .map_err(|e| ClientError::Protocol(format!("the answer does not fit the API: {e}")))
}

/// The error a non-2xx answer stands for: its [`ApiError`], or the status and the start of
/// the body when it is not one.
fn failure(head: &Head, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(error) => ClientError::Api {
            status: head.status,
            error,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.trim().chars().take(200).collect();
            ClientError::Protocol(format!(
                "{} {}{}{}",
                head.status,
                head.reason,
                if text.is_empty() { "" } else { ": " },
                text
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_explain_themselves() {
        let dir = std::env::temp_dir().join(format!("fv-cli-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("api.sock");
        let e = Client::new(&missing)
            .request("GET", "/v1/vms", None)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot reach the daemon at {}: No such file or directory — is `ferrovisor \
                 daemon` running? (--socket / FERROVISOR_SOCKET)",
                missing.display()
            )
        );
        // EACCES, as connect(2) reports a socket the user may not write to.
        let denied = io::Error::from_raw_os_error(13);
        let e = ClientError::Connect {
            at: missing.display().to_string(),
            remote: false,
            cause: denied,
        };
        let msg = e.to_string();
        assert!(
            msg.contains("Permission denied — the socket's group and mode"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failures_without_an_api_error() {
        let head = Head {
            status: 502,
            reason: "Bad Gateway".into(),
            headers: vec![],
        };
        let e = failure(&head, b"  upstream down \n");
        assert_eq!(
            e.to_string(),
            "unexpected answer from the daemon: 502 Bad Gateway: upstream down"
        );
        let e = failure(&head, b"");
        assert_eq!(
            e.to_string(),
            "unexpected answer from the daemon: 502 Bad Gateway"
        );
        let e = failure(
            &head,
            br#"{"error":"no VM named x","reason":"not found","code":"not_found","field":"vm"}"#,
        );
        assert_eq!(e.to_string(), "no VM named x");
        assert!(matches!(e, ClientError::Api { status: 502, .. }));
    }
}
