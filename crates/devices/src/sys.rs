//! Small safe wrappers around the system calls the devices make directly (the rest go through
//! `std`, `vmm-sys-util` or `vm-memory`): each one `unsafe` block, documented, in one place.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// `send(2)` with MSG_NOSIGNAL: a host peer that went away yields EPIPE, never SIGPIPE (which
/// would kill the whole VMM); MSG_DONTWAIT: never blocks.
pub(crate) fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe the live slice `buf`; the kernel only reads it.
    let r = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One descriptor to wait for, and what it is ready for once [`poll`] returns. A descriptor
/// that is not open is reported (`POLLNVAL`), never touched: the caller keeps the one it means
/// open until `poll` returns.
pub(crate) struct PollFd {
    fd: RawFd,
    events: libc::c_short,
    revents: libc::c_short,
}

impl PollFd {
    /// Waits for `events` (`libc::POLLIN`, …) on `fd`; errors and hang-ups are always reported.
    pub(crate) fn new(fd: RawFd, events: libc::c_short) -> Self {
        PollFd {
            fd,
            events,
            revents: 0,
        }
    }

    /// What the descriptor was ready for.
    pub(crate) fn revents(&self) -> libc::c_short {
        self.revents
    }
}

/// `poll(2)`: waits until one of `fds` is ready, up to `timeout` (`None`: no limit). Returns how
/// many are ready (0 on timeout); EINTR is returned as an error of kind `Interrupted`.
pub(crate) fn poll(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let mut raw: Vec<libc::pollfd> = fds
        .iter()
        .map(|p| libc::pollfd {
            fd: p.fd,
            events: p.events,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
    };
    // SAFETY: `raw` is a live array of `raw.len()` pollfd structs the kernel reads and writes
    // (revents); poll touches no memory through the descriptors themselves.
    let r = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    for (p, r) in fds.iter_mut().zip(&raw) {
        p.revents = r.revents;
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn poll_and_send_on_a_socket_pair() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut fds = [PollFd::new(a.as_raw_fd(), libc::POLLIN)];
        assert_eq!(poll(&mut fds, Some(Duration::from_millis(1))).unwrap(), 0);
        b.write_all(b"x").unwrap();
        assert_eq!(poll(&mut fds, None).unwrap(), 1);
        assert_ne!(fds[0].revents() & libc::POLLIN, 0);
        assert_eq!(send_nosignal(&b, b"yz").unwrap(), 2);
        drop(a);
        let e = send_nosignal(&b, b"gone").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "EPIPE, no SIGPIPE");
    }
}
