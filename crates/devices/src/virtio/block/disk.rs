//! The disk image: opening and checking it, its capacity and serial, and the operations that
//! are not plain reads and writes (discard, write-zeroes).

use super::{BlockConfig, BlockError, SECTOR_SIZE};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Bytes of the serial returned by GET_ID.
pub(super) const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// An opened, checked disk image.
#[derive(Debug)]
pub(super) struct Disk {
    pub file: File,
    pub path: PathBuf,
    pub readonly: bool,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// The GET_ID serial, zero-padded.
    pub id: [u8; ID_BYTES],
    pub is_block_device: bool,
}

fn open_error(path: &Path, e: io::Error, write: bool) -> BlockError {
    let path = path.to_path_buf();
    match e.kind() {
        io::ErrorKind::NotFound => BlockError::NotFound { path },
        io::ErrorKind::PermissionDenied => BlockError::PermissionDenied {
            path,
            access: if write { "read-write" } else { "reading" },
        },
        _ if e.raw_os_error() == Some(libc::EROFS) => BlockError::PermissionDenied {
            path,
            access: "read-write (read-only file system)",
        },
        _ => BlockError::Io { path, source: e },
    }
}

fn check_kind(path: &Path, meta: &Metadata) -> Result<bool, BlockError> {
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(false)
    } else if ft.is_block_device() {
        Ok(true)
    } else {
        Err(BlockError::NotADisk {
            path: path.to_path_buf(),
        })
    }
}

/// A stable serial derived from the image's device and inode: "fv-" and 16 hex digits.
fn default_id(meta: &Metadata) -> [u8; ID_BYTES] {
    // FNV-1a: stable across builds and Rust versions (unlike std's hashers).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in meta
        .dev()
        .to_le_bytes()
        .into_iter()
        .chain(meta.ino().to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let s = format!("fv-{h:016x}");
    let mut id = [0u8; ID_BYTES];
    for (d, s) in id.iter_mut().zip(s.bytes()) {
        *d = s;
    }
    id
}

impl Disk {
    /// Opens and checks the image `cfg` names.
    pub fn open(cfg: &BlockConfig) -> Result<Disk, BlockError> {
        let path = cfg.path.as_path();
        let write = !cfg.readonly;
        // Refuse directories, sockets, FIFOs (opening a FIFO could block) before opening.
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, e, write))?;
        check_kind(path, &meta)?;
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| open_error(path, e, write))?;
        // The path may have changed between the two calls: what counts is what was opened.
        let meta = file.metadata().map_err(|e| BlockError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let is_block_device = check_kind(path, &meta)?;
        let size = if is_block_device {
            (&file).seek(SeekFrom::End(0)).map_err(|e| BlockError::Io {
                path: path.to_path_buf(),
                source: e,
            })?
        } else {
            meta.len()
        };
        if !size.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let id = match &cfg.id {
            Some(s) if s.len() > ID_BYTES => {
                return Err(BlockError::IdTooLong {
                    path: path.to_path_buf(),
                    len: s.len(),
                })
            }
            Some(s) => {
                let mut id = [0u8; ID_BYTES];
                for (d, s) in id.iter_mut().zip(s.bytes()) {
                    *d = s;
                }
                id
            }
            None => default_id(&meta),
        };
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            readonly: cfg.readonly,
            sectors: size / SECTOR_SIZE,
            id,
            is_block_device,
        })
    }

    /// The file descriptor.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        let o =
            libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: fallocate on a descriptor we own; no memory is passed.
            let r = unsafe { libc::fallocate(self.fd(), mode, o, l) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn blk_ioctl(&self, req: libc::c_ulong, off: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [off, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read a u64[2] range from the pointer, which points to a
        // live local array of that type.
        let r = unsafe { libc::ioctl(self.fd(), req as _, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Discards `len` bytes at `off` (already checked against the capacity).
    pub fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if self.is_block_device {
            self.blk_ioctl(BLKDISCARD, off, len)
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        }
    }

    /// Makes `len` bytes at `off` read back as zeroes, deallocating them when `unmap` allows.
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> io::Result<()> {
        let fast = if self.is_block_device {
            self.blk_ioctl(BLKZEROOUT, off, len)
        } else {
            let zero = self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            );
            match zero {
                Err(_) if unmap => self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                ),
                other => other,
            }
        };
        if fast.is_ok() {
            return fast;
        }
        // The file system or device cannot: write the zeroes.
        let buf = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64);
            let at = off.checked_add(done).ok_or(io::ErrorKind::InvalidInput)?;
            // `n` is at most the buffer length.
            self.file.write_all_at(&buf[..n as usize], at)?;
            done += n;
        }
        Ok(())
    }
}
