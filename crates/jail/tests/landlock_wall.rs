//! The Landlock wall on its own, in a child process: after it, a path outside the allowed
//! directory is refused — also through a descriptor of a directory opened before — while the
//! allowed directory works, and TCP connects are refused.

use std::ffi::CString;
use std::os::fd::AsRawFd;

fn errno_of(r: libc::c_int) -> i32 {
    if r >= 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

#[test]
fn outside_the_run_directory_is_refused_even_through_an_fd_opened_before() {
    if jail::probe()
        .iter()
        .any(|s| s.wall == jail::Wall::Landlock && !s.available)
    {
        eprintln!("SKIPPED outside_the_run_directory...: this kernel has no Landlock");
        return;
    }
    // "Landlock ABI N": TCP rules exist from ABI 4.
    let abi: u32 = jail::probe()
        .iter()
        .find(|s| s.wall == jail::Wall::Landlock)
        .and_then(|s| s.detail.rsplit(' ').next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("fv-landlock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("inside"), "ok").unwrap();
    let outside = std::fs::File::open("/etc").unwrap();
    let inside_c = CString::new(dir.join("inside").to_str().unwrap()).unwrap();
    let new_c = CString::new(dir.join("new").to_str().unwrap()).unwrap();
    // SAFETY: fork; the child applies Landlock, makes raw system calls on memory prepared
    // before and _exits with a code that says which check failed.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = (|| {
            if jail::landlock(Some(&dir)).is_err() {
                return 10;
            }
            // SAFETY: open/openat/socket/connect on NUL-terminated strings and structs we own.
            unsafe {
                // Through the descriptor of /etc opened before the wall.
                let e = errno_of(libc::openat(
                    outside.as_raw_fd(),
                    c"passwd".as_ptr(),
                    libc::O_RDONLY,
                ));
                if e != libc::EACCES {
                    return 11;
                }
                let e = errno_of(libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY));
                if e != libc::EACCES {
                    return 12;
                }
                if libc::open(inside_c.as_ptr(), libc::O_RDONLY) < 0 {
                    return 13;
                }
                if libc::open(new_c.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o600) < 0 {
                    return 14;
                }
                // No execution, even inside.
                let e = errno_of(libc::execve(
                    inside_c.as_ptr(),
                    [std::ptr::null()].as_ptr(),
                    [std::ptr::null()].as_ptr(),
                ));
                if e != libc::EACCES {
                    return 15;
                }
                // TCP connect refused (Landlock ABI 4+).
                let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 9u16.to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let e = errno_of(libc::connect(
                    s,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                ));
                if abi >= 4 && e != libc::EACCES {
                    return 16;
                }
            }
            0
        })();
        // SAFETY: ending the child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let _ = std::fs::remove_dir_all(&dir);
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "check {} failed",
        libc::WEXITSTATUS(status)
    );
}
