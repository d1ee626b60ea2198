//! `/v1/vms/{vm}/...`: start, shutdown, kill, reboot, pause, resume, stats. Each runs with the
//! VM's lock held (see [`super::state::AppState::vm_op`]) and answers the VM as it is afterwards.

use super::failure::Failure;
use super::input::{json_body, VmParam};
use super::state::AppState;
use super::vms::vm_info;
use crate::manager::DEFAULT_SHUTDOWN_TIMEOUT;
use api::{ApiError, ShutdownRequest, VmInfo, VmStats};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use std::time::Duration;

/// Start a VM's VMM and wait until it runs (its control socket answers). Sets its desired
/// state to `running`.
#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/start",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    responses(
        (status = 200, description = "Running", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Already running", body = ApiError),
        (status = 422, description = "The VMM did not start (the reason quotes it); the VM is left crashed", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn start_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
) -> Result<Json<VmInfo>, Failure> {
    let rec = st.vm_op(vm, |m, id| m.start(id, true)).await?;
    Ok(Json(vm_info(&rec)))
}

/// Shut a VM down: the ACPI power button, then (after `timeout_s`, default 30) the VMM is
/// stopped, then killed. Answers once the VMM has ended. Sets the desired state to `stopped`.
#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/shutdown",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    request_body(content = Option<ShutdownRequest>, description = "Optional: no body, an empty one or `null` takes the defaults"),
    responses(
        (status = 200, description = "Stopped", body = VmInfo),
        (status = 400, description = "Bad body", body = ApiError),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Not running", body = ApiError),
        (status = 422, description = "A value out of range", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn shutdown_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<VmInfo>, Failure> {
    // The body is optional: none (or only blanks) and JSON `null` take the defaults.
    let empty = matches!(&body, Ok(b) if b.iter().all(u8::is_ascii_whitespace));
    let req: ShutdownRequest = if empty {
        ShutdownRequest::default()
    } else {
        json_body::<Option<ShutdownRequest>>(body)?.unwrap_or_default()
    };
    let timeout = match req.timeout_s {
        None => DEFAULT_SHUTDOWN_TIMEOUT,
        Some(t @ 1..=3600) => Duration::from_secs(u64::from(t)),
        Some(t) => {
            return Err(Failure::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_value",
                Some("timeout_s".into()),
                format!("{t}: must be 1 to 3600 seconds"),
            ))
        }
    };
    let rec = st.vm_op(vm, move |m, id| m.shutdown(id, timeout)).await?;
    Ok(Json(vm_info(&rec)))
}

/// Kill a VM's VMM (SIGKILL) at once. Sets the desired state to `stopped`.
#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/kill",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    responses(
        (status = 200, description = "Stopped", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Not running", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn kill_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
) -> Result<Json<VmInfo>, Failure> {
    let rec = st.vm_op(vm, |m, id| m.kill(id)).await?;
    Ok(Json(vm_info(&rec)))
}

/// Reboot a VM the hard way: its VMM is stopped and a new one starts from the same config
/// (a guest that reboots by itself is restarted the same way).
#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/reboot",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    responses(
        (status = 200, description = "Running again", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Not running", body = ApiError),
        (status = 422, description = "The new VMM did not start", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn reboot_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
) -> Result<Json<VmInfo>, Failure> {
    let rec = st.vm_op(vm, |m, id| m.reboot(id)).await?;
    Ok(Json(vm_info(&rec)))
}

/// Pause a running VM (its vCPUs stop; memory and devices stay).
#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/pause",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    responses(
        (status = 200, description = "Paused", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Not running", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn pause_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
) -> Result<Json<VmInfo>, Failure> {
    let rec = st.vm_op(vm, |m, id| m.pause(id)).await?;
    Ok(Json(vm_info(&rec)))
}

/// Resume a paused VM.
#[utoipa::path(
    post,
    path = "/v1/vms/{vm}/resume",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    responses(
        (status = 200, description = "Running", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Not paused", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn resume_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
) -> Result<Json<VmInfo>, Failure> {
    let rec = st.vm_op(vm, |m, id| m.resume(id)).await?;
    Ok(Json(vm_info(&rec)))
}

/// A running VM's counters: vCPU exits by reason and CPU time, RSS, device counters, balloon.
#[utoipa::path(
    get,
    path = "/v1/vms/{vm}/stats",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    responses(
        (status = 200, description = "Its counters", body = VmStats),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Not running", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn vm_stats(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
) -> Result<Json<VmStats>, Failure> {
    // Reads only: no VM lock (a stats call must not wait behind a 30 s shutdown).
    let m = st.manager().clone();
    let stats = tokio::task::spawn_blocking(move || m.stats(&vm))
        .await
        .map_err(|e| Failure::internal(format!("stats failed: {e}")))??;
    Ok(Json(stats))
}
