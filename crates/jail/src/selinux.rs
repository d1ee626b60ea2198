//! The `selinux` wall, sVirt-style: every VMM runs in the `ferrovisor_vm_t` domain at an MCS
//! level of its own, `s0:cA,cB`, and its VM's files carry the same categories.
//!
//! The policy is `packaging/selinux/ferrovisor.te` (with `ferrovisor.fc`): `ferrovisor_vm_t`
//! is MCS-constrained, so a VMM can use only objects whose level its own dominates — `s0`
//! objects (devices, libraries, images shared read-only, labelled [`SHARED_IMAGE_CONTEXT`]) and
//! its own VM's (its read-write disks, [`image_context`]; its run directory,
//! [`run_dir_context`]) — never another VM's, whose categories differ.
//!
//! The daemon's sequence for one VM:
//! 1. [`enabled`] — is there an SELinux with our policy module to use (else why not);
//! 2. [`McsAllocator::allocate`] a category pair no running VM holds (after a restart,
//!    [`McsAllocator::hold`] the pairs of the VMMs it re-adopts: [`parse_categories`] of their
//!    `/proc/<pid>/attr/current`);
//! 3. [`set_file_context`] on the VM's files;
//! 4. before the clone, [`attr_exec_path`] and [`exec_label_for_child`]: the child writes those
//!    bytes to that path between clone and execve, so the VMM starts in its domain and level;
//! 5. when the VM is gone, [`McsAllocator::release`] its pair.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io::{self, Read as _, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The number of MCS categories of the targeted policies (`c0` to `c1023`).
pub const CATEGORIES: u16 = 1024;

/// The VMM's domain.
pub const VM_DOMAIN: &str = "ferrovisor_vm_t";

/// The context of images shared read-only by every VM (kernels, initrds, firmware, read-only
/// disks): no categories, so every VM may read them; the policy lets none write them.
pub const SHARED_IMAGE_CONTEXT: &str = "system_u:object_r:ferrovisor_image_t:s0";

/// Where the SELinux filesystem is mounted.
const SELINUXFS: &str = "/sys/fs/selinux";

/// A VM's MCS category pair `(cA, cB)`, `cA < cB < CATEGORIES`.
pub type McsPair = (u16, u16);

/// Why no category pair could be had.
#[derive(Debug, thiserror::Error)]
pub enum McsError {
    /// Every pair is held by a running VM.
    #[error("all {capacity} MCS category pairs are held by running VMs: stop a VM to free one")]
    Exhausted {
        /// How many pairs there are.
        capacity: usize,
    },
    /// Not a pair `cA < cB < categories`.
    #[error("MCS categories c{0},c{1}: not a pair c{{A}},c{{B}} with A < B < {2}", .pair.0, .pair.1, .categories)]
    Invalid {
        /// The pair as given.
        pair: McsPair,
        /// The number of categories.
        categories: u16,
    },
    /// Another VM holds this pair already.
    #[error("MCS categories c{},c{} are held by another VM", .0 .0, .0 .1)]
    AlreadyHeld(McsPair),
    /// An allocator needs at least two categories (and at most [`CATEGORIES`]).
    #[error("an MCS allocator needs 2 to {CATEGORIES} categories, not {0}")]
    Categories(u16),
    /// The kernel's random numbers could not be read.
    #[error("reading random numbers for the MCS categories: {0}")]
    Random(io::Error),
}

/// Hands out MCS category pairs, at random, never one that a running VM holds.
///
/// Random rather than sequential, as libvirt does, so that a pair says nothing about a VM's
/// age and a stale label left on a file by a VM long gone is unlikely to match a new one.
#[derive(Clone, Debug)]
pub struct McsAllocator {
    categories: u16,
    held: BTreeSet<McsPair>,
}

impl Default for McsAllocator {
    fn default() -> Self {
        McsAllocator::new()
    }
}

impl McsAllocator {
    /// An allocator over all [`CATEGORIES`] categories, holding nothing.
    pub fn new() -> McsAllocator {
        McsAllocator {
            categories: CATEGORIES,
            held: BTreeSet::new(),
        }
    }

    /// An allocator over categories `0..categories` (2 to [`CATEGORIES`]), for a site that
    /// keeps some categories for other uses, and for tests.
    pub fn with_categories(categories: u16) -> Result<McsAllocator, McsError> {
        if !(2..=CATEGORIES).contains(&categories) {
            return Err(McsError::Categories(categories));
        }
        Ok(McsAllocator {
            categories,
            held: BTreeSet::new(),
        })
    }

    /// How many pairs there are in all: `n (n - 1) / 2`.
    pub fn capacity(&self) -> usize {
        let n = usize::from(self.categories);
        n * (n - 1) / 2
    }

    /// How many pairs running VMs hold.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether `pair` is held.
    pub fn is_held(&self, pair: McsPair) -> bool {
        self.held.contains(&pair)
    }

    fn check(&self, pair: McsPair) -> Result<(), McsError> {
        if pair.0 < pair.1 && pair.1 < self.categories {
            Ok(())
        } else {
            Err(McsError::Invalid {
                pair,
                categories: self.categories,
            })
        }
    }

    /// A random pair `(cA, cB)`, `cA < cB`, that no running VM holds; it is held until
    /// [`McsAllocator::release`]d.
    pub fn allocate(&mut self) -> Result<McsPair, McsError> {
        let capacity = self.capacity();
        if self.held.len() >= capacity {
            return Err(McsError::Exhausted { capacity });
        }
        let n = u32::from(self.categories);
        // Two distinct categories drawn uniformly make every unordered pair equally likely.
        // While most pairs are free a few draws find one; when nearly all are held, pick
        // uniformly among the free ones instead.
        for _ in 0..64 {
            let a = random_below(n)?;
            let b = random_below(n)?;
            if a == b {
                continue;
            }
            let pair = to_pair(a.min(b), a.max(b));
            if self.held.insert(pair) {
                return Ok(pair);
            }
        }
        let free = capacity - self.held.len();
        let mut k = random_below(u32::try_from(free).unwrap_or(u32::MAX))?;
        for a in 0..n {
            for b in a + 1..n {
                let pair = to_pair(a, b);
                if self.held.contains(&pair) {
                    continue;
                }
                if k == 0 {
                    self.held.insert(pair);
                    return Ok(pair);
                }
                k -= 1;
            }
        }
        Err(McsError::Exhausted { capacity })
    }

    /// Marks `pair` as held by a VM that already has it (one re-adopted after a daemon
    /// restart). Refuses an invalid pair, and a pair held already: two VMs must never share.
    pub fn hold(&mut self, pair: McsPair) -> Result<(), McsError> {
        self.check(pair)?;
        if !self.held.insert(pair) {
            return Err(McsError::AlreadyHeld(pair));
        }
        Ok(())
    }

    /// Frees `pair` for another VM; whether it was held.
    pub fn release(&mut self, pair: McsPair) -> bool {
        self.held.remove(&pair)
    }
}

/// `(a, b)` as a pair of u16 (both below [`CATEGORIES`], so they fit).
fn to_pair(a: u32, b: u32) -> McsPair {
    (
        u16::try_from(a).unwrap_or(u16::MAX),
        u16::try_from(b).unwrap_or(u16::MAX),
    )
}

/// A uniformly random number below `n` (`n > 0`), from the kernel's CSPRNG.
fn random_below(n: u32) -> Result<u32, McsError> {
    let n = n.max(1);
    // Reject the top values that would make `% n` favour small numbers.
    let limit = u32::MAX - u32::MAX % n;
    loop {
        let r = random_u32()?;
        if r < limit {
            return Ok(r % n);
        }
    }
}

/// Four random bytes: getrandom(2), or /dev/urandom where the kernel lacks it.
fn random_u32() -> Result<u32, McsError> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            got += n as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOSYS) => {
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut buf))
                    .map_err(McsError::Random)?;
                return Ok(u32::from_ne_bytes(buf));
            }
            _ => return Err(McsError::Random(e)),
        }
    }
    Ok(u32::from_ne_bytes(buf))
}

/// `s0:cA,cB` (categories in ascending order, as the kernel writes them; one category if both
/// are the same).
fn level(pair: McsPair) -> String {
    let (a, b) = (pair.0.min(pair.1), pair.0.max(pair.1));
    if a == b {
        format!("s0:c{a}")
    } else {
        format!("s0:c{a},c{b}")
    }
}

/// The VMM's process context: `system_u:system_r:ferrovisor_vm_t:s0:cA,cB`.
pub fn vm_context(pair: McsPair) -> String {
    format!("system_u:system_r:{VM_DOMAIN}:{}", level(pair))
}

/// The context of a VM's read-write disk: `system_u:object_r:ferrovisor_vm_image_t:s0:cA,cB`
/// (that VM only; images shared read-only get [`SHARED_IMAGE_CONTEXT`]).
pub fn image_context(pair: McsPair) -> String {
    format!("system_u:object_r:ferrovisor_vm_image_t:{}", level(pair))
}

/// The context of a VM's run directory and what is in it:
/// `system_u:object_r:ferrovisor_vm_run_t:s0:cA,cB`.
pub fn run_dir_context(pair: McsPair) -> String {
    format!("system_u:object_r:ferrovisor_vm_run_t:{}", level(pair))
}

/// The category pair of a context such as a re-adopted VMM's `/proc/<pid>/attr/current`
/// (`system_u:system_r:ferrovisor_vm_t:s0:c12,c345`, a trailing NUL or newline allowed);
/// `None` unless it has exactly two categories.
pub fn parse_categories(context: &str) -> Option<McsPair> {
    let context = context.trim_end_matches(['\0', '\n']);
    // user:role:type:level — the level is everything after the third colon.
    let level = context.splitn(4, ':').nth(3)?;
    let cats = level.strip_prefix("s0:")?;
    let (a, b) = cats.split_once(',')?;
    let parse = |c: &str| c.strip_prefix('c')?.parse::<u16>().ok();
    let (a, b) = (parse(a)?, parse(b)?);
    (a < b && b < CATEGORIES).then_some((a, b))
}

/// What the child writes to [`attr_exec_path`] so that its next `execve` runs in the VM's
/// domain and level: [`vm_context`].
pub fn exec_label_for_child(pair: McsPair) -> String {
    vm_context(pair)
}

/// The file that sets the calling task's SELinux context for its next exec,
/// `/proc/self/attr/exec`. Opened in the child after the clone, so `self` is the child.
pub fn attr_exec_path() -> PathBuf {
    PathBuf::from("/proc/self/attr/exec")
}

/// `Ok` when this host enforces (or logs, when permissive) SELinux and has the ferrovisor
/// policy module loaded, so a VMM can run in `ferrovisor_vm_t`; else why not, and what to do.
pub fn enabled() -> Result<(), String> {
    enabled_in(Path::new("/"))?;
    check_context(&vm_context((0, 1))).map_err(|e| {
        format!(
            "the ferrovisor SELinux policy module is not loaded ({e}): build and install it \
             from packaging/selinux (checkmodule -M -m -o ferrovisor.mod ferrovisor.te && \
             semodule_package -o ferrovisor.pp -m ferrovisor.mod -f ferrovisor.fc && semodule \
             -i ferrovisor.pp)"
        )
    })
}

/// [`enabled`]'s kernel checks against a filesystem rooted at `root` (tests use a fake one).
fn enabled_in(root: &Path) -> Result<(), String> {
    let fs = root.join(SELINUXFS.trim_start_matches('/'));
    let enforce = fs.join("enforce");
    if std::fs::read_to_string(&enforce).is_ok() {
        return Ok(());
    }
    let known = std::fs::read_to_string(root.join("proc/filesystems"))
        .map(|t| t.split_whitespace().any(|w| w == "selinuxfs"))
        .unwrap_or(false);
    Err(if !known {
        "the kernel has no SELinux (selinuxfs is not in /proc/filesystems): it needs \
         CONFIG_SECURITY_SELINUX and selinux in the lsm= boot parameter (or security=selinux)"
            .into()
    } else if !fs.join("enforce").exists() && !fs.join("status").exists() {
        format!("selinuxfs is not mounted: mount -t selinuxfs selinuxfs {SELINUXFS}")
    } else {
        format!(
            "{} cannot be read: SELinux has no policy loaded, or this process may not read it",
            enforce.display()
        )
    })
}

/// Whether the loaded policy knows `context` (the kernel's own check, by writing it to
/// selinuxfs's `context` file, as libselinux's `security_check_context` does).
pub fn check_context(context: &str) -> Result<(), String> {
    let path = Path::new(SELINUXFS).join("context");
    let mut bytes = context.as_bytes().to_vec();
    bytes.push(0);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(&bytes))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => format!("{context} is not a valid context in the loaded policy"),
            _ => format!("checking {context} with {}: {e}", path.display()),
        })
}

/// Labels `path` with `context` (its `security.selinux` extended attribute, as `chcon` does;
/// a symlink is followed).
pub fn set_file_context(path: &Path, context: &str) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))?;
    let mut value = context.as_bytes().to_vec();
    value.push(0);
    // SAFETY: setxattr reads the NUL-terminated path and name and `value.len()` bytes of
    // `value`, all of which outlive the call.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"security.selinux".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("labelling {} {context}: {e}", path.display()),
        ));
    }
    Ok(())
}

/// The context `path` is labelled with (its `security.selinux` extended attribute), e.g. to
/// put it back when the VM is gone.
pub fn file_context(path: &Path) -> io::Result<String> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: getxattr writes at most `buf.len()` bytes into `buf`, which we own; the path
        // and name are NUL-terminated and outlive the call.
        let n = unsafe {
            libc::getxattr(
                p.as_ptr(),
                c"security.selinux".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            let text = String::from_utf8_lossy(&buf);
            return Ok(text.trim_end_matches('\0').to_string());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 65536 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_ordered_in_range_and_never_shared_while_held() {
        let mut a = McsAllocator::new();
        assert_eq!(a.capacity(), 1024 * 1023 / 2);
        let mut seen = BTreeSet::new();
        for _ in 0..3000 {
            let (c1, c2) = a.allocate().unwrap();
            assert!(c1 < c2 && c2 < CATEGORIES, "c{c1},c{c2}");
            assert!(seen.insert((c1, c2)), "c{c1},c{c2} handed out twice");
        }
        assert_eq!(a.held(), 3000);
        // Random, not sequential: the pairs are spread over the categories.
        let high = seen.iter().filter(|(_, c2)| *c2 >= 512).count();
        assert!(high > 1000, "{high} of 3000 pairs reach c512 or above");
    }

    #[test]
    fn exhaustion_is_an_error_and_release_frees_a_pair() {
        let mut a = McsAllocator::with_categories(4).unwrap();
        assert_eq!(a.capacity(), 6);
        let mut got = BTreeSet::new();
        for _ in 0..6 {
            let p = a.allocate().unwrap();
            assert!(p.0 < p.1 && p.1 < 4, "{p:?}");
            assert!(got.insert(p), "{p:?} twice");
        }
        assert_eq!(
            got,
            [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
                .into_iter()
                .collect()
        );
        let e = a.allocate().unwrap_err();
        assert!(matches!(e, McsError::Exhausted { capacity: 6 }), "{e}");
        assert!(e.to_string().contains("all 6 MCS category pairs"), "{e}");
        assert!(a.release((1, 3)));
        assert!(!a.release((1, 3)));
        assert_eq!(a.allocate().unwrap(), (1, 3));
    }

    #[test]
    fn the_last_free_pairs_are_found() {
        // Nearly full: random draws mostly hit held pairs, the fallback finds the free one.
        for _ in 0..20 {
            let mut a = McsAllocator::with_categories(64).unwrap();
            let free = (17, 42);
            for x in 0..64u16 {
                for y in x + 1..64 {
                    if (x, y) != free {
                        a.hold((x, y)).unwrap();
                    }
                }
            }
            assert_eq!(a.allocate().unwrap(), free);
            assert!(matches!(a.allocate(), Err(McsError::Exhausted { .. })));
        }
    }

    #[test]
    fn hold_adopts_a_pair_that_allocate_then_avoids() {
        let mut a = McsAllocator::with_categories(3).unwrap();
        a.hold((0, 2)).unwrap();
        assert!(a.is_held((0, 2)));
        assert!(matches!(a.hold((0, 2)), Err(McsError::AlreadyHeld((0, 2)))));
        for bad in [(2, 2), (2, 1), (0, 3), (5, 9)] {
            let e = a.hold(bad).unwrap_err();
            assert!(matches!(e, McsError::Invalid { .. }), "{bad:?}: {e}");
        }
        let got: BTreeSet<_> = (0..2).map(|_| a.allocate().unwrap()).collect();
        assert_eq!(got, [(0, 1), (1, 2)].into_iter().collect());
        assert!(matches!(a.allocate(), Err(McsError::Exhausted { .. })));
        assert!(matches!(
            McsAllocator::with_categories(1),
            Err(McsError::Categories(1))
        ));
        assert!(McsAllocator::with_categories(1025).is_err());
    }

    #[test]
    fn contexts_and_their_categories() {
        assert_eq!(
            vm_context((1, 2)),
            "system_u:system_r:ferrovisor_vm_t:s0:c1,c2"
        );
        assert_eq!(
            image_context((7, 1023)),
            "system_u:object_r:ferrovisor_vm_image_t:s0:c7,c1023"
        );
        assert_eq!(
            run_dir_context((3, 4)),
            "system_u:object_r:ferrovisor_vm_run_t:s0:c3,c4"
        );
        // Always written in the kernel's order.
        assert_eq!(vm_context((9, 2)), vm_context((2, 9)));
        assert_eq!(exec_label_for_child((1, 2)), vm_context((1, 2)));
        assert_eq!(attr_exec_path(), Path::new("/proc/self/attr/exec"));
        for pair in [(0, 1), (12, 345), (1022, 1023)] {
            assert_eq!(parse_categories(&vm_context(pair)), Some(pair));
        }
        assert_eq!(
            parse_categories("system_u:system_r:ferrovisor_vm_t:s0:c12,c345\0"),
            Some((12, 345))
        );
        for bad in [
            "system_u:system_r:ferrovisor_vm_t:s0",
            "system_u:system_r:ferrovisor_vm_t:s0:c5",
            "system_u:system_r:ferrovisor_vm_t:s0:c5,c5",
            "system_u:system_r:ferrovisor_vm_t:s0:c9,c5",
            "system_u:system_r:ferrovisor_vm_t:s0:c1,c1024",
            "system_u:system_r:ferrovisor_vm_t:s0:c0.c1023",
            "system_u:system_r:ferrovisor_vm_t:s0-s0:c0,c1",
            "unconfined",
            "",
        ] {
            assert_eq!(parse_categories(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn enabled_explains_what_is_missing() {
        let root = std::env::temp_dir().join(format!("fv-selinux-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("proc/filesystems"),
            "nodev\tsysfs\nnodev\ttmpfs\n",
        )
        .unwrap();
        let e = enabled_in(&root).unwrap_err();
        assert!(e.contains("the kernel has no SELinux"), "{e}");
        std::fs::write(
            root.join("proc/filesystems"),
            "nodev\tsysfs\nnodev\tselinuxfs\n",
        )
        .unwrap();
        let e = enabled_in(&root).unwrap_err();
        assert!(
            e.contains("mount -t selinuxfs selinuxfs /sys/fs/selinux"),
            "{e}"
        );
        std::fs::create_dir_all(root.join("sys/fs/selinux")).unwrap();
        std::fs::write(root.join("sys/fs/selinux/enforce"), "1").unwrap();
        assert_eq!(enabled_in(&root), Ok(()));
        let _ = std::fs::remove_dir_all(&root);
        // The real host: either way, a reason when not.
        if let Err(e) = enabled() {
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn file_contexts_round_trip() {
        let dir = std::env::temp_dir().join(format!("fv-selinux-fc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("disk.img");
        std::fs::write(&f, b"").unwrap();
        // Without SELinux, root may still store the attribute (ext4, tmpfs); with it, only a
        // context the loaded policy knows. Either way it reads back as written, or the error
        // says what failed.
        match set_file_context(&f, SHARED_IMAGE_CONTEXT) {
            Ok(()) => assert_eq!(file_context(&f).unwrap(), SHARED_IMAGE_CONTEXT),
            Err(e) => assert!(e.to_string().starts_with("labelling "), "{e}"),
        }
        let missing = dir.join("missing.img");
        let e = set_file_context(&missing, SHARED_IMAGE_CONTEXT).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("missing.img"), "{e}");
        assert!(file_context(&missing).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
