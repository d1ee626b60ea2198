//! TAP network interfaces: the host side of a virtio-net device.
//!
//! [`Tap::open`] attaches to the TAP interface of a given name through `/dev/net/tun`, or creates
//! it when it does not exist (which needs `CAP_NET_ADMIN`). A TAP created by an administrator for
//! the VMM's user (`ip tuntap add dev NAME mode tap user UID`) can be attached without any
//! capability. The descriptor is opened non-blocking; every frame read or written carries a
//! 12-byte `virtio_net_hdr_v1` in front of the Ethernet frame (`IFF_VNET_HDR` with
//! `TUNSETVNETHDRSZ`), which is exactly the header a virtio 1.x driver exchanges with its device,
//! so headers pass through untouched.
//!
//! The interface disappears when the descriptor is closed unless an administrator made it
//! persistent; the VMM never does.

mod sys;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use sys::{IfReq, InetSocket, TunFile};

/// Longest interface name (`IFNAMSIZ` is 16 including the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Size of the `virtio_net_hdr_v1` header in front of every frame (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

// TUNSETIFF flags, from linux/if_tun.h (values as exported by the libc crate).
/// Ethernet frames (not IP packets).
const IFF_TAP: libc::c_int = libc::IFF_TAP;
/// No 4-byte packet-information prefix.
const IFF_NO_PI: libc::c_int = libc::IFF_NO_PI;
/// Every frame carries a virtio-net header.
const IFF_VNET_HDR: libc::c_int = libc::IFF_VNET_HDR;

/// TUNSETOFFLOAD flag: the kernel may hand us frames with a partial checksum (`NEEDS_CSUM`).
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// TUNSETOFFLOAD flag: … TCPv4 segmentation offload frames (needs [`TUN_F_CSUM`]).
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// TUNSETOFFLOAD flag: … TCPv6 segmentation offload frames (needs [`TUN_F_CSUM`]).
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// TUNSETOFFLOAD flag: … TSO frames with the ECN (CWR) bit set (needs TSO4 or TSO6).
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;

/// Why a TAP interface could not be opened or set up. Every message names the interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The TUN/TAP driver's control device is missing.
    #[error(
        "TAP {tap}: /dev/net/tun does not exist: load the tun driver (`modprobe tun`) or, in a \
         container, make /dev/net/tun available"
    )]
    TunMissing {
        /// Interface name.
        tap: String,
    },
    /// Opening `/dev/net/tun`, creating or attaching the interface was refused.
    #[error(
        "TAP {tap}: permission denied {what}: creating a TAP needs CAP_NET_ADMIN; without it, \
         have an administrator pre-create it for this user \
         (`ip tuntap add dev {tap} mode tap user <uid>`)"
    )]
    PermissionDenied {
        /// Interface name.
        tap: String,
        /// What was refused.
        what: &'static str,
    },
    /// The name is not a valid interface name.
    #[error("TAP {tap:?}: invalid interface name: {reason}")]
    InvalidName {
        /// The name as given.
        tap: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Another process (or another device) is attached to the interface.
    #[error("TAP {tap}: device busy: another process is already attached to it")]
    Busy {
        /// Interface name.
        tap: String,
    },
    /// The interface exists but is not a TAP usable with these flags (a TUN, or multi-queue).
    #[error(
        "TAP {tap}: cannot attach: {source} (an interface of that name exists but is not a TAP \
         usable here: a TUN, another kind of device, or a multi-queue TAP)"
    )]
    Attach {
        /// Interface name.
        tap: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The virtio-net header size or the offloads could not be set.
    #[error("TAP {tap}: offload setup failed ({what}): {source}")]
    Offload {
        /// Interface name.
        tap: String,
        /// Which request failed.
        what: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The interface created by the VMM could not be brought up.
    #[error("TAP {tap}: bringing the link up failed: {source}")]
    LinkUp {
        /// Interface name.
        tap: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Any other failure.
    #[error("TAP {tap}: {what}: {source}")]
    Io {
        /// Interface name.
        tap: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Checks `name` the way the kernel's `dev_valid_name` does, and refuses `%` (a TUNSETIFF
/// template such as `tap%d` would make the kernel pick the name).
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let bad = |reason| {
        Err(TapError::InvalidName {
            tap: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 15 bytes (IFNAMSIZ is 16 with the terminating NUL)");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not interface names");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("contains `/`, `:`, `%`, NUL or whitespace");
    }
    Ok(())
}

/// An open TAP interface (the descriptor is non-blocking and close-on-exec).
#[derive(Debug)]
pub struct Tap {
    tun: TunFile,
    name: String,
    created: bool,
}

impl Tap {
    /// Attaches to the TAP interface `name`, creating it (and bringing its link up) when it does
    /// not exist; an existing interface is left configured as its administrator set it.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_name(name)?;
        let tap = || name.to_string();
        // Whether we create it decides whether we bring it up (validated name: no traversal).
        let existed = Path::new("/sys/class/net").join(name).exists();
        let tun = TunFile::open().map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                TapError::TunMissing { tap: tap() }
            }
            Some(libc::EACCES) | Some(libc::EPERM) => TapError::PermissionDenied {
                tap: tap(),
                what: "opening /dev/net/tun",
            },
            _ => TapError::Io {
                tap: tap(),
                what: "opening /dev/net/tun",
                source: e,
            },
        })?;

        let mut ifr = IfReq::new(name);
        ifr.set_flags((IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) as libc::c_short);
        if let Err(e) = tun.set_iff(&mut ifr) {
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied {
                    tap: tap(),
                    what: if existed {
                        "attaching to it (it is owned by another user or group)"
                    } else {
                        "creating it"
                    },
                },
                Some(libc::EBUSY) => TapError::Busy { tap: tap() },
                _ => TapError::Attach {
                    tap: tap(),
                    source: e,
                },
            });
        }
        // The kernel writes back the interface's actual name (it is the one we asked for, since
        // templates are refused).
        let actual = ifr.name();

        let hdr_len = VNET_HDR_LEN as libc::c_int;
        if let Err(source) = tun.set_vnet_hdr_sz(hdr_len) {
            return Err(TapError::Offload {
                tap: tap(),
                what: "TUNSETVNETHDRSZ 12",
                source,
            });
        }
        let tap_dev = Tap {
            tun,
            name: actual,
            created: !existed,
        };
        // Checks now that every offload a driver may negotiate is accepted, then starts with
        // none (activation sets what the driver accepted).
        for flags in [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN, 0] {
            tap_dev
                .set_offload(flags)
                .map_err(|source| TapError::Offload {
                    tap: tap(),
                    what: "TUNSETOFFLOAD",
                    source,
                })?;
        }
        if !existed {
            set_link_up(name).map_err(|source| TapError::LinkUp { tap: tap(), source })?;
        }
        Ok(tap_dev)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when this open created the interface (it vanishes when the descriptor is closed).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Sets which offloaded frames (`TUN_F_*`) the kernel may hand us.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.tun.set_offload(flags)
    }

    /// Reads one frame (header included); `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.file().read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.file().write(frame)
    }

    fn file(&self) -> &File {
        self.tun.file()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file().as_raw_fd()
    }
}

/// Sets IFF_UP on interface `name` (SIOCSIFFLAGS on an AF_INET datagram socket).
fn set_link_up(name: &str) -> io::Result<()> {
    let sock = InetSocket::new()?;
    let mut ifr = IfReq::new(name);
    sock.get_flags(&mut ifr)?;
    ifr.set_flags(ifr.flags() | libc::IFF_UP as libc::c_short);
    sock.set_flags(&ifr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_like_the_kernel_does() {
        for ok in ["tap0", "fv-net_1", "a", "123456789012345"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "bad/name",
            "a:b",
            "tap%d",
            "sp ace",
            "nul\0",
            "1234567890123456",
        ] {
            let e = validate_name(bad).unwrap_err();
            assert!(matches!(e, TapError::InvalidName { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("invalid interface name"), "{e}");
        }
        let e = validate_name("1234567890123456").unwrap_err().to_string();
        assert!(e.contains("15") && e.contains("IFNAMSIZ"), "{e}");
    }

    #[test]
    fn ifreq_carries_the_name_nul_terminated() {
        let r = IfReq::new("tap7");
        assert_eq!(
            r.raw_name()[..5],
            [b't' as _, b'a' as _, b'p' as _, b'7' as _, 0]
        );
        assert_eq!(r.name(), "tap7");
        let r = IfReq::new("123456789012345");
        assert_eq!(r.raw_name()[15], 0);
        assert_eq!(r.name(), "123456789012345");
        // Longer names are cut, still NUL-terminated.
        let r = IfReq::new("1234567890123456789");
        assert_eq!(r.raw_name()[15], 0);
        assert_eq!(r.name(), "123456789012345");
        let mut r = IfReq::new("x");
        assert_eq!(r.flags(), 0);
        r.set_flags(0x1003);
        assert_eq!(r.flags(), 0x1003);
    }

    #[test]
    fn error_messages_explain_the_fix() {
        let e = TapError::TunMissing { tap: "t0".into() }.to_string();
        assert!(e.contains("t0") && e.contains("modprobe tun"), "{e}");
        let e = TapError::PermissionDenied {
            tap: "t0".into(),
            what: "creating it",
        }
        .to_string();
        assert!(
            e.contains("CAP_NET_ADMIN") && e.contains("ip tuntap add"),
            "{e}"
        );
        let e = TapError::Busy { tap: "t0".into() }.to_string();
        assert!(e.contains("t0") && e.contains("busy"), "{e}");
    }
}
