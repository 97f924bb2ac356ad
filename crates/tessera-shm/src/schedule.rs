//! The slices that share one physical device, for the compute limiter.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries in a device [`Schedule`]: slices that share one device.
pub const ENTRIES: usize = 64;

/// One slice on a device, as the compute limiter sees it.
#[repr(C)]
pub struct Entry {
    /// Nonzero key of the slice (a hash of its accounting region's path); 0 = free.
    pub key: AtomicU64,
    pub share_milli: AtomicU64,
    /// 1 when the slice may use capacity others leave idle.
    pub burst: AtomicU64,
    /// When a process of the slice last launched work (monotonic ns).
    pub last_active: AtomicU64,
}

/// The slices sharing one physical device: a file every slice's processes map.
pub struct Schedule {
    entries: *const [Entry; ENTRIES],
}

// SAFETY: the mapping lives as long as the Schedule and is only accessed through atomics.
unsafe impl Send for Schedule {}
// SAFETY: as above.
unsafe impl Sync for Schedule {}

impl Drop for Schedule {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of its full length.
        unsafe {
            libc::munmap(
                self.entries as *mut libc::c_void,
                size_of::<[Entry; ENTRIES]>(),
            );
        }
    }
}

impl Schedule {
    /// Opens (creating when missing) the schedule file at `path`.
    pub fn open_or_create(path: &Path) -> io::Result<Schedule> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = size_of::<[Entry; ENTRIES]>() as u64;
        if f.metadata()?.len() < len {
            // Growing a file fills it with zeros: all entries free.
            f.set_len(len)?;
        }
        // SAFETY: a shared mapping of a file we hold open, of the layout's length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Schedule {
            entries: ptr as *const [Entry; ENTRIES],
        })
    }

    pub fn entries(&self) -> &[Entry; ENTRIES] {
        // SAFETY: valid for the Schedule's life; plain atomics.
        unsafe { &*self.entries }
    }

    /// The entry of slice `key`: its own, a free one, or one idle for longer than `stale_ns`.
    pub fn join(&self, key: u64, now_ns: u64, stale_ns: u64) -> Option<usize> {
        let entries = self.entries();
        if let Some(i) = entries
            .iter()
            .position(|e| e.key.load(Ordering::SeqCst) == key)
        {
            return Some(i);
        }
        for (i, e) in entries.iter().enumerate() {
            let old = e.key.load(Ordering::SeqCst);
            let idle = now_ns.saturating_sub(e.last_active.load(Ordering::SeqCst)) > stale_ns;
            if (old == 0 || idle)
                && e.key
                    .compare_exchange(old, key, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                e.last_active.store(now_ns, Ordering::SeqCst);
                return Some(i);
            }
        }
        None
    }
}
