//! Opening `/dev/kvm`, telling which KVM it is, and checking what the VMM needs from it — with
//! errors that say how to fix the host.

use kvm_ioctls::{Cap, Kvm};
use std::fmt;
use std::path::Path;

/// The KVM device node.
pub const KVM_PATH: &str = "/dev/kvm";

/// Which KVM implementation backs `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavour {
    /// Intel VT-x (`kvm_intel`).
    Intel,
    /// AMD-V/SVM (`kvm_amd`).
    Amd,
    /// PVM (`kvm_pvm`): shadow paging for clouds without VT-x; runs PVM-aware kernels only.
    Pvm,
    /// None of the above could be identified (the VMM still tries).
    Unknown,
}

impl KvmFlavour {
    /// Identifies the flavour from the loaded modules in `/sys/module`.
    pub fn detect() -> KvmFlavour {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Same, reading module presence from `sys_module`.
    pub fn detect_in(sys_module: &Path) -> KvmFlavour {
        // PVM first: a PVM host may also have kvm_intel/kvm_amd loaded without hardware support.
        if sys_module.join("kvm_pvm").exists() {
            KvmFlavour::Pvm
        } else if sys_module.join("kvm_intel").exists() {
            KvmFlavour::Intel
        } else if sys_module.join("kvm_amd").exists() {
            KvmFlavour::Amd
        } else {
            KvmFlavour::Unknown
        }
    }

    /// Whether a stock (non-PVM-aware) Linux kernel can run on it.
    pub fn runs_stock_kernels(self) -> bool {
        self != KvmFlavour::Pvm
    }

    /// Short machine-readable name.
    pub fn name(self) -> &'static str {
        match self {
            KvmFlavour::Intel => "hardware (kvm_intel, VT-x)",
            KvmFlavour::Amd => "hardware (kvm_amd, AMD-V)",
            KvmFlavour::Pvm => "pvm (kvm_pvm)",
            KvmFlavour::Unknown => "unknown",
        }
    }
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a PVM host means for a stock kernel; used in errors and `ferrovisor host`.
pub const PVM_HINT: &str = "this host's /dev/kvm is PVM (the kvm_pvm module): it runs only \
PVM-aware guest kernels, and a stock kernel fails with an emulation failure. Run stock kernels \
on a host with VT-x/AMD-V (kvm_intel or kvm_amd), or inside the lab: tests/lab/lab.sh";

/// Problems with the host's KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// No device node.
    #[error(
        "{path} does not exist: KVM is not available. Load the module for your CPU \
(`modprobe kvm_intel` or `modprobe kvm_amd`), make sure VT-x/AMD-V is enabled in the firmware \
settings, and, inside a VM, that nested virtualization is enabled"
    )]
    Missing {
        /// The path.
        path: String,
    },
    /// Not allowed to open it.
    #[error(
        "{path}: permission denied. Add your user to the group that owns it (usually `kvm`: \
`sudo usermod -aG kvm $USER`, then log in again), or run as root. Currently: {mode}"
    )]
    PermissionDenied {
        /// The path.
        path: String,
        /// Its owner/group/mode, for the user.
        mode: String,
    },
    /// Exists but is not the KVM character device.
    #[error(
        "{path} is not a character device (found {found}); recreate it with \
`mknod {path} c 10 232` or reload the kvm module"
    )]
    NotADevice {
        /// The path.
        path: String,
        /// What it is.
        found: String,
    },
    /// Any other open failure.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A KVM API version other than 12.
    #[error(
        "{path}: KVM API version {found}, this VMM needs 12; the host kernel is too old or \
its KVM is not the Linux one"
    )]
    ApiVersion {
        /// The path.
        path: String,
        /// What the kernel reported.
        found: i32,
    },
    /// A capability the VMM relies on.
    #[error(
        "{path}: KVM lacks {cap} ({what}); upgrade the host kernel (Linux 5.10 or later \
has everything Ferrovisor needs)"
    )]
    MissingCapability {
        /// The path.
        path: String,
        /// The capability's name.
        cap: &'static str,
        /// What it is used for.
        what: &'static str,
    },
    /// A KVM ioctl failed while setting the VM up.
    #[error("{op}: {source}")]
    Ioctl {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

/// Capabilities the VMM cannot work without, and why.
pub const REQUIRED_CAPS: &[(Cap, &str, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP", "in-kernel IOAPIC/LAPIC"),
    (
        Cap::IrqRouting,
        "KVM_CAP_IRQ_ROUTING",
        "IOAPIC-only interrupt routing",
    ),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY", "guest memory slots"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR", "x86 TSS placement"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID", "CPUID set-up"),
    (Cap::Irqfd, "KVM_CAP_IRQFD", "device interrupts"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD", "device notifications"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT",
        "stopping vCPUs",
    ),
    (Cap::MpState, "KVM_CAP_MP_STATE", "SMP start-up"),
];

fn describe_mode(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match path.metadata() {
        Ok(md) => format!(
            "owner uid {} gid {}, mode {:o}; you are uid {} gid {}",
            md.uid(),
            md.gid(),
            md.mode() & 0o777,
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            unsafe { libc::getuid() },
            // SAFETY: as above.
            unsafe { libc::getgid() }
        ),
        Err(e) => e.to_string(),
    }
}

/// Opens the KVM device at `path` and checks its API version and capabilities.
pub fn open_kvm(path: &Path) -> Result<Kvm, KvmError> {
    use std::os::unix::fs::FileTypeExt;
    let p = path.display().to_string();
    let md = match path.metadata() {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KvmError::Missing { path: p })
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(KvmError::PermissionDenied {
                mode: describe_mode(path),
                path: p,
            })
        }
        Err(source) => return Err(KvmError::Open { path: p, source }),
    };
    if !md.file_type().is_char_device() {
        let found = if md.is_dir() {
            "a directory"
        } else if md.is_file() {
            "a regular file"
        } else {
            "another kind of file"
        };
        return Err(KvmError::NotADevice {
            path: p,
            found: found.into(),
        });
    }
    let kvm = Kvm::new_with_path(c_path(path)).map_err(|e| {
        let io = std::io::Error::from_raw_os_error(e.errno());
        match io.kind() {
            std::io::ErrorKind::PermissionDenied => KvmError::PermissionDenied {
                mode: describe_mode(path),
                path: p.clone(),
            },
            std::io::ErrorKind::NotFound => KvmError::Missing { path: p.clone() },
            _ if e.errno() == libc::ENXIO || e.errno() == libc::ENODEV => {
                KvmError::Missing { path: p.clone() }
            }
            _ => KvmError::Open {
                path: p.clone(),
                source: io,
            },
        }
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion {
            path: p,
            found: version,
        });
    }
    for &(cap, name, what) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability {
                path: p,
                cap: name,
                what,
            });
        }
    }
    Ok(kvm)
}

/// `path` as a C string (a path with a NUL byte cannot exist, so it maps to an empty path that
/// fails to open).
pub fn c_path(path: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// The host's total RAM in bytes, from `/proc/meminfo`.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| parse_meminfo_total(&s))
        .unwrap_or(u64::MAX)
}

fn parse_meminfo_total(s: &str) -> Option<u64> {
    meminfo_field(s, "MemTotal:")?.checked_mul(1024)
}

/// The number after `name` (e.g. `HugePages_Free:`) in `/proc/meminfo`'s text `s` (kB for
/// sizes, a count for page counts).
pub fn meminfo_field(s: &str, name: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_from_modules() {
        let dir = std::env::temp_dir().join(format!("fv-sysmod-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Unknown);
        std::fs::create_dir(dir.join("kvm_amd")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Amd);
        std::fs::create_dir(dir.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Pvm);
        assert!(!KvmFlavour::Pvm.runs_stock_kernels());
        assert!(KvmFlavour::Amd.runs_stock_kernels());
    }

    #[test]
    fn missing_and_wrong_device_nodes() {
        let e = open_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(e, KvmError::Missing { .. }));
        assert!(e.to_string().contains("modprobe kvm_intel"), "{e}");
        let e = open_kvm(Path::new("/proc/meminfo")).unwrap_err();
        assert!(matches!(e, KvmError::NotADevice { .. }), "{e}");
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       24596444 kB\nMemFree: 1 kB\n"),
            Some(24596444 * 1024)
        );
        assert_eq!(parse_meminfo_total("nothing"), None);
    }
}
