//! `/v1/host`: what the host offers and what the VMs take.

use super::failure::Failure;
use super::state::AppState;
use api::{ApiError, Capacity, HostInfo, KvmFlavour};
use axum::extract::State;
use axum::Json;
use vmm::kvm::KvmFlavour as Detected;

/// KVM flavour (hardware or PVM), CPUs, memory, and the capacity the live VMs take.
#[utoipa::path(
    get,
    path = "/v1/host",
    tag = "host",
    responses(
        (status = 200, description = "The host", body = HostInfo),
        (status = 500, description = "The daemon failed", body = ApiError),
    )
)]
pub async fn host_info(State(st): State<AppState>) -> Result<Json<HostInfo>, Failure> {
    let kvm_path = st.config().kvm_path.clone();
    let cgroups = match st.manager().cgroups() {
        Ok(root) => api::CgroupInfo {
            available: true,
            path: Some(root.parent().display().to_string()),
            controllers: root
                .controllers()
                .iter()
                .map(|c| c.name().to_string())
                .collect(),
            reason: root.missing_controllers().map(|u| u.to_string()),
        },
        Err(why) => api::CgroupInfo {
            available: false,
            path: None,
            controllers: Vec::new(),
            reason: Some(why.to_string()),
        },
    };
    let policy = st.config().jail.clone();
    let walls = walls(&policy, &cgroups);
    st.blocking(move |s| {
        let vms = s.list()?;
        let (flavour, module) = match Detected::detect() {
            Detected::Intel => (KvmFlavour::Hardware, Some("kvm_intel")),
            Detected::Amd => (KvmFlavour::Hardware, Some("kvm_amd")),
            Detected::Pvm => (KvmFlavour::Pvm, Some("kvm_pvm")),
            Detected::Unknown => (KvmFlavour::Unknown, None),
        };
        let kvm_error = vmm::kvm::open_kvm(&kvm_path).err().map(|e| e.to_string());
        let limits = vmm::vm::probe_host_limits(&kvm_path);
        let mut in_use = Capacity::default();
        for v in vms.iter().filter(|v| v.runtime.state.is_live()) {
            in_use.vms += 1;
            in_use.cpus += u64::from(v.config.cpus);
            in_use.memory_bytes = in_use.memory_bytes.saturating_add(v.config.memory.0);
        }
        Ok(Json(HostInfo {
            kvm_flavour: flavour,
            kvm_module: module.map(str::to_string),
            kvm_path: kvm_path.display().to_string(),
            kvm_usable: kvm_error.is_none(),
            kvm_error,
            max_vcpus: limits.max_vcpus.min(config::MAX_VCPUS_GUEST),
            cpus: crate::cgroup::host_cpus(),
            memory_bytes: limits.host_memory,
            vms: u32::try_from(vms.len()).unwrap_or(u32::MAX),
            in_use,
            cgroups,
            walls,
        }))
    })
    .await
}

/// Each wall: what the host offers, and what the daemon's policy makes of it.
pub fn walls(policy: &crate::manager::JailPolicy, cgroups: &api::CgroupInfo) -> Vec<api::WallInfo> {
    let probe = jail::probe();
    jail::Wall::ALL
        .iter()
        .map(|&w| {
            let (available, detail) = match probe.iter().find(|s| s.wall == w) {
                Some(s) => (s.available, s.detail.clone()),
                None => (
                    cgroups.available,
                    cgroups
                        .reason
                        .clone()
                        .unwrap_or_else(|| match &cgroups.path {
                            Some(p) => format!("a cgroup per VM under {p}"),
                            None => "a cgroup per VM".into(),
                        }),
                ),
            };
            let off = policy.skip.contains(&w);
            api::WallInfo {
                name: w.name().to_string(),
                available,
                enabled: available && !off,
                required: !off && (!w.host_dependent() || policy.require.contains(&w)),
                unconfined_by_operator: off,
                detail,
            }
        })
        .collect()
}
