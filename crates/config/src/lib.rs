//! `VmConfig`: the one description of a VM, built by the CLI flags, read from `--config FILE`
//! and sent through the API. It is validated in one place, [`VmConfig::validate`], before any
//! KVM call. Plain data: this crate links no KVM, so the API types, the daemon and any client
//! build on it anywhere. The VMM's [`exit_report`] (what a supervisor reads when a VMM ends)
//! lives here too, for the same reason.
#![deny(missing_docs)]

mod devices;
pub mod exit_report;
mod schema;

pub use devices::{BalloonConfig, DiskConfig, MacAddr, NetConfig, VsockConfig};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Smallest guest: enough for the boot structures below 1 MiB plus a little RAM.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest firmware image mapped below 4 GiB.
pub const MAX_FIRMWARE_SIZE: u64 = 8 << 20;
/// Largest vCPU count the guest interface supports (xAPIC IDs, 8-bit ACPI processor UIDs).
pub const MAX_VCPUS_GUEST: u32 = 254;

/// Errors in a VM configuration; each names the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size string that does not parse.
    #[error("invalid size {0:?}: expected a number of bytes with an optional K, M, G or T suffix (e.g. 512M, 2G)")]
    Size(String),
    /// A vCPU count of zero.
    #[error("--cpus 0: a VM needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than KVM (or the guest interface) allows.
    #[error("--cpus {requested}: more than this host's KVM allows ({max})")]
    TooManyCpus {
        /// What was asked for.
        requested: u32,
        /// The limit.
        max: u32,
    },
    /// Too little memory.
    #[error("--memory {0}: too small, a VM needs at least 2M")]
    MemoryTooSmall(ByteSize),
    /// Memory not a multiple of the page size.
    #[error("--memory {0}: must be a multiple of 4 KiB")]
    MemoryUnaligned(ByteSize),
    /// More memory than the host has.
    #[error("--memory {requested}: more than this host's RAM ({host})")]
    MemoryTooLarge {
        /// What was asked for.
        requested: ByteSize,
        /// The host's total RAM.
        host: ByteSize,
    },
    /// Neither a kernel nor a firmware image.
    #[error("nothing to boot: give --kernel PATH (or --firmware PATH)")]
    NothingToBoot,
    /// Both a kernel and a firmware image.
    #[error("--kernel and --firmware exclude each other")]
    KernelAndFirmware,
    /// An initrd or command line without a kernel.
    #[error("--initrd and --cmdline need --kernel")]
    BootArgsWithoutKernel {
        /// `initrd` or `cmdline`, whichever was given.
        field: &'static str,
    },
    /// A file that cannot be opened.
    #[error("{what} {path}: {reason}")]
    File {
        /// The field it is about (`kernel`, `disks[1].path`, `vsock.socket`).
        field: String,
        /// Which option.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// A kernel file that is neither a bzImage nor an x86-64 ELF.
    #[error("kernel {0}: not a Linux kernel (neither a bzImage nor an x86-64 ELF vmlinux)")]
    NotAKernel(PathBuf),
    /// A firmware image with a bad size.
    #[error("firmware {path}: size {size} bytes; it must be a non-zero multiple of 4 KiB and at most 8M")]
    FirmwareSize {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// A `--serial` value that does not parse.
    #[error("invalid --serial {0:?}: expected stdio, null, file=PATH or socket=PATH")]
    Serial(String),
    /// A serial socket path that is already taken.
    #[error("serial socket {0}: the path already exists; remove it or choose another")]
    SerialSocketExists(PathBuf),
    /// A command line that is too long.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A device option (`--disk`, `--net`, …) that does not parse or cannot work.
    #[error("invalid {flag} {value:?}: {reason}")]
    DeviceOption {
        /// The field it is about (`nets[0].tap`, `vsock.cid`; the device list when it is not
        /// known which entry).
        field: String,
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Two devices with the same id, TAP or image.
    #[error("{message}")]
    Duplicate {
        /// The second one's field (`disks[1].path`, `nets[1].id`).
        field: String,
        /// What is given twice.
        message: String,
    },
    /// More virtio devices than the machine has slots for.
    #[error("{count} virtio devices requested; at most {max} fit (rng, balloon, vsock, console, disks and NICs together)")]
    TooManyDevices {
        /// Requested.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A config file that cannot be read or parsed.
    #[error("config file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    /// A [`ConfigError::DeviceOption`] about `flag`'s device list as a whole (refine the field
    /// with [`ConfigError::at`] where the entry is known).
    pub fn device_option(flag: &'static str, value: String, reason: String) -> ConfigError {
        ConfigError::DeviceOption {
            field: flag_field(flag).to_string(),
            flag,
            value,
            reason,
        }
    }

    /// The same error about `field` instead (for the variants that carry one).
    pub fn at(mut self, field: impl Into<String>) -> ConfigError {
        match &mut self {
            ConfigError::File { field: f, .. }
            | ConfigError::DeviceOption { field: f, .. }
            | ConfigError::Duplicate { field: f, .. } => *f = field.into(),
            _ => {}
        }
        self
    }

    /// The field of the configuration this error is about, as a path into [`VmConfig`]
    /// (`cpus`, `disks[1].path`, `vsock.cid`), or `None` when it is about the configuration as
    /// a whole. The API prefixes it with `config.`; the CLI names the flag instead.
    pub fn field(&self) -> Option<String> {
        use ConfigError::*;
        let f = match self {
            NoCpus | TooManyCpus { .. } => "cpus",
            Size(_) | MemoryTooSmall(_) | MemoryUnaligned(_) | MemoryTooLarge { .. } => "memory",
            NothingToBoot | NotAKernel(_) => "kernel",
            KernelAndFirmware | FirmwareSize { .. } => "firmware",
            BootArgsWithoutKernel { field } => field,
            CmdlineTooLong { .. } => "cmdline",
            Serial(_) | SerialSocketExists(_) => "serial",
            File { field, .. } | DeviceOption { field, .. } | Duplicate { field, .. } => field,
            TooManyDevices { .. } | ConfigFile { .. } => "",
        };
        (!f.is_empty()).then(|| f.to_string())
    }

    /// What is wrong, phrased without the CLI's flags (the API's `reason`; the CLI prints the
    /// whole error, flag included).
    pub fn reason(&self) -> String {
        use ConfigError::*;
        match self {
            NoCpus => "a VM needs at least one vCPU".into(),
            TooManyCpus { requested, max } => {
                format!("{requested} vCPUs: more than this host's KVM allows ({max})")
            }
            MemoryTooSmall(m) => format!("{m}: too small, a VM needs at least 2M"),
            MemoryUnaligned(m) => format!("{m}: must be a multiple of 4 KiB"),
            MemoryTooLarge { requested, host } => {
                format!("{requested}: more than this host's RAM ({host})")
            }
            NothingToBoot => "nothing to boot: give a kernel (or a firmware image)".into(),
            KernelAndFirmware => "a kernel and a firmware image exclude each other".into(),
            BootArgsWithoutKernel { field } => format!("{field} needs a kernel"),
            File { path, reason, .. } => format!("{}: {reason}", path.display()),
            DeviceOption { value, reason, .. } => format!("{value}: {reason}"),
            Serial(s) => format!("{s:?}: expected stdio, null, file=PATH or socket=PATH"),
            other => other.to_string(),
        }
    }
}

/// The configuration field behind a device flag.
fn flag_field(flag: &str) -> &'static str {
    match flag {
        "--disk" => "disks",
        "--net" => "nets",
        "--vsock" => "vsock",
        "--balloon" => "balloon",
        "--console" => "console",
        _ => "",
    }
}

/// A size in bytes; parses `4096`, `512K`, `512M`, `2G`, `1T` (binary multiples).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = ConfigError;
    fn try_from(r: SizeRepr) -> Result<Self, ConfigError> {
        match r {
            SizeRepr::Bytes(b) => Ok(ByteSize(b)),
            SizeRepr::Text(s) => s.parse(),
        }
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

impl FromStr for ByteSize {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = || ConfigError::Size(s.to_string());
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(digits_end);
        let n: u64 = num.parse().map_err(|_| err())?;
        let shift = match suffix.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(err()),
        };
        n.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if b != 0 && b.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

/// Where COM1 goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConfig {
    /// The VMM's stdin/stdout (raw mode when stdin is a terminal).
    #[default]
    Stdio,
    /// Discard output, no input.
    Null,
    /// Append output to a file, no input.
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time gets the console.
    Socket(PathBuf),
}

impl FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let nonempty = |p: &str| {
            if p.is_empty() {
                Err(ConfigError::Serial(s.to_string()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "null" | "off" => Ok(SerialConfig::Null),
            _ => {
                if let Some(p) = s.strip_prefix("file=") {
                    Ok(SerialConfig::File(nonempty(p)?))
                } else if let Some(p) = s.strip_prefix("socket=") {
                    Ok(SerialConfig::Socket(nonempty(p)?))
                } else {
                    Err(ConfigError::Serial(s.to_string()))
                }
            }
        }
    }
}

impl TryFrom<String> for SerialConfig {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<SerialConfig> for String {
    fn from(s: SerialConfig) -> String {
        match s {
            SerialConfig::Stdio => "stdio".into(),
            SerialConfig::Null => "null".into(),
            SerialConfig::File(p) => format!("file={}", p.display()),
            SerialConfig::Socket(p) => format!("socket={}", p.display()),
        }
    }
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HugePages {
    /// Transparent huge pages where the host has them (RAM 2 MiB-aligned and advised with
    /// `MADV_HUGEPAGE`, so KVM can map it with 2 MiB pages); 4 KiB pages otherwise, said in
    /// the log.
    #[default]
    Auto,
    /// 2 MiB pages from the host's hugetlbfs pool (`/proc/sys/vm/nr_hugepages`), reserved at
    /// start: the VM does not start if the pool is short.
    On,
    /// 4 KiB pages only.
    Off,
}

impl HugePages {
    /// The default.
    pub fn is_auto(&self) -> bool {
        *self == HugePages::Auto
    }

    /// The option's value, as `--memory` takes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            HugePages::Auto => "auto",
            HugePages::On => "on",
            HugePages::Off => "off",
        }
    }
}

/// Where the guest's IOAPIC lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Irqchip {
    /// The IOAPIC in the VMM, the local APICs in KVM, no PIC (KVM's split irqchip): each pin
    /// the guest programs is an MSI route KVM delivers from the device's eventfd.
    #[default]
    Split,
    /// KVM's in-kernel IOAPIC (and its PIC, masked) beside its local APICs.
    Kernel,
}

impl Irqchip {
    /// The default.
    pub fn is_split(&self) -> bool {
        *self == Irqchip::Split
    }

    /// The name `--irqchip` takes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Irqchip::Split => "split",
            Irqchip::Kernel => "kernel",
        }
    }
}

impl FromStr for Irqchip {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "split" => Ok(Irqchip::Split),
            "kernel" => Ok(Irqchip::Kernel),
            other => Err(ConfigError::device_option(
                "--irqchip",
                other.to_string(),
                "expected split or kernel".into(),
            )
            .at("irqchip")),
        }
    }
}

/// `--memory SIZE[,hugepages=on|off|auto]`: the guest's RAM size and, if given, its backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryOption {
    /// The size.
    pub size: ByteSize,
    /// The backing, when the option names one.
    pub hugepages: Option<HugePages>,
}

impl FromStr for MemoryOption {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut parts = s.split(',');
        let size: ByteSize = parts.next().unwrap_or_default().parse()?;
        let mut hugepages = None;
        for part in parts {
            let bad = |reason: String| {
                ConfigError::device_option("--memory", s.to_string(), reason).at("hugepages")
            };
            let value = part.strip_prefix("hugepages=").ok_or_else(|| {
                bad(format!(
                    "unknown option {part:?} (expected SIZE[,hugepages=on|off|auto])"
                ))
            })?;
            hugepages = Some(match value {
                "on" => HugePages::On,
                "off" => HugePages::Off,
                "auto" => HugePages::Auto,
                other => return Err(bad(format!("hugepages={other}: expected on, off or auto"))),
            });
        }
        Ok(MemoryOption { size, hugepages })
    }
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> ByteSize {
    ByteSize(512 << 20)
}

/// Everything needed to build one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Linux kernel: a bzImage or an ELF vmlinux (PVH entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, after what the VMM adds.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// A raw firmware image mapped at the top of the first 4 GiB; the vCPU starts at the reset
    /// vector (instead of a kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub firmware: Option<PathBuf>,
    /// Number of vCPUs (at least 1; at most KVM's limit and 254).
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1, maximum = 254)]
    pub cpus: u32,
    /// Guest RAM.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// How guest RAM is backed: `auto` (transparent huge pages where the host has them),
    /// `on` (hugetlbfs 2 MiB pages, reserved at start) or `off` (4 KiB pages).
    #[serde(default, skip_serializing_if = "HugePages::is_auto")]
    pub hugepages: HugePages,
    /// Where the IOAPIC lives: `split` (in the VMM, the default) or `kernel` (KVM's).
    #[serde(default, skip_serializing_if = "Irqchip::is_split")]
    pub irqchip: Irqchip,
    /// COM1 backend.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Expose the host PMU (performance counters) to the guest.
    #[serde(default)]
    pub pmu: bool,
    /// A virtio-rng entropy device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// virtio-blk disks, in order (the guest's vda, vdb, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs over TAP devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// A virtio-console (the guest's /dev/hvc0): null, file=PATH or socket=PATH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<SerialConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            firmware: None,
            cpus: default_cpus(),
            memory: default_memory(),
            hugepages: HugePages::Auto,
            irqchip: Irqchip::Split,
            serial: SerialConfig::default(),
            pmu: false,
            rng: false,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            balloon: None,
            console: None,
        }
    }
}

/// What the host can give, as far as validation is concerned.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// KVM's vCPU limit (`KVM_CAP_MAX_VCPUS`).
    pub max_vcpus: u32,
    /// The host's RAM in bytes.
    pub host_memory: u64,
}

/// What kind of kernel image a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// bzImage (64-bit Linux boot protocol).
    BzImage,
    /// ELF vmlinux (PVH entry when present).
    Elf,
}

/// Longest command line we pass (x86's `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;

impl VmConfig {
    /// Reads a JSON config file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let cfg_err = |reason: String| ConfigError::ConfigFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| cfg_err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| cfg_err(e.to_string()))
    }

    /// Checks everything that can be checked before touching KVM. Returns the kernel format
    /// when a kernel is given.
    pub fn validate(&self, host: &HostLimits) -> Result<Option<KernelFormat>, ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        let max = host.max_vcpus.min(MAX_VCPUS_GUEST);
        if self.cpus > max {
            return Err(ConfigError::TooManyCpus {
                requested: self.cpus,
                max,
            });
        }
        if self.memory.0 < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory));
        }
        if !self.memory.0.is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned(self.memory));
        }
        if self.memory.0 > host.host_memory {
            return Err(ConfigError::MemoryTooLarge {
                requested: self.memory,
                host: ByteSize(host.host_memory),
            });
        }
        if let SerialConfig::Socket(p) = &self.serial {
            if p.symlink_metadata().is_ok() {
                return Err(ConfigError::SerialSocketExists(p.clone()));
            }
        }
        self.validate_devices()?;
        match (&self.kernel, &self.firmware) {
            (None, None) => Err(ConfigError::NothingToBoot),
            (Some(_), Some(_)) => Err(ConfigError::KernelAndFirmware),
            (None, Some(fw)) => {
                if self.initrd.is_some() || !self.cmdline.is_empty() {
                    return Err(ConfigError::BootArgsWithoutKernel {
                        field: if self.initrd.is_some() {
                            "initrd"
                        } else {
                            "cmdline"
                        },
                    });
                }
                let size = check_file("firmware", fw)?;
                if size == 0 || !size.is_multiple_of(4096) || size > MAX_FIRMWARE_SIZE {
                    return Err(ConfigError::FirmwareSize {
                        path: fw.clone(),
                        size,
                    });
                }
                Ok(None)
            }
            (Some(kernel), None) => {
                check_file("kernel", kernel)?;
                let format = kernel_format(kernel)?;
                if let Some(initrd) = &self.initrd {
                    check_file("initrd", initrd)?;
                }
                // What the VMM adds stays well under 200 bytes.
                if self.cmdline.len() + 200 > CMDLINE_MAX {
                    return Err(ConfigError::CmdlineTooLong {
                        len: self.cmdline.len(),
                        max: CMDLINE_MAX - 200,
                    });
                }
                Ok(Some(format))
            }
        }
    }
}

impl VmConfig {
    /// How many virtio devices this configuration asks for.
    pub fn virtio_device_count(&self) -> usize {
        usize::from(self.rng)
            + self.disks.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.console.is_some())
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        let count = self.virtio_device_count();
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices {
                count,
                max: MAX_VIRTIO_DEVICES,
            });
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut paths = std::collections::BTreeSet::new();
        let duplicate = |field: String, message: String| ConfigError::Duplicate { field, message };
        for (i, d) in self.disks.iter().enumerate() {
            devices::check_disk(i, d)?;
            let real = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
            if !paths.insert(real) {
                return Err(duplicate(
                    format!("disks[{i}].path"),
                    format!(
                        "disk {}: given twice (one image, one disk)",
                        d.path.display()
                    ),
                ));
            }
            if let Some(id) = &d.id {
                if !ids.insert(id.clone()) {
                    return Err(duplicate(
                        format!("disks[{i}].id"),
                        format!("device id {id:?} used twice"),
                    ));
                }
            }
        }
        let mut taps = std::collections::BTreeSet::new();
        for (i, n) in self.nets.iter().enumerate() {
            devices::check_tap(i, n)?;
            if !taps.insert(n.tap.clone()) {
                return Err(duplicate(
                    format!("nets[{i}].tap"),
                    format!("TAP {}: given twice (one TAP, one NIC)", n.tap),
                ));
            }
            if let Some(id) = &n.id {
                if !ids.insert(id.clone()) {
                    return Err(duplicate(
                        format!("nets[{i}].id"),
                        format!("device id {id:?} used twice"),
                    ));
                }
            }
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid >= u64::from(u32::MAX) {
                return Err(ConfigError::DeviceOption {
                    field: "vsock.cid".into(),
                    flag: "--vsock",
                    value: format!("cid={}", v.cid),
                    reason: "a guest CID is at least 3 (0-2 are reserved) and below 4294967295"
                        .into(),
                });
            }
            devices::check_new_socket("vsock socket", "vsock.socket", &v.socket)?;
        }
        if let Some(b) = &self.balloon {
            if b.size.0 >= self.memory.0 {
                return Err(ConfigError::device_option(
                    "--balloon",
                    format!("size={}", b.size),
                    format!("must be smaller than the guest's memory ({})", self.memory),
                )
                .at("balloon.size"));
            }
        }
        match &self.console {
            Some(SerialConfig::Stdio) => {
                return Err(ConfigError::DeviceOption {
                    field: "console".into(),
                    flag: "--console",
                    value: "stdio".into(),
                    reason:
                        "stdio belongs to the serial console; use null, file=PATH or socket=PATH"
                            .into(),
                })
            }
            Some(SerialConfig::Socket(p)) => {
                devices::check_new_socket("console socket", "console", p)?
            }
            _ => {}
        }
        Ok(())
    }
}

/// Most virtio devices one VM has (one IOAPIC pin each, GSIs 16–23).
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// Opens `path` for reading (so permission problems show now) and returns its size.
fn check_file(what: &'static str, path: &Path) -> Result<u64, ConfigError> {
    let err = |reason: String| ConfigError::File {
        field: what.to_string(),
        what,
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| err(io_reason(&e)))?;
    let md = f.metadata().map_err(|e| err(io_reason(&e)))?;
    if !md.is_file() {
        return Err(err("not a regular file".into()));
    }
    Ok(md.len())
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Tells a bzImage from an x86-64 ELF by their headers.
pub fn kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    use std::io::Read;
    let mut head = [0u8; 0x210];
    let mut f = std::fs::File::open(path).map_err(|e| ConfigError::File {
        field: "kernel".into(),
        what: "kernel",
        path: path.to_path_buf(),
        reason: io_reason(&e),
    })?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => {
                return Err(ConfigError::File {
                    field: "kernel".into(),
                    what: "kernel",
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        }
    }
    format_of(&head[..n]).ok_or_else(|| ConfigError::NotAKernel(path.to_path_buf()))
}

/// Recognises a kernel image from its first bytes.
pub fn format_of(head: &[u8]) -> Option<KernelFormat> {
    // ELF64, little endian, EM_X86_64 (62).
    if head.len() >= 20 && head[..4] == *b"\x7fELF" && head[4] == 2 && head[5] == 1 {
        let machine = u16::from_le_bytes([head[18], head[19]]);
        return (machine == 62).then_some(KernelFormat::Elf);
    }
    // bzImage: "HdrS" at 0x202 and the boot sector signature.
    if head.len() >= 0x206 && head[0x202..0x206] == *b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa] {
        return Some(KernelFormat::BzImage);
    }
    None
}

#[cfg(test)]
mod tests;
