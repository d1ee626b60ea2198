//! The daemon's HTTP/JSON API on its Unix socket: axum routes over the
//! [`Store`](crate::store::Store), with the OpenAPI document generated from the same handlers
//! (`utoipa`; every route is registered through `utoipa_axum::routes!`, so a route without its
//! documentation does not compile).
//!
//! # Routes
//!
//! `POST /v1/vms`, `GET /v1/vms`, `GET /v1/vms/{vm}`, `DELETE /v1/vms/{vm}?force=`,
//! `GET /v1/events?after=&limit=`, `GET /v1/events/stream?after=` (server-sent events),
//! `GET /v1/host`, `GET /metrics` (Prometheus text format), `GET /openapi.json`. `{vm}` is an
//! id or a name. Every error is an [`api::ApiError`] (unknown routes 404, wrong methods 405
//! included).
//!
//! # Threads and serialisation
//!
//! Store operations are synchronous (SQLite): each runs in `tokio::task::spawn_blocking`, so
//! the async workers never block on the database. Every store operation is one transaction, so
//! reads (list, get, events) need nothing more. Operations that act on one VM take that VM's
//! lock first ([`AppState::lock_vm`]: a map from VM id to a `tokio::sync::Mutex`, entries
//! dropped when no one holds or waits for them), so concurrent requests on the same VM run one
//! after the other in arrival order (tokio's mutex is fair) while other VMs proceed; creates
//! lock the requested name. Process start/stop (not here yet) will take the same lock.
//!
//! # Event stream
//!
//! `GET /v1/events/stream` polls the store's event log every 200 ms, and is woken at once by
//! the API's own writes ([`AppState::notify_changed`]). Polling is what makes events written by
//! anything else (the supervisor, another process) reach the stream without that writer
//! knowing about the API.

mod console;
mod events;
mod failure;
mod host;
mod input;
mod lifecycle;
mod metrics;
mod socket;
mod state;
mod vms;

pub use failure::Failure;
pub use socket::bind_socket;
pub use state::{ApiConfig, AppState};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ferrovisor API",
        version = "1",
        description = "The host daemon's HTTP/JSON API, served on its Unix socket \
                       (/run/ferrovisor/api.sock) and, with --listen-tls, over mutual TLS 1.3 \
                       (roles from the client certificate's O: reader, operator, admin; a \
                       route above the caller's role answers 403). Every error is an ApiError."
    ),
    components(schemas(api::ApiError)),
    tags(
        (name = "vms", description = "VM definitions and lifecycle"),
        (name = "events", description = "The event log"),
        (name = "host", description = "The host"),
    )
)]
struct ApiDoc;

fn parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(vms::list_vms, vms::create_vm))
        .routes(routes!(vms::get_vm, vms::delete_vm))
        .routes(routes!(lifecycle::start_vm))
        .routes(routes!(lifecycle::shutdown_vm))
        .routes(routes!(lifecycle::kill_vm))
        .routes(routes!(lifecycle::reboot_vm))
        .routes(routes!(lifecycle::pause_vm))
        .routes(routes!(lifecycle::resume_vm))
        .routes(routes!(lifecycle::vm_stats))
        .routes(routes!(console::console))
        .routes(routes!(events::list_events))
        .routes(routes!(events::event_stream))
        .routes(routes!(host::host_info))
        .routes(routes!(openapi_json))
        .routes(routes!(metrics::metrics))
        .split_for_parts()
}

/// The OpenAPI document, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().1
}

/// The router over `state`.
pub fn router(state: AppState) -> Router {
    let (router, doc) = parts();
    let json = doc
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    state.set_openapi(json);
    router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Inner to outer: the body is read before anything answers (see read_whole_body), a 403
        // included.
        .layer(axum::middleware::from_fn(authorize))
        .layer(axum::middleware::from_fn(read_whole_body))
        .with_state(state)
}

/// Lets a request through when its caller's role allows its route (403 naming the role needed
/// otherwise), and runs it as that caller: what it changes, the event log records as `"by"`
/// the caller's user. The Unix socket's listener names its callers `local` (admin), the TLS
/// listener by their certificates.
async fn authorize(req: Request, next: Next) -> Response {
    // Each listener names its callers; a request without one is refused, not trusted.
    let Some(caller) = req.extensions().get::<crate::tls::Caller>().cloned() else {
        return Failure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            None,
            "the request came through no listener that names its caller",
        )
        .into_response();
    };
    if let Some(why) = crate::tls::refusal(&caller, req.method(), req.uri().path()) {
        tracing::info!("refused: {why}");
        return Failure::new(StatusCode::FORBIDDEN, "forbidden", None, why).into_response();
    }
    state::ACTOR.scope(caller.user, next.run(req)).await
}

/// Connections the TLS listener serves at once.
const MAX_TLS_CONNECTIONS: usize = 512;

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a TLS client may take to send a request's head (also: how long an idle kept-alive
/// connection stays open).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves the API over mutual TLS on `listener` until `shutdown` completes: each connection's
/// handshake with the configuration current at its arrival (see
/// [`Reloadable`](crate::tls::Reloadable)), then HTTP/1.1 (upgrades, i.e. consoles, included)
/// as the caller its certificate names. A refused handshake is logged with the peer's address
/// and reason; the listener goes on.
pub async fn serve_tls<F>(
    listener: tokio::net::TcpListener,
    tls: crate::tls::Reloadable,
    state: AppState,
    shutdown: F,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let app = router(state);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_TLS_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("TLS listener: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // At most MAX_TLS_CONNECTIONS at once: past that a new connection is closed at once
        // (a flood of idle connections must not take the daemon's memory or descriptors).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "TLS client {peer}: {MAX_TLS_CONNECTIONS} connections already open; closed"
            );
            continue;
        };
        // Small TLS records (the handshake's flights, short answers) go out at once: with
        // Nagle, a flight written after an unacknowledged one waits for the peer's delayed
        // ACK (40 ms).
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!("TLS client {peer} refused in the handshake: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!("TLS client {peer}: no handshake within {HANDSHAKE_TIMEOUT:?}");
                    return;
                }
            };
            let Some(caller) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| crate::tls::Caller::from_certificate(c.as_ref()))
            else {
                // The verifier requires a certificate; a connection without one ends here.
                return;
            };
            tracing::debug!(
                "TLS client {peer}: CN={} role {:?}",
                caller.user,
                caller.role
            );
            let service =
                hyper_util::service::TowerToHyperService::new(app.layer(axum::Extension(caller)));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service)
                .with_upgrades()
                .await
            {
                tracing::debug!("TLS client {peer}: {e}");
            }
        });
    }
}

/// Reads each request's whole body (at most axum's default limit, 2 MiB) before its route runs.
/// An answer given before the body was read (a 404, a 405, an action that takes no body) would
/// otherwise make hyper close the connection right after the answer, while the client may
/// still be sending: a keep-alive client's next request then fails, and a client behind a TCP
/// bridge can lose the answer itself ("connection closed without response").
async fn read_whole_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match Bytes::from_request(Request::new(body), &()).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(r) => input::body_failure(r).into_response(),
    }
}

/// The router for the Unix socket: every caller is `local`.
fn local_router(state: AppState) -> Router {
    router(state).layer(axum::Extension(crate::tls::Caller::local()))
}

/// Serves the API on `listener` until the listener fails.
pub async fn serve(listener: tokio::net::UnixListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, local_router(state)).await
}

/// Serves the API on `listener` until `shutdown` completes, then finishes the requests in
/// flight.
pub async fn serve_with_shutdown<F>(
    listener: tokio::net::UnixListener,
    state: AppState,
    shutdown: F,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, local_router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The OpenAPI document of this API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "host",
    responses((status = 200, description = "The OpenAPI document (JSON)", content_type = "application/json"))
)]
async fn openapi_json(
    axum::extract::State(st): axum::extract::State<AppState>,
) -> impl IntoResponse {
    let body = st.openapi().unwrap_or_default().to_string();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

async fn no_route(method: Method, uri: Uri) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "no_route",
        None,
        format!("no route {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        None,
        format!("{} does not accept {method}", uri.path()),
    )
}
