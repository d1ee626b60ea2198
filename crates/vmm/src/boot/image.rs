//! Reading a kernel image into guest RAM that nothing has written yet, without copying what
//! is already there: the holes of a sparse file.
//!
//! Guest RAM starts as anonymous memory, all zeros. A hole in the image file reads as zeros
//! too, so copying it is a no-op that still costs a page-cache read, a copy and the guest
//! pages it faults in. Debian's vmlinux, unpacked by guest/assets.sh, is 63 MiB of which
//! 32 MiB are holes (the space its last segment reserves for .bss and .brk); [`SparseImage`]
//! skips them, so loading reads and copies half as much, and leaves those guest pages
//! untouched until the guest uses them.
//!
//! Skipping is exact only while the bytes it leaves alone are still zero: the image must be
//! the first thing written to its guest range, and a range must not be written twice (two
//! ELF segments overlapping). [`load_elf`] checks the second from the program headers and
//! reads every byte where they overlap; the caller loads the kernel before it writes anything
//! else into guest memory.

use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::{Elf, KernelLoader, KernelLoaderResult};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    ByteValued, GuestAddress, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
};
use vmm_sys_util::seek_hole::SeekHole;

/// A file read from position `pos`, where holes are skipped instead of read (when `skip`).
pub struct SparseImage {
    file: File,
    pos: u64,
    len: u64,
    skip: bool,
    /// Bytes not read because they were holes (for the log and the tests).
    pub skipped: u64,
}

impl SparseImage {
    /// Wraps `file`, positioned at its start.
    pub fn new(mut file: File) -> io::Result<SparseImage> {
        let len = file.metadata()?.len();
        file.rewind()?;
        Ok(SparseImage {
            file,
            pos: 0,
            len,
            skip: true,
            skipped: 0,
        })
    }

    /// Where the run of data or hole that starts at `pos` ends, and whether it is a hole.
    /// Filesystems without hole support report the whole file as data.
    fn extent(&mut self) -> io::Result<(u64, bool)> {
        let data = self.file.seek_data(self.pos)?;
        let extent = match data {
            // No data at or after `pos`: the rest of the file is a hole.
            None => (self.len, true),
            Some(d) if d > self.pos => (d, true),
            Some(_) => (self.file.seek_hole(self.pos)?.unwrap_or(self.len), false),
        };
        // seek_data/seek_hole moved the file offset: back to where reading goes on.
        self.file.seek(SeekFrom::Start(self.pos))?;
        Ok(extent)
    }
}

impl Read for SparseImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SparseImage {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        self.pos = self.file.seek(from)?;
        Ok(self.pos)
    }
}

impl SparseImage {
    /// Reads (or skips) the run of data (or hole) at `pos`, up to `buf`'s length.
    fn read_extent<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let (end, hole) = if self.skip {
            // A filesystem that cannot say where its holes are: read everything.
            self.extent().unwrap_or((self.len, false))
        } else {
            (self.len, false)
        };
        let n = usize::try_from(end - self.pos)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if hole {
            // The destination is still zero (see the module's doc): leave it alone.
            self.file
                .seek(SeekFrom::Current(n as i64))
                .map_err(VolatileMemoryError::IOError)?;
            self.pos += n as u64;
            self.skipped += n as u64;
            return Ok(n);
        }
        let mut part = buf.subslice(0, n)?;
        let read = self.file.read_volatile(&mut part)?;
        self.pos += read as u64;
        Ok(read)
    }
}

impl ReadVolatile for SparseImage {
    /// Fills as much of `buf` as the file has, run by run (vm-memory reads a region with one
    /// call, as from a plain file).
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0;
        while done < buf.len() && self.pos < self.len {
            let n = self.read_extent(&mut buf.offset(done)?)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

/// The `PT_LOAD` segments of the ELF image in `file` that have bytes in the file:
/// `(file offset, guest address, length)`, by guest address.
fn load_segments(file: &mut SparseImage) -> io::Result<Vec<(u64, u64, u64)>> {
    let mut ehdr = Elf64_Ehdr::default();
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(ehdr.as_mut_slice())?;
    file.seek(SeekFrom::Start(ehdr.e_phoff))?;
    let mut segments = Vec::new();
    for _ in 0..ehdr.e_phnum {
        let mut phdr = Elf64_Phdr::default();
        file.read_exact(phdr.as_mut_slice())?;
        if phdr.p_type == PT_LOAD && phdr.p_filesz > 0 {
            segments.push((phdr.p_offset, phdr.p_paddr, phdr.p_filesz));
        }
    }
    segments.sort_unstable_by_key(|s| s.1);
    Ok(segments)
}

/// Whether two segments would write the same guest bytes (then holes must be read: the
/// second one's zeros overwrite the first one's data).
fn segments_overlap(segments: &[(u64, u64, u64)]) -> bool {
    segments
        .windows(2)
        .any(|w| w[1].1 < w[0].1.saturating_add(w[0].2))
}

/// Loads the ELF kernel in `file` into `mem` (linux-loader's [`Elf`]), skipping the file's
/// holes where that is exact. `mem`'s kernel range must not have been written yet.
///
/// Most of a load's time is not the copy but the host kernel allocating and zeroing the guest
/// pages the copy faults in (with 2 MiB pages, ~70% of the load in a profile on this project's
/// host): skipping the holes saves both for half of Debian's vmlinux. (Faulting the pages in
/// from a second thread while the copy runs was tried and measured no faster here.)
pub fn load_elf(
    mem: &GuestMemoryMmap,
    file: File,
    highmem_start: GuestAddress,
) -> Result<(KernelLoaderResult, u64), linux_loader::loader::Error> {
    let mut image = SparseImage::new(file).map_err(|_| elf_err())?;
    // Headers that cannot be read are linux-loader's to report, with its own error.
    let segments = load_segments(&mut image).unwrap_or_default();
    image.skip = !segments.is_empty() && !segments_overlap(&segments);
    let result = Elf::load(mem, None, &mut image, Some(highmem_start))?;
    Ok((result, image.skipped))
}

fn elf_err() -> linux_loader::loader::Error {
    linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadElfHeader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
    }

    /// A file of `len` bytes with data only at `data` (offset, byte value, length).
    fn sparse_file(len: u64, data: &[(u64, u8, usize)]) -> File {
        let mut f = tempfile();
        f.set_len(len).expect("set_len");
        for &(off, byte, n) in data {
            f.seek(SeekFrom::Start(off)).expect("seek");
            f.write_all(&vec![byte; n]).expect("write");
        }
        f.rewind().expect("rewind");
        f
    }

    fn tempfile() -> File {
        // A directory per test thread (tests run in parallel), gone with the file: the open
        // file is all the test needs.
        let dir = std::env::temp_dir().join(format!(
            "fv-image-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("image");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        f
    }

    #[test]
    fn holes_are_skipped_and_data_lands_where_it_belongs() {
        // 4 MiB: data at 0 and at 3 MiB, a hole between (the filesystem decides its exact
        // extent: at least most of the middle 3 MiB).
        let mb = 1 << 20;
        let file = sparse_file(4 * mb, &[(0, 0xaa, 4096), (3 * mb, 0xbb, 8192)]);
        let m = mem(8 << 20);
        let mut image = SparseImage::new(file).expect("image");
        m.read_exact_volatile_from(GuestAddress(mb), &mut image, 4 * mb as usize)
            .expect("read");
        let byte = |a: u64| m.read_obj::<u8>(GuestAddress(a)).expect("byte");
        assert_eq!(byte(mb), 0xaa);
        assert_eq!(byte(mb + 4095), 0xaa);
        assert_eq!(byte(mb + 4096), 0);
        assert_eq!(byte(mb + 2 * mb), 0);
        assert_eq!(byte(mb + 3 * mb), 0xbb);
        assert_eq!(byte(mb + 3 * mb + 8191), 0xbb);
        assert_eq!(byte(mb + 3 * mb + 8192), 0);
        assert!(image.skipped >= 2 * mb, "skipped only {}", image.skipped);
        assert_eq!(image.pos, 4 * mb);
    }

    #[test]
    fn a_file_without_holes_is_read_whole() {
        let file = sparse_file(65536, &[(0, 0x11, 65536)]);
        let m = mem(1 << 20);
        let mut image = SparseImage::new(file).expect("image");
        m.read_exact_volatile_from(GuestAddress(0), &mut image, 65536)
            .expect("read");
        assert_eq!(image.skipped, 0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(65535)).expect("byte"), 0x11);
        assert_eq!(m.read_obj::<u8>(GuestAddress(65536)).expect("byte"), 0);
    }

    #[test]
    fn reading_past_the_end_fails_as_a_short_file_does() {
        let file = sparse_file(8192, &[(0, 0x22, 100)]);
        let m = mem(1 << 20);
        let mut image = SparseImage::new(file).expect("image");
        assert!(m
            .read_exact_volatile_from(GuestAddress(0), &mut image, 16384)
            .is_err());
    }

    fn elf_with(segments: &[(u64, u64, u64)]) -> File {
        // (file offset, guest address, size), data byte 0x5a, the rest of the file a hole.
        let mut ehdr = Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(b"\x7fELF");
        ehdr.e_ident[4] = 2; // 64-bit
        ehdr.e_ident[5] = 1; // little endian
        ehdr.e_ident[6] = 1;
        ehdr.e_type = 2;
        ehdr.e_machine = 62; // x86-64
        ehdr.e_version = 1;
        ehdr.e_entry = 0x100000;
        ehdr.e_phoff = 64;
        ehdr.e_ehsize = 64;
        ehdr.e_phentsize = 56;
        ehdr.e_phnum = segments.len() as u16;
        let mut f = sparse_file(4 << 20, &[]);
        f.write_all(ehdr.as_slice()).expect("ehdr");
        for &(off, addr, size) in segments {
            let phdr = Elf64_Phdr {
                p_type: PT_LOAD,
                p_offset: off,
                p_paddr: addr,
                p_vaddr: addr,
                p_filesz: size,
                p_memsz: size,
                p_align: 0x1000,
                ..Default::default()
            };
            f.write_all(phdr.as_slice()).expect("phdr");
        }
        for &(off, _, _) in segments {
            f.seek(SeekFrom::Start(off)).expect("seek");
            f.write_all(&[0x5a; 4096]).expect("data");
        }
        f.rewind().expect("rewind");
        f
    }

    #[test]
    fn an_elf_kernel_loads_with_its_holes_skipped() {
        let f = elf_with(&[(0x1000, 0x100000, 0x300000)]);
        let m = mem(8 << 20);
        let (result, skipped) = load_elf(&m, f, GuestAddress(0x100000)).expect("load");
        assert_eq!(result.kernel_end, 0x400000);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100000)).expect("b"), 0x5a);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x200000)).expect("b"), 0);
        assert!(skipped > 0x100000, "skipped {skipped}");
    }

    #[test]
    fn overlapping_segments_are_read_whole() {
        // The second segment's hole covers the first one's data: it must write its zeros.
        let f = elf_with(&[(0x1000, 0x100000, 0x2000), (0x100000, 0x101000, 0x200000)]);
        let m = mem(8 << 20);
        let (_, skipped) = load_elf(&m, f, GuestAddress(0x100000)).expect("load");
        assert_eq!(skipped, 0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100000)).expect("b"), 0x5a);
        // 0x101000 is the second segment's first byte: its data (0x5a) over the first's.
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x101000)).expect("b"), 0x5a);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x102000)).expect("b"), 0);
    }
}
