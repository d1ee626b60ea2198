//! `GET /metrics`: the daemon's gauges and counters in the Prometheus text format (0.0.4).

use super::failure::Failure;
use super::AppState;
use crate::store::VmState;
use api::ApiError;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write;

/// VM counts by state, per-VM up/restarts, capacity in use, host size, events logged.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "host",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain"),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn metrics(State(st): State<AppState>) -> Result<impl IntoResponse, Failure> {
    let (vms, last_event) = st.blocking(|s| Ok((s.list()?, s.last_event_id()?))).await?;
    let mut out = String::new();
    family(
        &mut out,
        "ferrovisor_vms",
        "gauge",
        "VMs defined, by state.",
    );
    for state in VmState::ALL {
        let count = vms.iter().filter(|v| v.runtime.state == *state).count();
        let _ = writeln!(out, "ferrovisor_vms{{state=\"{state}\"}} {count}");
    }
    let live = || vms.iter().filter(|v| v.runtime.state.is_live());
    let cpus: u64 = live().map(|v| u64::from(v.config.cpus)).sum();
    let mem = live().fold(0u64, |m, v| m.saturating_add(v.config.memory.0));
    let gauges = [
        (
            "ferrovisor_vcpus_in_use",
            "vCPUs of the VMs whose VMM may run.",
            cpus,
        ),
        (
            "ferrovisor_memory_in_use_bytes",
            "Guest memory of the VMs whose VMM may run.",
            mem,
        ),
        (
            "ferrovisor_host_memory_bytes",
            "The host's RAM.",
            vmm::kvm::host_memory(),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "ferrovisor_events_total",
        "counter",
        "Events logged.",
    );
    let _ = writeln!(out, "ferrovisor_events_total {last_event}");
    // Names are [A-Za-z0-9._-] and ids hex digits: no label value needs escaping.
    family(
        &mut out,
        "ferrovisor_vm_up",
        "gauge",
        "Whether the VM's VMM may run (starting, running, paused, stopping).",
    );
    for v in &vms {
        let up = u8::from(v.runtime.state.is_live());
        let _ = writeln!(
            out,
            "ferrovisor_vm_up{{vm=\"{}\",id=\"{}\"}} {up}",
            v.name, v.id
        );
    }
    family(
        &mut out,
        "ferrovisor_vm_restarts",
        "gauge",
        "Restarts by the restart policy since the count was last reset.",
    );
    for v in &vms {
        let n = v.runtime.restart_count;
        let _ = writeln!(
            out,
            "ferrovisor_vm_restarts{{vm=\"{}\",id=\"{}\"}} {n}",
            v.name, v.id
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}
