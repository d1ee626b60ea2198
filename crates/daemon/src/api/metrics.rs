//! `GET /metrics`: the daemon's gauges and counters in the Prometheus text format (0.0.4).

use super::failure::Failure;
use super::state::AppState;
use api::{ApiError, VmState};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use std::collections::HashMap;
use std::fmt::Write;

/// VM counts by state, per-VM up/restarts/state, capacity in use, host size, events logged;
/// for each running VM: uptime, memory, RSS, vCPU exits by reason and vCPU time, device
/// counters.
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
    // Per-VM counters from the running VMMs (their control sockets and /proc); a VMM that
    // does not answer is left out of this scrape.
    let m = st.manager().clone();
    let live: Vec<String> = vms
        .iter()
        .filter(|v| v.runtime.state.is_live())
        .map(|v| v.id.to_string())
        .collect();
    let stats: Vec<api::VmStats> = tokio::task::spawn_blocking(move || {
        live.iter().filter_map(|id| m.stats(id).ok()).collect()
    })
    .await
    .map_err(|e| Failure::internal(format!("metrics: {e}")))?;
    vm_families(&mut out, &vms, &stats);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}

/// Samples grouped by metric family (the text format wants each family's samples together,
/// after its HELP and TYPE).
#[derive(Default)]
struct Families {
    order: Vec<String>,
    families: HashMap<String, (&'static str, String, Vec<String>)>,
}

impl Families {
    fn add(&mut self, name: &str, kind: &'static str, help: &str, labels: &str, value: String) {
        let entry = self.families.entry(name.to_string()).or_insert_with(|| {
            self.order.push(name.to_string());
            (kind, help.to_string(), Vec::new())
        });
        entry.2.push(format!("{name}{{{labels}}} {value}"));
    }

    fn write(self, out: &mut String) {
        let mut families = self.families;
        for name in self.order {
            if let Some((kind, help, samples)) = families.remove(&name) {
                family(out, &name, kind, &help);
                for s in samples {
                    let _ = writeln!(out, "{s}");
                }
            }
        }
    }
}

/// Device values that go up and down (the rest only grow).
fn is_gauge(name: &str) -> bool {
    matches!(name, "inflight" | "actual_pages" | "target_pages")
        || name.ends_with("_current")
        || name.ends_with("_now")
}

/// A metric name part from a counter name: `[a-z0-9_]` only.
fn metric_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Escapes a label value (`\`, `"`, newline).
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn vm_families(out: &mut String, vms: &[crate::store::VmRecord], stats: &[api::VmStats]) {
    let mut f = Families::default();
    for v in vms {
        for state in VmState::ALL {
            let on = u8::from(v.runtime.state == *state);
            f.add(
                "ferrovisor_vm_state",
                "gauge",
                "1 for the state the VM is in, 0 for the others.",
                &format!(
                    "vm=\"{}\",id=\"{}\",state=\"{state}\"",
                    label(&v.name),
                    v.id
                ),
                on.to_string(),
            );
        }
    }
    for s in stats {
        let vm = format!("vm=\"{}\",id=\"{}\"", label(&s.name), s.id);
        f.add(
            "ferrovisor_vm_uptime_seconds",
            "gauge",
            "Seconds since the VM's VMM started.",
            &vm,
            format!("{:.3}", s.uptime_ms as f64 / 1000.0),
        );
        f.add(
            "ferrovisor_vm_memory_bytes",
            "gauge",
            "Guest memory configured.",
            &vm,
            s.memory_bytes.to_string(),
        );
        if let Some(rss) = s.rss_bytes {
            f.add(
                "ferrovisor_vm_rss_bytes",
                "gauge",
                "Resident memory of the VM's VMM process (guest pages it touched included).",
                &vm,
                rss.to_string(),
            );
        }
        if let Some(cg) = &s.cgroup {
            let gauges = [
                (
                    "ferrovisor_vm_cgroup_memory_bytes",
                    "Memory charged to the VM's cgroup (memory.current).",
                    cg.memory_bytes,
                ),
                (
                    "ferrovisor_vm_cgroup_pids",
                    "Tasks in the VM's cgroup (pids.current).",
                    cg.pids,
                ),
            ];
            for (name, help, v) in gauges {
                if let Some(v) = v {
                    f.add(name, "gauge", help, &vm, v.to_string());
                }
            }
            if let Some(us) = cg.cpu_usage_usec {
                f.add(
                    "ferrovisor_vm_cgroup_cpu_seconds_total",
                    "counter",
                    "CPU time of every thread of the VM's VMM (cpu.stat usage_usec).",
                    &vm,
                    format!("{:.6}", us as f64 / 1e6),
                );
            }
            if let Some(n) = cg.oom_kills {
                f.add(
                    "ferrovisor_vm_cgroup_oom_kills_total",
                    "counter",
                    "OOM kills in the VM's cgroup (memory.events oom_kill).",
                    &vm,
                    n.to_string(),
                );
            }
        }
        for c in &s.vcpus {
            let vcpu = format!("{vm},vcpu=\"{}\"", c.vcpu);
            for (reason, n) in c.exits.iter().filter(|(k, _)| k.as_str() != "total") {
                f.add(
                    "ferrovisor_vm_vcpu_exits_total",
                    "counter",
                    "KVM exits of a vCPU, by reason.",
                    &format!("{vcpu},reason=\"{}\"", label(reason)),
                    n.to_string(),
                );
            }
            if let Some(ms) = c.cpu_time_ms {
                f.add(
                    "ferrovisor_vm_vcpu_seconds_total",
                    "counter",
                    "CPU time of a vCPU thread (user + system).",
                    &vcpu,
                    format!("{:.3}", ms as f64 / 1000.0),
                );
            }
        }
        for d in &s.devices {
            let kind = metric_part(&d.kind);
            let dev = format!("{vm},device=\"{}\"", label(&d.id));
            for (counter, n) in &d.counters {
                let c = metric_part(counter);
                if is_gauge(counter) {
                    f.add(
                        &format!("ferrovisor_vm_{kind}_{c}"),
                        "gauge",
                        &format!("The {} device's current {counter}.", d.kind),
                        &dev,
                        n.to_string(),
                    );
                    continue;
                }
                let c = c.strip_suffix("_total").unwrap_or(&c);
                f.add(
                    &format!("ferrovisor_vm_{kind}_{c}_total"),
                    "counter",
                    &format!("The {} device counter {counter}.", d.kind),
                    &dev,
                    n.to_string(),
                );
            }
        }
    }
    f.write(out);
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn stats(name: &str) -> api::VmStats {
        let m = |kv: &[(&str, u64)]| -> BTreeMap<String, u64> {
            kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        api::VmStats {
            id: "ab".repeat(16),
            name: name.into(),
            state: api::VmState::Running,
            pid: 7,
            uptime_ms: 1500,
            rss_bytes: Some(1 << 20),
            memory_bytes: 64 << 20,
            vcpus: vec![api::VcpuStats {
                vcpu: 0,
                exits: m(&[("total", 9), ("io_out", 5), ("hlt", 4)]),
                cpu_time_ms: Some(250),
            }],
            devices: vec![
                api::DeviceStats {
                    kind: "block".into(),
                    id: "root".into(),
                    counters: m(&[("read_requests", 3), ("inflight", 1)]),
                },
                api::DeviceStats {
                    kind: "block".into(),
                    id: "data".into(),
                    counters: m(&[("read_requests", 4), ("inflight", 0)]),
                },
            ],
            cgroup: Some(api::CgroupUsage {
                memory_bytes: Some(2 << 20),
                cpu_usage_usec: Some(1_000_000),
                pids: Some(5),
                oom_kills: Some(0),
            }),
            balloon: None,
        }
    }

    #[test]
    fn families_are_grouped_typed_and_promtool_clean() {
        let mut out = String::new();
        vm_families(&mut out, &[], &[stats("a"), stats("b")]);
        // Each family's HELP and TYPE once, before all of its samples.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or("").to_string();
                assert!(seen.insert(name.clone()), "{name} declared twice:\n{out}");
                current = name;
            } else if !line.starts_with('#') {
                assert!(
                    line.starts_with(&current),
                    "{line} outside {current}:\n{out}"
                );
            }
        }
        assert!(
            out.contains("# TYPE ferrovisor_vm_block_inflight gauge"),
            "{out}"
        );
        assert!(out.contains("# TYPE ferrovisor_vm_block_read_requests_total counter"));
        assert!(out.contains(
            "ferrovisor_vm_block_read_requests_total{vm=\"b\",id=\"abababababababababababababababab\",device=\"data\"} 4"
        ));
        assert!(out.contains("ferrovisor_vm_vcpu_seconds_total{vm=\"a\""));
        assert!(!out.contains("reason=\"total\""));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        // promtool, where installed (CI installs it).
        let dir = std::env::temp_dir().join(format!("fv-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("m.txt");
        std::fs::write(&file, &out).expect("write");
        if let Ok(o) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).expect("open"))
            .output()
        {
            assert!(
                o.status.success(),
                "{}{}\n{out}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
