//! The TUN/TAP and interface-flag ioctls behind safe types: a [`TunFile`] is only ever an open
//! `/dev/net/tun` and an [`InetSocket`] an `AF_INET` datagram socket, so each request goes to
//! the descriptor it is meant for, with the argument it takes. One documented `unsafe` per call.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`: attach the descriptor to (or create) the interface named in an ifreq.
const TUNSETIFF: libc::Ioctl = libc::TUNSETIFF;
/// `_IOW('T', 208, unsigned int)`: which offloads the kernel may hand us (TUN_F_* flags).
const TUNSETOFFLOAD: libc::Ioctl = libc::TUNSETOFFLOAD;
/// `_IOW('T', 216, int)`: size of the virtio-net header in front of every frame.
const TUNSETVNETHDRSZ: libc::Ioctl = libc::TUNSETVNETHDRSZ;
// From linux/sockios.h: get and set an interface's flags (through any socket).
const SIOCGIFFLAGS: libc::Ioctl = libc::SIOCGIFFLAGS as libc::Ioctl;
const SIOCSIFFLAGS: libc::Ioctl = libc::SIOCSIFFLAGS as libc::Ioctl;

/// Turns an ioctl's return value into a result.
fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A `struct ifreq` naming an interface, with its flags member.
pub(super) struct IfReq(libc::ifreq);

impl IfReq {
    /// A zeroed request naming `name`; bytes past `libc::IFNAMSIZ - 1` are cut (callers validate
    /// names first), so the name is always NUL-terminated.
    pub(super) fn new(name: &str) -> IfReq {
        // SAFETY: ifreq is plain data (arrays, integers, pointers in a union) for which all-zero
        // bytes are a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr
            .ifr_name
            .iter_mut()
            .zip(name.as_bytes().iter().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        IfReq(ifr)
    }

    /// The interface name (as the kernel wrote it back, after TUNSETIFF): the bytes up to the
    /// first NUL (or all of them, should there be none).
    pub(super) fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw name array (for tests).
    #[cfg(test)]
    pub(super) fn raw_name(&self) -> &[libc::c_char; libc::IFNAMSIZ] {
        &self.0.ifr_name
    }

    /// The flags member (`IFF_*`).
    pub(super) fn flags(&self) -> libc::c_short {
        // SAFETY: every member of the union is plain data and the union was zero-initialised:
        // whatever was written into it since, its first two bytes are a valid c_short.
        unsafe { self.0.ifr_ifru.ifru_flags }
    }

    /// Sets the flags member.
    pub(super) fn set_flags(&mut self, flags: libc::c_short) {
        self.0.ifr_ifru.ifru_flags = flags;
    }
}

/// An open `/dev/net/tun` (non-blocking, close-on-exec).
#[derive(Debug)]
pub(super) struct TunFile(File);

impl TunFile {
    /// Opens `/dev/net/tun` for reading and writing.
    pub(super) fn open() -> io::Result<TunFile> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map(TunFile)
    }

    /// The descriptor, for reading and writing frames.
    pub(super) fn file(&self) -> &File {
        &self.0
    }

    /// TUNSETIFF: attaches to (or creates) the interface `req` names, with `req`'s flags; the
    /// kernel writes the interface's name back into `req`.
    pub(super) fn set_iff(&self, req: &mut IfReq) -> io::Result<()> {
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req.0` is; the
        // descriptor is an open /dev/net/tun.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), TUNSETIFF, &mut req.0) })
    }

    /// TUNSETVNETHDRSZ: the size of the virtio-net header in front of every frame.
    pub(super) fn set_vnet_hdr_sz(&self, len: libc::c_int) -> io::Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer given, which points at
        // `len`; the descriptor is an open /dev/net/tun.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), TUNSETVNETHDRSZ, &len) })
    }

    /// TUNSETOFFLOAD: which offloaded frames (`TUN_F_*`) the kernel may hand us.
    pub(super) fn set_offload(&self, flags: u32) -> io::Result<()> {
        let arg = libc::c_ulong::from(flags);
        // SAFETY: TUNSETOFFLOAD takes its argument by value (no memory is read or written); the
        // descriptor is an open /dev/net/tun.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), TUNSETOFFLOAD, arg) })
    }
}

/// An `AF_INET` datagram socket: the handle for an interface's flags.
pub(super) struct InetSocket(OwnedFd);

impl InetSocket {
    /// A new socket (close-on-exec).
    pub(super) fn new() -> io::Result<InetSocket> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(InetSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// SIOCGIFFLAGS: reads the flags of the interface `req` names into `req`.
    pub(super) fn get_flags(&self, req: &mut IfReq) -> io::Result<()> {
        // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`, which `req.0` is; the
        // descriptor is an open socket.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), SIOCGIFFLAGS, &mut req.0) })
    }

    /// SIOCSIFFLAGS: sets the flags of the interface `req` names to `req`'s.
    pub(super) fn set_flags(&self, req: &IfReq) -> io::Result<()> {
        // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`, which `req.0` is; the descriptor is an
        // open socket.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), SIOCSIFFLAGS, &req.0) })
    }
}
