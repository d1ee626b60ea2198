//! Ferrovisor's public HTTP API: the request and response bodies of the daemon's `/v1/...`
//! routes (serde), with their OpenAPI schemas (`utoipa`). The daemon serves these types and
//! generates its OpenAPI document (`GET /openapi.json`) from them and from its handlers; a
//! client only needs this crate.
//!
//! The VM configuration is [`config::VmConfig`], the same type `ferrovisor run --config FILE`
//! reads: one type, one validation. The daemon-to-VMM control protocol ([`control`]) is here
//! too: both processes use the same [`control::VmCommand`] and [`control::VmResponse`]. This
//! crate links no KVM.
#![deny(missing_docs)]

pub mod control;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub use config::VmConfig;

/// The API version prefix of every route but `/openapi.json`.
pub const API_PREFIX: &str = "/v1";

/// What the daemon does when a VM's VMM ends without being asked to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Leave it down.
    #[default]
    Never,
    /// Restart it when it crashed (not when the guest powered off).
    OnFailure,
    /// Restart it whenever it ends.
    Always,
}

/// What the user wants a VM to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredState {
    /// Running (started, and restarted according to its restart policy).
    Running,
    /// Stopped.
    Stopped,
}

/// Where a VM's VMM process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Defined, never started.
    Created,
    /// Its VMM is being spawned.
    Starting,
    /// Its VMM runs the guest.
    Running,
    /// Its VMM runs, vCPUs parked.
    Paused,
    /// A stop was asked; the VMM has not ended yet.
    Stopping,
    /// Ended because it was asked to.
    Stopped,
    /// Ended abnormally (VMM died, guest panic, fault).
    Crashed,
    /// Ended by itself without error (guest power-off).
    Exited,
}

/// What an [`Event`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A VM was defined.
    Created,
    /// Its VMM was started.
    Started,
    /// It was paused.
    Paused,
    /// It was resumed.
    Resumed,
    /// It stopped when asked to.
    Stopped,
    /// It crashed.
    Crashed,
    /// It ended by itself.
    Exited,
    /// A restart was scheduled.
    Restarted,
    /// It was deleted.
    Deleted,
    /// A restarted daemon re-adopted its running VMM.
    Adopted,
    /// The daemon was started with `--allow-unconfined`: its VMMs run without the walls the
    /// event's `detail.walls` lists (no `vm_id`).
    Unconfined,
}

/// `ALL`, `as_str`, `Display` and `FromStr` of a state enum, from its spellings: the same words
/// as its JSON (a test checks they agree), and what the daemon's store keeps.
macro_rules! spelled {
    ($name:ident { $($var:ident = $s:literal),+ $(,)? }) => {
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// Its spelling, as in JSON.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $s),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(UnknownValue {
                        value: s.to_string(),
                        expected: &[$($s),+],
                    }),
                }
            }
        }
    };
}

spelled!(RestartPolicy {
    Never = "never",
    OnFailure = "on-failure",
    Always = "always",
});

spelled!(DesiredState {
    Running = "running",
    Stopped = "stopped",
});

spelled!(VmState {
    Created = "created",
    Starting = "starting",
    Running = "running",
    Paused = "paused",
    Stopping = "stopping",
    Stopped = "stopped",
    Crashed = "crashed",
    Exited = "exited",
});

spelled!(EventKind {
    Created = "created",
    Started = "started",
    Paused = "paused",
    Resumed = "resumed",
    Stopped = "stopped",
    Crashed = "crashed",
    Exited = "exited",
    Restarted = "restarted",
    Deleted = "deleted",
    Adopted = "adopted",
    Unconfined = "unconfined",
});

/// A word that is none of a state enum's spellings (the error of its `FromStr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownValue {
    /// The word.
    pub value: String,
    /// The spellings it could have been.
    pub expected: &'static [&'static str],
}

impl std::fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}: expected one of {}",
            self.value,
            self.expected.join(", ")
        )
    }
}

impl std::error::Error for UnknownValue {}

impl VmState {
    /// Whether a VMM process may exist in this state (`starting`, `running`, `paused`,
    /// `stopping`).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

impl RestartPolicy {
    /// Whether this policy restarts a VM that ended in `state` (`crashed` or `exited`).
    pub fn wants_restart(self, state: VmState) -> bool {
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => state == VmState::Crashed,
            RestartPolicy::Always => matches!(state, VmState::Crashed | VmState::Exited),
        }
    }
}

/// `POST /v1/vms`: define a VM. Unknown fields are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// Unique name: 1–63 characters of `A-Z a-z 0-9 . _ -`, not starting with `-` or `.`, and
    /// not 32 hex digits (the shape of an id).
    #[schema(example = "web-1", pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$")]
    pub name: String,
    /// The VM's configuration (the same as `ferrovisor run --config FILE`).
    pub config: VmConfig,
    /// What to do when its VMM ends by itself.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Start it once defined (desired state `running`); default false.
    #[serde(default)]
    pub start: bool,
    /// Host resource limits of its VMM process (cgroups v2).
    #[serde(default)]
    pub resources: Resources,
}

/// Host resource limits of one VM's VMM process, applied through a cgroup v2 of its own
/// (`cpu.weight`, `cpu.max`, `memory.max`, `pids.max`). Unset fields leave the kernel's
/// default (no limit). On a host without cgroups v2 (or without these controllers delegated
/// to the daemon) a VM with limits is refused at start with the reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Relative CPU share against the other VMs (`cpu.weight`, 1–10000; the kernel's default
    /// is 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 100, minimum = 1, maximum = 10000)]
    pub cpu_weight: Option<u32>,
    /// CPU time cap in percent of one host CPU (`cpu.max`; 150 = one and a half CPUs), 1 to
    /// 100 × the host's CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 150, minimum = 1)]
    pub cpu_max_percent: Option<u32>,
    /// Memory cap of the whole VMM process, guest RAM included (`memory.max`): at least the
    /// guest's memory plus 16 MiB. `"1G"`, `"1536M"` or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<config::ByteSize>,
    /// Most tasks (threads) the VMM may have (`pids.max`): at least its vCPUs + 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 64, minimum = 1)]
    pub pids_max: Option<u32>,
}

impl Resources {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// `POST /v1/vms/{vm}/shutdown`: the ACPI power button, then after `timeout_s` seconds the
/// VMM is stopped, then killed. An empty body takes the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds the guest gets to power off after the button press (1–3600, default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 30, minimum = 1, maximum = 3600)]
    pub timeout_s: Option<u32>,
}

/// `DELETE`-less actions and their answers use [`VmInfo`]; `GET /v1/vms/{vm}/stats` answers
/// this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmStats {
    /// The VM's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// The VMM's pid.
    pub pid: u32,
    /// Milliseconds since its VMM started.
    pub uptime_ms: u64,
    /// The VMM process's resident memory (guest RAM it touched included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Guest memory configured.
    pub memory_bytes: u64,
    /// Per vCPU: exits by reason and CPU time.
    pub vcpus: Vec<VcpuStats>,
    /// Per virtio device: its counters.
    pub devices: Vec<DeviceStats>,
    /// The VM's cgroup counters, when it has a cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupUsage>,
    /// The balloon, when the VM has one (target, actual, the guest's memory statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<control::BalloonStats>,
}

/// A VM cgroup's counters (what its limits are measured against).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CgroupUsage {
    /// `memory.current`: bytes charged to the VMM (guest RAM it touched included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// `cpu.stat` `usage_usec`: CPU time of all its threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_usec: Option<u64>,
    /// `pids.current`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// `memory.events` `oom_kill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
}

/// One vCPU's counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VcpuStats {
    /// Its index.
    pub vcpu: u32,
    /// KVM exits by reason (`io_in`, `io_out`, `mmio_read`, `mmio_write`, `hlt`, ...) and
    /// `total`.
    pub exits: std::collections::BTreeMap<String, u64>,
    /// CPU time its thread used (user + system), in milliseconds, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ms: Option<u64>,
}

/// One virtio device's counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceStats {
    /// `block`, `net`, `vsock`, `rng`, `balloon`, `console`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its id.
    pub id: String,
    /// Its counters (requests, bytes, errors, ...).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// A VM as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    /// Stable id: 32 lowercase hex digits.
    #[schema(example = "3f2a9c0d5e6b7a8190a1b2c3d4e5f607")]
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Where its VMM is.
    pub state: VmState,
    /// What the user wants.
    pub desired_state: DesiredState,
    /// What happens when it ends by itself.
    pub restart_policy: RestartPolicy,
    /// Its configuration.
    pub config: VmConfig,
    /// The VMM's pid while it lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Milliseconds since it started, while its VMM lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// When it last started (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// Restarts by the restart policy since the count was last reset.
    pub restart_count: u32,
    /// Why it last ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_reason: Option<String>,
    /// Its last exit status, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_code: Option<i32>,
    /// When it was defined (Unix milliseconds).
    pub created_at: i64,
    /// Its host resource limits.
    #[serde(default)]
    pub resources: Resources,
}

/// Every error the API returns (4xx and 5xx), as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// A human-readable message: what was refused and why.
    #[schema(example = "invalid config.cpus: a VM needs at least one vCPU")]
    pub error: String,
    /// The input at fault, as a path into the request (`name`, `config.cpus`,
    /// `config.disks[0].path`), or `vm` (the VM named in the URL), `state` (the VM's state
    /// does not allow the action), `body` (the request body as a whole), a query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "config.cpus")]
    pub field: Option<String>,
    /// What is wrong with it.
    #[schema(example = "a VM needs at least one vCPU")]
    pub reason: String,
    /// A stable machine-readable code: `malformed_json`, `invalid_request`, `invalid_value`,
    /// `name_taken`, `not_found`, `conflict`, `no_route`, `method_not_allowed`,
    /// `body_too_large`, `internal`.
    #[schema(example = "invalid_value")]
    pub code: String,
}

/// How KVM is provided on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum KvmFlavour {
    /// Hardware virtualization (VT-x through `kvm_intel`, AMD-V through `kvm_amd`).
    Hardware,
    /// PVM (`kvm_pvm`): runs PVM-aware guest kernels only.
    Pvm,
    /// Not identified.
    Unknown,
}

/// What the VMs that may have a VMM (starting, running, paused, stopping) take.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Capacity {
    /// How many such VMs.
    pub vms: u32,
    /// Their vCPUs.
    pub cpus: u64,
    /// Their guest memory, bytes.
    pub memory_bytes: u64,
}

/// Whether VM resource limits (cgroups v2) can be applied on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CgroupInfo {
    /// Whether VMs get cgroups (limits and accounting).
    pub available: bool,
    /// The directory under which each VM gets its cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The controllers limits can use (`cpu`, `memory`, `pids`).
    pub controllers: Vec<String>,
    /// Why limits (or some of them) cannot be applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `GET /v1/host`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    /// The KVM flavour.
    pub kvm_flavour: KvmFlavour,
    /// The KVM module found in /sys/module (`kvm_intel`, `kvm_amd`, `kvm_pvm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_module: Option<String>,
    /// The KVM device the daemon uses.
    pub kvm_path: String,
    /// Whether that device opens and has the API version and capabilities we need.
    pub kvm_usable: bool,
    /// Why it is not usable, with how to fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_error: Option<String>,
    /// KVM's vCPU limit per VM (capped at what the guest interface supports).
    pub max_vcpus: u32,
    /// The host's online CPUs.
    pub cpus: u32,
    /// The host's RAM, bytes.
    pub memory_bytes: u64,
    /// How many VMs are defined.
    pub vms: u32,
    /// What the VMs that may be running take.
    pub in_use: Capacity,
    /// Per-VM resource limits (cgroups v2): available or why not.
    pub cgroups: CgroupInfo,
    /// Each wall around the VMMs: `namespaces`, `filesystem`, `identity`, `seccomp`,
    /// `landlock`, `cgroups`, `apparmor`, `selinux`.
    pub walls: Vec<WallInfo>,
}

/// One wall around the VMMs, as this daemon puts it up on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WallInfo {
    /// Its name.
    pub name: String,
    /// Whether this host offers it.
    pub available: bool,
    /// Whether VMs get it: on (and available), unless the operator let them run without it
    /// (`--allow-unconfined`).
    pub enabled: bool,
    /// Whether a VM that cannot have it must not start: always for the walls the VMM puts up
    /// itself (namespaces, filesystem, identity, seccomp) unless they are off; for the
    /// host-dependent ones (landlock, cgroups, apparmor, selinux) when `--require`d.
    pub required: bool,
    /// `--allow-unconfined` turned it off.
    pub unconfined_by_operator: bool,
    /// What it is here, or why this host does not offer it.
    pub detail: String,
}

/// One entry of the daemon's event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Strictly increasing id; pass the last one seen as `after`.
    pub id: i64,
    /// When it was recorded (Unix milliseconds).
    pub at: i64,
    /// The VM it is about (it may since have been deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// Details (a JSON object); their keys depend on the kind.
    #[schema(value_type = Object)]
    pub detail: Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_vm_defaults_and_unknown_fields() {
        let c: CreateVm =
            serde_json::from_str(r#"{"name":"a","config":{"kernel":"/k"}}"#).expect("parses");
        assert_eq!(c.restart_policy, RestartPolicy::Never);
        assert!(!c.start);
        assert_eq!(c.config.cpus, 1);
        let e = serde_json::from_str::<CreateVm>(r#"{"name":"a","config":{},"x":1}"#)
            .expect_err("unknown field");
        assert!(e.to_string().contains("unknown field `x`"), "{e}");
        let p: RestartPolicy = serde_json::from_str(r#""on-failure""#).expect("parses");
        assert_eq!(p, RestartPolicy::OnFailure);
    }

    #[test]
    fn spellings_are_the_json_names() {
        fn check<T>(all: &[T])
        where
            T: Copy
                + Serialize
                + std::fmt::Display
                + std::str::FromStr
                + PartialEq
                + std::fmt::Debug,
        {
            for v in all {
                let word = v.to_string();
                assert_eq!(
                    serde_json::to_value(v).ok(),
                    Some(Value::String(word.clone()))
                );
                assert_eq!(word.parse::<T>().ok(), Some(*v));
            }
        }
        check(RestartPolicy::ALL);
        check(DesiredState::ALL);
        check(VmState::ALL);
        check(EventKind::ALL);
        let e = "sometimes"
            .parse::<RestartPolicy>()
            .expect_err("not a policy");
        assert_eq!(
            e.to_string(),
            r#""sometimes": expected one of never, on-failure, always"#
        );
    }

    #[test]
    fn restart_policies() {
        use RestartPolicy::*;
        assert!(!Never.wants_restart(VmState::Crashed));
        assert!(OnFailure.wants_restart(VmState::Crashed));
        assert!(!OnFailure.wants_restart(VmState::Exited));
        assert!(Always.wants_restart(VmState::Exited));
        assert!(!Always.wants_restart(VmState::Stopped));
    }

    #[test]
    fn optional_fields_are_left_out() {
        let e = ApiError {
            error: "x".into(),
            field: None,
            reason: "y".into(),
            code: "z".into(),
        };
        let v = serde_json::to_value(&e).expect("serialises");
        assert!(v.get("field").is_none());
    }
}
