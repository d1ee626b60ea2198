//! Device options of a [`VmConfig`](super::VmConfig): `--disk`, `--net`, `--vsock`, `--balloon`,
//! `--console`. Each parses from the `key=value,key=value` form of its flag and is plain serde in
//! a config file or an API request.

use super::{io_reason, ByteSize, ConfigError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Splits `key=value,key=value` for `flag`, accepting only `keys`; a bare first item is taken as
/// the value of `keys[0]` (so `--disk disk.img` means `--disk path=disk.img`).
fn parse_opts<'a>(
    flag: &'static str,
    s: &'a str,
    keys: &[&'static str],
) -> Result<BTreeMap<&'static str, &'a str>, ConfigError> {
    let bad = |reason: String| ConfigError::device_option(flag, s.to_string(), reason);
    let mut out = BTreeMap::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for (i, item) in s.split(',').enumerate() {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), v),
            None if i == 0 && !keys.is_empty() => (keys[0], item),
            None => return Err(bad(format!("{item:?} is not key=value"))),
        };
        let Some(key) = keys.iter().find(|known| **known == k) else {
            return Err(bad(format!(
                "unknown key {k:?} (known: {})",
                keys.join(", ")
            )));
        };
        if v.is_empty() {
            return Err(bad(format!("{k}= needs a value")));
        }
        if out.insert(*key, v).is_some() {
            return Err(bad(format!("{k} given twice")));
        }
    }
    Ok(out)
}

fn opt_bool(flag: &'static str, s: &str, key: &str, v: Option<&str>) -> Result<bool, ConfigError> {
    match v {
        None => Ok(false),
        Some("on" | "true" | "yes" | "1") => Ok(true),
        Some("off" | "false" | "no" | "0") => Ok(false),
        Some(other) => Err(ConfigError::device_option(
            flag,
            s.to_string(),
            format!("{key}={other}: expected on or off"),
        )),
    }
}

fn opt_num(
    flag: &'static str,
    s: &str,
    key: &str,
    v: Option<&str>,
) -> Result<Option<u64>, ConfigError> {
    v.map(|v| {
        v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ConfigError::device_option(
                flag,
                s.to_string(),
                format!("{key}={v}: expected a positive whole number"),
            )
        })
    })
    .transpose()
}

fn opt_size(
    flag: &'static str,
    s: &str,
    key: &str,
    v: Option<&str>,
) -> Result<Option<ByteSize>, ConfigError> {
    v.map(|v| {
        v.parse::<ByteSize>().ok().ok_or_else(|| {
            ConfigError::device_option(
                flag,
                s.to_string(),
                format!("{key}={v}: expected a size such as 10M"),
            )
        })
    })
    .transpose()
}

/// One `--disk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file or block device.
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Guest cannot write.
    #[serde(default)]
    pub readonly: bool,
    /// Serial the guest sees (VIRTIO_BLK_T_GET_ID, at most 20 bytes); also the device's name in
    /// the monitoring API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<ByteSize>,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const F: &str = "--disk";
        let o = parse_opts(F, s, &["path", "readonly", "id", "iops", "bw"])?;
        let path = o.get("path").ok_or_else(|| {
            ConfigError::device_option(F, s.to_string(), "path= is required".into())
        })?;
        Ok(DiskConfig {
            path: PathBuf::from(path),
            readonly: opt_bool(F, s, "readonly", o.get("readonly").copied())?,
            id: o.get("id").map(|v| v.to_string()),
            iops: opt_num(F, s, "iops", o.get("iops").copied())?,
            bw: opt_size(F, s, "bw", o.get("bw").copied())?,
        })
    }
}

/// A MAC address, `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "{s:?} is not a MAC address (six hex bytes, e.g. 52:54:00:12:34:56)"
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!(
                    "{s:?} is not a MAC address (six hex bytes, e.g. 52:54:00:12:34:56)"
                ));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| {
                format!("{s:?} is not a MAC address (six hex bytes, e.g. 52:54:00:12:34:56)")
            })?;
        }
        if out[0] & 1 == 1 {
            return Err(format!(
                "{s:?} is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(MacAddr(out))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP device name; created (and brought up) if missing.
    pub tap: String,
    /// Guest MAC address (default: a locally administered one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// The device's name in the monitoring API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Packets per second, each direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// Bytes per second, each direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<ByteSize>,
}

impl FromStr for NetConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const F: &str = "--net";
        let o = parse_opts(F, s, &["tap", "mac", "id", "iops", "bw"])?;
        let bad = |reason: String| ConfigError::device_option(F, s.to_string(), reason);
        let tap = o.get("tap").ok_or_else(|| bad("tap= is required".into()))?;
        let mac = o
            .get("mac")
            .map(|m| m.parse::<MacAddr>().map_err(|e| bad(format!("mac={e}"))))
            .transpose()?;
        Ok(NetConfig {
            tap: tap.to_string(),
            mac,
            id: o.get("id").map(|v| v.to_string()),
            iops: opt_num(F, s, "iops", o.get("iops").copied())?,
            bw: opt_size(F, s, "bw", o.get("bw").copied())?,
        })
    }
}

/// `--vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// Host Unix socket (Firecracker's hybrid vsock: `CONNECT <port>` on it reaches the guest;
    /// guest connections to port P reach `<socket>_P`).
    #[schema(value_type = String)]
    pub socket: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const F: &str = "--vsock";
        let o = parse_opts(F, s, &["cid", "socket"])?;
        let bad = |reason: String| ConfigError::device_option(F, s.to_string(), reason);
        let cid = o.get("cid").ok_or_else(|| bad("cid= is required".into()))?;
        let cid = cid
            .parse::<u64>()
            .map_err(|_| bad(format!("cid={cid}: expected a number")))?;
        let socket = o
            .get("socket")
            .ok_or_else(|| bad("socket= is required".into()))?;
        Ok(VsockConfig {
            cid,
            socket: PathBuf::from(socket),
        })
    }
}

/// `--balloon`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Initial balloon size (memory taken from the guest at start).
    #[serde(default)]
    pub size: ByteSize,
    /// Let the guest deflate when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Seconds between guest memory statistics (0: none).
    #[serde(default)]
    pub stats_interval: u32,
    /// The guest reports free pages, which go back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl FromStr for BalloonConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        const F: &str = "--balloon";
        let o = parse_opts(
            F,
            s,
            &["size", "deflate-on-oom", "stats", "free-page-reporting"],
        )?;
        let stats = opt_num(F, s, "stats", o.get("stats").copied())?.unwrap_or(0);
        Ok(BalloonConfig {
            size: opt_size(F, s, "size", o.get("size").copied())?.unwrap_or_default(),
            deflate_on_oom: opt_bool(F, s, "deflate-on-oom", o.get("deflate-on-oom").copied())?,
            stats_interval: u32::try_from(stats).map_err(|_| {
                ConfigError::device_option(F, s.to_string(), format!("stats={stats}: too large"))
            })?,
            free_page_reporting: opt_bool(
                F,
                s,
                "free-page-reporting",
                o.get("free-page-reporting").copied(),
            )?,
        })
    }
}

/// Checks that `path` can be opened as a disk image (read-write unless `readonly`).
pub(super) fn check_disk(index: usize, d: &DiskConfig) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        field: format!("disks[{index}].path"),
        what: "disk",
        path: d.path.clone(),
        reason,
    };
    if d.path.is_dir() {
        return Err(err(
            "not a regular file or block device (a directory)".into()
        ));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!d.readonly)
        .open(&d.path)
        .map_err(|e| {
            let mut r = io_reason(&e);
            if e.kind() == std::io::ErrorKind::PermissionDenied && !d.readonly {
                r.push_str(
                    " (not writable by this user, or refused by a security module such as \
                     AppArmor or SELinux: see the kernel's audit log; add readonly=on to use it \
                     read-only)",
                );
            }
            err(r)
        })?;
    let md = f.metadata().map_err(|e| err(io_reason(&e)))?;
    use std::os::unix::fs::FileTypeExt;
    if !(md.is_file() || md.file_type().is_block_device()) {
        return Err(err("not a regular file or block device".into()));
    }
    if let Some(id) = &d.id {
        if id.len() > 20 {
            return Err(
                err(format!("id={id}: at most 20 bytes (virtio-blk serial)"))
                    .at(format!("disks[{index}].id")),
            );
        }
    }
    Ok(())
}

/// Checks a TAP name the way the kernel will (IFNAMSIZ, no `/` or blanks).
pub(super) fn check_tap(index: usize, n: &NetConfig) -> Result<(), ConfigError> {
    let bad = |reason: &str| {
        ConfigError::device_option("--net", format!("tap={}", n.tap), reason.to_string())
            .at(format!("nets[{index}].tap"))
    };
    if n.tap.is_empty() || n.tap.len() > 15 {
        return Err(bad("a TAP name has 1 to 15 characters"));
    }
    if n.tap
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        || n.tap == "."
        || n.tap == ".."
    {
        return Err(bad("a TAP name cannot contain '/', ':' or blanks"));
    }
    Ok(())
}

/// Checks that a socket the VMM will create can be created at `path`.
pub(super) fn check_new_socket(
    what: &'static str,
    field: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        field: field.to_string(),
        what,
        path: path.to_path_buf(),
        reason,
    };
    if path.symlink_metadata().is_ok() {
        return Err(err(
            "the path already exists; remove it or choose another".into()
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(err(format!(
            "directory {} does not exist",
            parent.display()
        )));
    }
    // sun_path holds 107 bytes plus the terminating NUL; vsock adds "_<port>" (up to 11 bytes).
    let limit = if what == "vsock socket" { 96 } else { 107 };
    if path.as_os_str().len() > limit {
        return Err(err(format!(
            "path is {} bytes; a Unix socket path can have at most {limit} here",
            path.as_os_str().len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_strings_parse() {
        let d: DiskConfig = "path=/x.img,readonly=on,id=data,iops=100,bw=10M"
            .parse()
            .unwrap();
        assert_eq!(d.path, PathBuf::from("/x.img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("data"));
        assert_eq!(d.iops, Some(100));
        assert_eq!(d.bw, Some(ByteSize(10 << 20)));
        let d: DiskConfig = "/y.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/y.img"));
        assert!(!d.readonly);
        for (bad, says) in [
            ("", "path= is required"),
            ("readonly=on", "path= is required"),
            ("path=/x,colour=red", "unknown key \"colour\""),
            ("path=/x,readonly=maybe", "readonly=maybe"),
            ("path=/x,iops=0", "iops=0"),
            ("path=/x,iops=-3", "iops=-3"),
            ("path=/x,bw=fast", "bw=fast"),
            ("path=/x,path=/y", "path given twice"),
            ("path=/x,id=", "id= needs a value"),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.contains("--disk") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn net_vsock_balloon_parse() {
        let n: NetConfig = "tap=fv0,mac=52:54:00:ab:cd:ef,iops=1000".parse().unwrap();
        assert_eq!(n.tap, "fv0");
        assert_eq!(n.mac, Some(MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef])));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "mac=52:54:00:ab:cd:ef",
            "tap=x,mac=52:54:00:ab:cd",
            "tap=x,mac=01:00:00:00:00:01",
            "tap=x,mac=zz:00:00:00:00:01",
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains("--net"), "{bad}: {e}");
        }
        let v: VsockConfig = "cid=3,socket=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.socket.as_path()), (3, Path::new("/tmp/v.sock")));
        assert!("cid=x,socket=/a".parse::<VsockConfig>().is_err());
        assert!("cid=3".parse::<VsockConfig>().is_err());
        let b: BalloonConfig = "size=256M,stats=5,free-page-reporting=on".parse().unwrap();
        assert_eq!(b.size, ByteSize(256 << 20));
        assert_eq!(b.stats_interval, 5);
        assert!(b.free_page_reporting && !b.deflate_on_oom);
        assert_eq!(
            "".parse::<BalloonConfig>().unwrap(),
            BalloonConfig::default()
        );
        assert!("size=lots".parse::<BalloonConfig>().is_err());
    }

    #[test]
    fn tap_names_are_checked() {
        let n = |t: &str| NetConfig {
            tap: t.into(),
            mac: None,
            id: None,
            iops: None,
            bw: None,
        };
        assert!(check_tap(0, &n("fvtap0")).is_ok());
        for bad in ["", "a/b", "sixteen-chars-xx", "a b", ".."] {
            assert!(check_tap(0, &n(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_forms_roundtrip() {
        let d: DiskConfig =
            serde_json::from_str(r#"{"path":"/d.img","readonly":true,"bw":"1M"}"#).unwrap();
        assert_eq!(d.bw, Some(ByteSize(1 << 20)));
        let e = serde_json::from_str::<DiskConfig>(r#"{"path":"/d.img","speed":1}"#).unwrap_err();
        assert!(e.to_string().contains("speed"), "{e}");
        let n: NetConfig =
            serde_json::from_str(r#"{"tap":"t0","mac":"02:00:00:00:00:01"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"tap":"t0","mac":"02:00:00:00:00:01"}"#
        );
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t0","mac":"nope"}"#).is_err());
    }
}
