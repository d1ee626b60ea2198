//! Every error the HTTP API returns: a status and an [`ApiError`] JSON body naming the field
//! and the reason. Mapping from the store's and the config's errors lives here.

use crate::error::StoreError;
use crate::manager::OpError;
use api::ApiError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use config::ConfigError;

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

    /// A configuration the host cannot run: 422 naming the config field concerned and the
    /// reason (phrased for the API: fields, not the CLI's flags).
    pub fn config(e: &ConfigError) -> Failure {
        let field = config_field(e);
        let reason = e.reason();
        let mut f = Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_value",
            Some(field.clone()),
            reason.clone(),
        );
        f.body.error = format!("invalid {field}: {reason}");
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

/// The request path of the config field `e` is about (`config.cpus`, `config.disks[1].path`),
/// or `config` for the configuration as a whole.
pub fn config_field(e: &ConfigError) -> String {
    match e.field() {
        Some(f) => format!("config.{f}"),
        None => "config".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::{DiskConfig, VmConfig};

    #[test]
    fn config_errors_name_their_field() {
        let dir = std::env::temp_dir().join(format!("fv-failure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k");
        std::fs::write(
            &kernel,
            b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0",
        )
        .unwrap();
        let disk = |p: &str| DiskConfig {
            path: dir.join(p),
            readonly: false,
            id: None,
            iops: None,
            bw: None,
        };
        std::fs::write(dir.join("a"), [0u8; 512]).unwrap();
        let host = config::HostLimits {
            max_vcpus: 8,
            host_memory: 1 << 34,
        };
        let cfg = VmConfig {
            kernel: Some(kernel),
            disks: vec![disk("a"), disk("b")],
            ..Default::default()
        };
        let e = cfg.validate(&host).unwrap_err();
        assert_eq!(config_field(&e), "config.disks[1].path");
        let f = Failure::config(&e);
        assert_eq!(f.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(f.body.field.as_deref(), Some("config.disks[1].path"));
        assert!(
            f.body.reason.ends_with("b: no such file"),
            "{}",
            f.body.reason
        );
        assert!(
            f.body.error.starts_with("invalid config.disks[1].path: "),
            "{}",
            f.body.error
        );
        assert_eq!(config_field(&ConfigError::NoCpus), "config.cpus");
        assert_eq!(config_field(&ConfigError::NothingToBoot), "config.kernel");
        assert_eq!(
            config_field(&ConfigError::TooManyDevices { count: 9, max: 8 }),
            "config"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
