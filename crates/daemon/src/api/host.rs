//! `/v1/host`: what the host offers and what the VMs take.

use super::failure::Failure;
use super::AppState;
use api::{ApiError, Capacity, HostInfo, KvmFlavour};
use axum::extract::State;
use axum::Json;
use std::path::Path;
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
            max_vcpus: limits.max_vcpus.min(vmm::config::MAX_VCPUS_GUEST),
            cpus: online_cpus(),
            memory_bytes: limits.host_memory,
            vms: u32::try_from(vms.len()).unwrap_or(u32::MAX),
            in_use,
            cgroups,
        }))
    })
    .await
}

/// The host's online CPUs, from `/sys/devices/system/cpu/online` ("0-3,6,8-9").
fn online_cpus() -> u32 {
    std::fs::read_to_string(Path::new("/sys/devices/system/cpu/online"))
        .ok()
        .and_then(|s| count_cpu_list(s.trim()))
        .or_else(|| {
            std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
        })
        .unwrap_or(1)
}

fn count_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_lists() {
        assert_eq!(super::count_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(super::count_cpu_list("0"), Some(1));
        assert_eq!(super::count_cpu_list("3-1"), None);
        assert_eq!(super::count_cpu_list(""), None);
    }
}
