//! Pseudo-terminals for the console tests.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

/// A pseudo-terminal pair for tests that need a real terminal.
pub struct Pty {
    pub master: File,
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal pair.
pub fn openpty() -> Pty {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two descriptors into the provided ints; null name/termios/winsize
    // are allowed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here.
    unsafe {
        Pty {
            master: File::from_raw_fd(m),
            slave: OwnedFd::from_raw_fd(s),
        }
    }
}
