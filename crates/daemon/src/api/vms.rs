//! `/v1/vms`: define, list, look up and delete VMs.

use super::failure::Failure;
use super::input::{json_body, query_bool, query_pairs, VmParam};
use super::state::AppState;
use crate::store::{now_millis, validate_name, VmRecord};
use api::{ApiError, CreateVm, DesiredState, VmInfo, VmState};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::Json;

/// Define a VM. The config is checked against the host (vCPUs, memory, files) before anything
/// is stored; a refused request changes nothing.
#[utoipa::path(
    post,
    path = "/v1/vms",
    tag = "vms",
    request_body = CreateVm,
    responses(
        (status = 201, description = "Defined (and, with `start`, started: a failed start leaves it `crashed` with the reason)", body = VmInfo),
        (status = 400, description = "Malformed JSON, unknown field, wrong type", body = ApiError),
        (status = 409, description = "The name is taken", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 422, description = "A value the host cannot accept", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn create_vm(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<VmInfo>), Failure> {
    let req: CreateVm = json_body(body)?;
    validate_name(&req.name)?;
    let kvm_path = st.config().kvm_path.clone();
    let config = req.config.clone();
    st.manager()
        .check_resources(&req.resources, &req.config)
        .map_err(|e| {
            Failure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_value",
                Some(e.field().to_string()),
                e.to_string(),
            )
        })?;
    // Validation reads files (kernel, images) and probes /dev/kvm: off the async workers.
    tokio::task::spawn_blocking(move || {
        let limits = vmm::vm::probe_host_limits(&kvm_path);
        config
            .validate(&limits)
            .map(|_| ())
            .map_err(|e| Failure::config(&e))
    })
    .await
    .map_err(|e| Failure::internal(format!("validation failed: {e}")))??;

    let guard = st.lock_vm(&format!("name:{}", req.name)).await;
    let policy = req.restart_policy;
    let start = req.start;
    let desired = if start {
        DesiredState::Running
    } else {
        DesiredState::Stopped
    };
    let rec = st
        .blocking(move |s| s.create_with(&req.name, &req.config, policy, desired, &req.resources))
        .await?;
    drop(guard);
    st.notify_changed();
    if !start {
        return Ok((StatusCode::CREATED, Json(vm_info(&rec))));
    }
    // Defined: from here on a failed start leaves the VM defined and `crashed` with the
    // reason, and the answer is still 201 (the definition is what was created).
    let id = rec.id.to_string();
    let rec = match st.vm_op(id.clone(), |m, id| m.start(id, true)).await {
        Ok(r) => r,
        Err(f) => {
            tracing::warn!("VM {id}: start on create failed: {}", f.body.error);
            st.blocking(move |s| s.get(&id)).await?
        }
    };
    Ok((StatusCode::CREATED, Json(vm_info(&rec))))
}

/// Every VM, in creation order.
#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    responses(
        (status = 200, description = "The VMs", body = Vec<VmInfo>),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn list_vms(State(st): State<AppState>) -> Result<Json<Vec<VmInfo>>, Failure> {
    let recs = st.blocking(|s| s.list()).await?;
    Ok(Json(recs.iter().map(vm_info).collect()))
}

/// One VM: state, config, pid, uptime.
#[utoipa::path(
    get,
    path = "/v1/vms/{vm}",
    tag = "vms",
    params(("vm" = String, Path, description = "The VM's id or name")),
    responses(
        (status = 200, description = "The VM", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn get_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
) -> Result<Json<VmInfo>, Failure> {
    let rec = st.blocking(move |s| s.get(&vm)).await?;
    Ok(Json(vm_info(&rec)))
}

/// Delete a VM. Refused (409) while its VMM may be running (starting, running, paused,
/// stopping) unless `force=true`, which kills the VMM first. Returns the VM as it was.
#[utoipa::path(
    delete,
    path = "/v1/vms/{vm}",
    tag = "vms",
    params(
        ("vm" = String, Path, description = "The VM's id or name"),
        ("force" = Option<bool>, Query, description = "Delete even while its VMM may run"),
    ),
    responses(
        (status = 200, description = "Deleted; the VM as it was", body = VmInfo),
        (status = 400, description = "Bad query parameter", body = ApiError),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "Its state does not allow it", body = ApiError),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn delete_vm(
    State(st): State<AppState>,
    VmParam(vm): VmParam,
    RawQuery(query): RawQuery,
) -> Result<Json<VmInfo>, Failure> {
    let mut force = false;
    for (k, v) in query_pairs(query.as_deref(), &["force"])? {
        if k == "force" {
            force = query_bool(&k, &v)?;
        }
    }
    let rec = st.vm_op(vm, move |m, id| m.delete(id, force)).await?;
    Ok(Json(vm_info(&rec)))
}

/// The API's view of a stored VM.
pub fn vm_info(rec: &VmRecord) -> VmInfo {
    let rt = &rec.runtime;
    // A pid and an uptime only while the recorded VMM runs (`starting` has none yet; the
    // start time of a VM that ended is its last run's).
    let live = matches!(
        rt.state,
        VmState::Running | VmState::Paused | VmState::Stopping
    );
    VmInfo {
        id: rec.id.to_string(),
        name: rec.name.clone(),
        state: rt.state,
        desired_state: rec.desired_state,
        restart_policy: rec.restart_policy,
        config: rec.config.clone(),
        pid: rt.pid.filter(|_| live),
        uptime_ms: rt
            .started_at
            .filter(|_| live)
            .map(|t| u64::try_from(now_millis().saturating_sub(t)).unwrap_or(0)),
        started_at: rt.started_at,
        restart_count: rt.restart_count,
        last_exit_reason: rt.last_exit_reason.clone(),
        last_exit_code: rt.last_exit_code,
        created_at: rec.created_at,
        resources: rec.resources.clone(),
    }
}
