//! `GET /v1/vms/{vm}/console`: the VM's serial console as a byte stream over an upgraded HTTP
//! connection (`Connection: Upgrade`, `Upgrade: ferrovisor-console` — any protocol name is
//! accepted and echoed; answer `101 Switching Protocols`). After the upgrade the client first receives the console's recent output (up to
//! 64 KiB), then live output; what it sends goes to the guest's serial input. The stream ends
//! when the VMM exits or the client closes.

use super::failure::Failure;
use super::input::VmParam;
use super::state::AppState;
use api::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;

/// The protocol name clients ask for in `Upgrade:`.
pub const CONSOLE_PROTOCOL: &str = "ferrovisor-console";

/// Attach to a VM's serial console.
#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/console",
    tag = "vms",
    params(
        ("vm" = String, Path, description = "The VM's id or name"),
        ("Upgrade" = String, Header, description = "ferrovisor-console"),
        ("Connection" = String, Header, description = "Upgrade"),
    ),
    responses(
        (status = 101, description = "Switching protocols: the connection is now the console's byte stream"),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Not running", body = ApiError),
        (status = 426, description = "The request did not ask for the upgrade", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn console(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
    mut req: Request,
) -> Result<Response, Failure> {
    // Any protocol name is taken (`ferrovisor-console` is ours; `tcp`, `console` ... from
    // generic clients work too): what matters is that the client asked to leave HTTP.
    let protocol = {
        let headers = req.headers();
        let connection_upgrade = headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("upgrade"))
        });
        let asked = headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty());
        match asked {
            Some(p) if connection_upgrade => p,
            _ => {
                return Err(Failure::new(
                    StatusCode::UPGRADE_REQUIRED,
                    "upgrade_required",
                    Some("Upgrade".into()),
                    format!(
                        "the console is a byte stream: send `Connection: Upgrade` and \
                         `Upgrade: {CONSOLE_PROTOCOL}`"
                    ),
                ))
            }
        }
    };
    let protocol = HeaderValue::from_str(&protocol)
        .unwrap_or_else(|_| HeaderValue::from_static(CONSOLE_PROTOCOL));
    // Taken before any await: the request itself is not Sync.
    let on_upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    let m = st.manager().clone();
    let (_rec, attachment) = tokio::task::spawn_blocking(move || m.attach_console(&vm))
        .await
        .map_err(|e| Failure::internal(format!("console: {e}")))??;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("console upgrade: {e}");
                return;
            }
        };
        let io = TokioIo::new(upgraded);
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut output = attachment.output;
        let input = attachment.input;
        if wr.write_all(&attachment.history).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 4096];
        // A client that half-closes (its input ended) still gets the output.
        let mut reading = true;
        loop {
            tokio::select! {
                out = output.recv() => match out {
                    Ok(bytes) => {
                        if wr.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    // A slow client loses output rather than stalling the guest.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => {
                        let _ = wr.shutdown().await;
                        return;
                    }
                },
                n = rd.read(&mut buf), if reading => match n {
                    Ok(0) => reading = false,
                    Err(_) => return,
                    Ok(n) => {
                        if input.send(buf[..n].to_vec()).await.is_err() {
                            return;
                        }
                    }
                },
            }
        }
    });
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    res.headers_mut().insert(header::UPGRADE, protocol);
    Ok(res)
}
