//! Every error the HTTP API returns: a status and an [`ApiError`] JSON body naming the field
//! and the reason. Mapping from the store's and the config's errors lives here.

use crate::error::StoreError;
use crate::manager::OpError;
use api::ApiError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use vmm::config::ConfigError;
use vmm::VmConfig;

/// An API error: its status and body.
#[derive(Debug)]
pub struct Failure {
    /// The HTTP status.
    pub status: StatusCode,
    /// The JSON body.
    pub body: ApiError,
}

impl Failure {
    /// A failure about `field` (when there is one).
    pub fn new(
        status: StatusCode,
        code: &str,
        field: Option<String>,
        reason: impl Into<String>,
    ) -> Failure {
        let reason = reason.into();
        let error = match &field {
            Some(f) => format!("{f}: {reason}"),
            None => reason.clone(),
        };
        Failure {
            status,
            body: ApiError {
                error,
                field,
                reason,
                code: code.into(),
            },
        }
    }

    /// A 400 about a request field or query parameter.
    pub fn bad_request(field: &str, reason: impl Into<String>) -> Failure {
        Failure::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            Some(field.into()),
            reason,
        )
    }

    /// A 500: the daemon's own failure.
    pub fn internal(reason: impl Into<String>) -> Failure {
        Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", None, reason)
    }

    /// A configuration the host cannot run: 422 naming the config field concerned.
    pub fn config(cfg: &VmConfig, e: &ConfigError) -> Failure {
        let mut f = Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some(config_field(cfg, e)),
            e.to_string(),
        );
        f.body.error = format!(
            "invalid {}: {e}",
            f.body.field.as_deref().unwrap_or("config")
        );
        f
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        let message = e.to_string();
        let (status, code, field, reason) = match e {
            StoreError::NameTaken(name) => (
                StatusCode::CONFLICT,
                "name_taken",
                Some("name".to_string()),
                format!("a VM named {name:?} already exists"),
            ),
            StoreError::NotFound(vm) => (
                StatusCode::NOT_FOUND,
                "not_found",
                Some("vm".to_string()),
                format!("no VM with id or name {vm:?}"),
            ),
            StoreError::Invalid { field, reason } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_value",
                Some(field.to_string()),
                reason,
            ),
            StoreError::Conflict { state, action, .. } => (
                StatusCode::CONFLICT,
                "conflict",
                Some("state".to_string()),
                format!("the VM is {state}: cannot {action}"),
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                None,
                message.clone(),
            ),
        };
        let mut f = Failure::new(status, code, field, reason);
        f.body.error = message;
        f
    }
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Failure {
        let message = e.to_string();
        let mut f = match e {
            OpError::Store(s) => return Failure::from(s),
            OpError::Launch { reason, .. } => Failure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "start_failed",
                None,
                format!("the VMM did not start: {reason}"),
            ),
            OpError::Control { action, reason, .. } => Failure::new(
                StatusCode::CONFLICT,
                "vmm_refused",
                None,
                format!("the VMM refused {action}: {reason}"),
            ),
            OpError::Internal(reason) => Failure::internal(reason),
        };
        f.body.error = message;
        f
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// The field of `cfg` that `e` is about, as a request path (`config.cpus`,
/// `config.disks[1].path`, …).
pub fn config_field(cfg: &VmConfig, e: &ConfigError) -> String {
    use ConfigError::*;
    let disk_index = |path: &std::path::Path| cfg.disks.iter().position(|d| d.path == path);
    let field = match e {
        NoCpus | TooManyCpus { .. } => "cpus".to_string(),
        Size(_) | MemoryTooSmall(_) | MemoryUnaligned(_) | MemoryTooLarge { .. } => {
            "memory".to_string()
        }
        NothingToBoot | NotAKernel(_) => "kernel".to_string(),
        KernelAndFirmware | FirmwareSize { .. } => "firmware".to_string(),
        BootArgsWithoutKernel => {
            if cfg.initrd.is_some() {
                "initrd".to_string()
            } else {
                "cmdline".to_string()
            }
        }
        CmdlineTooLong { .. } => "cmdline".to_string(),
        Serial(_) | SerialSocketExists(_) => "serial".to_string(),
        File { what, path, .. } => match *what {
            "kernel" | "initrd" | "firmware" => what.to_string(),
            "disk" => match disk_index(path) {
                Some(i) => format!("disks[{i}].path"),
                None => "disks".to_string(),
            },
            "vsock socket" => "vsock.socket".to_string(),
            "console socket" => "console".to_string(),
            _ => String::new(),
        },
        DeviceOption { flag, value, .. } => match *flag {
            "--net" => cfg
                .nets
                .iter()
                .position(|n| value.strip_prefix("tap=") == Some(n.tap.as_str()))
                .map(|i| format!("nets[{i}].tap"))
                .unwrap_or_else(|| "nets".to_string()),
            "--disk" => "disks".to_string(),
            "--vsock" => {
                if value.starts_with("cid=") {
                    "vsock.cid".to_string()
                } else {
                    "vsock".to_string()
                }
            }
            "--balloon" => {
                if value.starts_with("size=") {
                    "balloon.size".to_string()
                } else {
                    "balloon".to_string()
                }
            }
            "--console" => "console".to_string(),
            _ => String::new(),
        },
        Duplicate(msg) => {
            if msg.starts_with("disk ") {
                "disks".to_string()
            } else if msg.starts_with("TAP ") {
                "nets".to_string()
            } else {
                String::new()
            }
        }
        TooManyDevices { .. } | ConfigFile { .. } => String::new(),
    };
    if field.is_empty() {
        "config".to_string()
    } else {
        format!("config.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::config::DiskConfig;

    #[test]
    fn config_errors_name_their_field() {
        let cfg = VmConfig {
            disks: vec![
                DiskConfig {
                    path: "/a".into(),
                    readonly: false,
                    id: None,
                    iops: None,
                    bw: None,
                },
                DiskConfig {
                    path: "/b".into(),
                    readonly: false,
                    id: None,
                    iops: None,
                    bw: None,
                },
            ],
            ..Default::default()
        };
        let f = |e: ConfigError| config_field(&cfg, &e);
        assert_eq!(f(ConfigError::NoCpus), "config.cpus");
        assert_eq!(
            f(ConfigError::File {
                what: "disk",
                path: "/b".into(),
                reason: "no such file".into()
            }),
            "config.disks[1].path"
        );
        assert_eq!(f(ConfigError::NothingToBoot), "config.kernel");
        assert_eq!(
            f(ConfigError::TooManyDevices { count: 9, max: 8 }),
            "config"
        );
    }
}
