//! Raw mode for the terminal the serial console is attached to, restored on every exit path
//! (the guard's `Drop` runs on normal return, on error and on panic unwinding).

use std::os::fd::RawFd;

/// Puts a terminal in raw mode for its lifetime.
pub struct RawModeGuard {
    fd: RawFd,
    saved: libc::termios,
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawModeGuard {
    /// Switches `fd` (a terminal) to raw mode: no echo, no line editing, no signals from keys
    /// (Ctrl-C goes to the guest), output processing kept so newlines render.
    pub fn new(fd: RawFd) -> std::io::Result<RawModeGuard> {
        // SAFETY: termios is plain data; zeroed is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawModeGuard { fd, saved })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new` on the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
