//! Accounting that several processes share through one memory-mapped file, without locks.
//!
//! A [`Region`] holds a cap and one slot per process (pid, start time, bytes). A process charges
//! its own slot first and only then sums every slot: if the sum passes the cap it takes its charge
//! back. Two processes racing for the last bytes can both fail, never both succeed. A process
//! killed at any instant leaves nothing half-done: its slot still says what it holds, and the next
//! process short of room gives back the slots of processes that no longer exist (the pid is gone,
//! or belongs to a process started at another time).
//!
//! Used by the interception library (a slice's memory cap, shared by the processes of one
//! allocation) and by the simulated driver (a simulated device's memory, shared by every process
//! on the machine).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

pub mod cuda;
mod schedule;
pub use schedule::{ENTRIES, Entry, Schedule};

const MAGIC: u64 = 0x7465_7373_6572_6132; // "tessera2"
/// Process slots per region: processes of one allocation, or on one simulated device.
pub const SLOTS: usize = 512;
/// Spare words a user of the region may use for its own shared counters.
pub const WORDS: usize = 16;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    cap: AtomicU64,
    words: [AtomicU64; WORDS],
}

#[repr(C)]
struct Slot {
    pid: AtomicI32,
    _pad: u32,
    start_time: AtomicU64,
    bytes: AtomicU64,
    /// The pid namespace `pid` belongs to (its inode): confined workloads each have their own,
    /// so pids repeat across them and only a process of the same namespace can tell whether a
    /// slot's process still lives.
    ns: AtomicU64,
}

#[repr(C)]
struct Layout {
    header: Header,
    slots: [Slot; SLOTS],
}

/// A mapped region. Cheap to share between threads; every operation is atomic.
pub struct Region {
    layout: *const Layout,
}

// SAFETY: the mapping is never unmapped while a Region exists, and all access is through atomics.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the pointer and length are those of our own mmap.
        unsafe {
            libc::munmap(self.layout as *mut libc::c_void, size_of::<Layout>());
        }
    }
}

/// The start time of process `pid` (clock ticks since boot), `None` when it does not exist.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field 22 (starttime) is the 20th after the name.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The inode of this process's pid namespace (0 when it cannot be read).
pub fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

impl Region {
    /// Opens the region at `path`, creating it with `cap` when it does not exist. A region that
    /// exists keeps its cap. Creation is atomic: a complete file is linked into place, so no
    /// process ever maps a half-written one.
    pub fn open_or_create(path: &Path, cap: u64) -> io::Result<Region> {
        if !path.exists() {
            let dir = path.parent().unwrap_or(Path::new("."));
            let tmp = dir.join(format!(
                ".{}.{}.tmp",
                path.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("region"),
                std::process::id()
            ));
            {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)?;
                f.set_len(size_of::<Layout>() as u64)?;
                let region = Region::map(&f)?;
                region.layout().header.cap.store(cap, Ordering::SeqCst);
                region.layout().header.magic.store(MAGIC, Ordering::SeqCst);
            }
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Region::open(path)
    }

    /// Opens an existing region.
    pub fn open(path: &Path) -> io::Result<Region> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        if f.metadata()?.len() < size_of::<Layout>() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a Tessera accounting region", path.display()),
            ));
        }
        let region = Region::map(&f)?;
        if region.layout().header.magic.load(Ordering::SeqCst) != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a Tessera accounting region", path.display()),
            ));
        }
        Ok(region)
    }

    fn map(f: &std::fs::File) -> io::Result<Region> {
        // SAFETY: a shared read-write mapping of a file we hold open, of its full length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size_of::<Layout>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            layout: ptr as *const Layout,
        })
    }

    fn layout(&self) -> &Layout {
        // SAFETY: the mapping is valid for the Region's life and Layout is plain atomics.
        unsafe { &*self.layout }
    }

    pub fn cap(&self) -> u64 {
        self.layout().header.cap.load(Ordering::SeqCst)
    }

    /// A spare shared word (index < [`WORDS`]).
    pub fn word(&self, index: usize) -> &AtomicU64 {
        &self.layout().header.words[index]
    }

    /// Bytes held by all slots.
    pub fn used(&self) -> u64 {
        self.layout()
            .slots
            .iter()
            .map(|s| s.bytes.load(Ordering::SeqCst))
            .sum()
    }

    /// Bytes held by the slot of `pid`, if it has one.
    pub fn used_by(&self, pid: i32) -> u64 {
        self.layout()
            .slots
            .iter()
            .filter(|s| s.pid.load(Ordering::SeqCst) == pid)
            .map(|s| s.bytes.load(Ordering::SeqCst))
            .sum()
    }

    /// A slot for this process (`pid` started at `start_time`): its own from before, a free one,
    /// or one of a process that is gone. `None` when all are held by live processes.
    pub fn claim(&self, pid: i32, start_time: u64) -> Option<usize> {
        let slots = &self.layout().slots;
        let ns = pid_namespace();
        if let Some(i) = slots.iter().position(|s| {
            s.pid.load(Ordering::SeqCst) == pid
                && s.start_time.load(Ordering::SeqCst) == start_time
                && s.ns.load(Ordering::SeqCst) == ns
        }) {
            return Some(i);
        }
        for _ in 0..2 {
            for (i, s) in slots.iter().enumerate() {
                if s.pid
                    .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    s.ns.store(ns, Ordering::SeqCst);
                    s.start_time.store(start_time, Ordering::SeqCst);
                    return Some(i);
                }
            }
            if self.reclaim_dead() == 0 && !slots.iter().any(|s| s.pid.load(Ordering::SeqCst) == 0)
            {
                return None;
            }
        }
        None
    }

    /// After a checkpoint restore the process has its old pid but a new start time: stamps slot
    /// `slot` with it, if the slot is still this pid's. `false` when another process has
    /// already given the slot back (it looked dead meanwhile).
    pub fn restamp(&self, slot: usize, pid: i32, start_time: u64) -> bool {
        let s = &self.layout().slots[slot];
        if s.pid.load(Ordering::SeqCst) == pid {
            s.start_time.store(start_time, Ordering::SeqCst);
            true
        } else {
            false
        }
    }

    /// Adds `bytes` to slot `slot` whatever the cap: for memory a process already holds (after
    /// a restore) and must be counted again.
    pub fn recharge(&self, slot: usize, bytes: u64) {
        self.layout().slots[slot]
            .bytes
            .fetch_add(bytes, Ordering::SeqCst);
    }

    /// Adds `bytes` to slot `slot` if the total stays within the cap (after giving back the
    /// slots of dead processes, when short). Returns whether it was charged.
    pub fn try_charge(&self, slot: usize, bytes: u64) -> bool {
        let s = &self.layout().slots[slot];
        for attempt in 0..2 {
            s.bytes.fetch_add(bytes, Ordering::SeqCst);
            if self.used() <= self.cap() {
                return true;
            }
            s.bytes.fetch_sub(bytes, Ordering::SeqCst);
            if attempt == 0 && self.reclaim_dead() == 0 {
                break;
            }
        }
        false
    }

    /// Takes `bytes` off slot `slot` (a free).
    pub fn credit(&self, slot: usize, bytes: u64) {
        let s = &self.layout().slots[slot];
        let _ = s
            .bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    /// Frees the slots of processes that no longer exist; returns the bytes given back. Slots of
    /// another pid namespace are left to [`Region::release_namespace`].
    pub fn reclaim_dead(&self) -> u64 {
        let mut freed = 0;
        let ours = pid_namespace();
        for s in &self.layout().slots {
            let pid = s.pid.load(Ordering::SeqCst);
            if pid == 0 {
                continue;
            }
            let ns = s.ns.load(Ordering::SeqCst);
            if ns != 0 && ns != ours {
                continue;
            }
            let start = s.start_time.load(Ordering::SeqCst);
            let alive = process_start_time(pid).is_some_and(|t| t == start || start == 0);
            if alive {
                continue;
            }
            freed += free_slot(s, pid);
        }
        freed
    }

    /// Frees every slot of pid namespace `ns`, whose processes have all ended (the agent calls
    /// this when a confined replica is over); returns the bytes given back.
    pub fn release_namespace(&self, ns: u64) -> u64 {
        let mut freed = 0;
        for s in &self.layout().slots {
            let pid = s.pid.load(Ordering::SeqCst);
            if pid == 0 || ns == 0 || s.ns.load(Ordering::SeqCst) != ns {
                continue;
            }
            freed += free_slot(s, pid);
        }
        freed
    }
}

/// Gives back slot `s` of process `pid`; returns its bytes. The bytes go first, then the slot: a
/// crash in between leaves a slot with zero bytes, which the next pass frees.
fn free_slot(s: &Slot, pid: i32) -> u64 {
    let freed = s.bytes.swap(0, Ordering::SeqCst);
    let _ = s
        .pid
        .compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
    freed
}

/// `path` as a C string (for FFI callers).
pub fn c_path(path: &Path) -> Option<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> (i32, u64) {
        let pid = std::process::id() as i32;
        (pid, process_start_time(pid).unwrap())
    }

    #[test]
    fn charges_stop_exactly_at_the_cap_and_frees_are_credited() {
        let dir = tempfile::tempdir().unwrap();
        let r = Region::open_or_create(&dir.path().join("r"), 100).unwrap();
        let (pid, start) = me();
        let slot = r.claim(pid, start).unwrap();
        assert!(r.try_charge(slot, 60));
        assert!(r.try_charge(slot, 40));
        assert!(!r.try_charge(slot, 1));
        assert_eq!(r.used(), 100);
        r.credit(slot, 30);
        assert!(r.try_charge(slot, 30));
        assert!(!r.try_charge(slot, 1));
        // Opening again keeps the first cap.
        let again = Region::open_or_create(&dir.path().join("r"), 5).unwrap();
        assert_eq!(again.cap(), 100);
        assert_eq!(again.used(), 100);
    }

    #[test]
    fn a_dead_process_gives_its_bytes_back_when_room_is_short() {
        let dir = tempfile::tempdir().unwrap();
        let r = Region::open_or_create(&dir.path().join("r"), 100).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("0")
            .spawn()
            .unwrap();
        let dead = child.id() as i32;
        let dead_start = process_start_time(dead).unwrap_or(1);
        child.wait().unwrap();
        let s = r.claim(dead, dead_start).unwrap();
        assert!(r.try_charge(s, 90));
        let (pid, start) = me();
        let mine = r.claim(pid, start).unwrap();
        assert_ne!(mine, s);
        assert!(r.try_charge(mine, 50), "the dead process's 90 come back");
        assert_eq!(r.used(), 50);
    }

    #[test]
    fn a_restored_process_keeps_its_slot_or_counts_its_memory_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = Region::open_or_create(&dir.path().join("r"), 100).unwrap();
        let (pid, start) = me();
        // Checkpointed as a process that started earlier; restored as this one.
        let slot = r.claim(pid, start - 1).unwrap();
        assert!(r.try_charge(slot, 40));
        // Same pid, new start time: the slot is stamped anew and keeps its bytes.
        assert!(r.restamp(slot, pid, start));
        assert_eq!(r.reclaim_dead(), 0, "the restamped slot must look alive");
        assert_eq!(r.used(), 40);
        // A slot that is no longer this pid's is not stamped; a recharge counts held memory again
        // in a new slot (here one of our parent, which is alive).
        let parent = std::os::unix::process::parent_id() as i32;
        assert!(!r.restamp(slot, parent, start));
        let again = r
            .claim(parent, process_start_time(parent).unwrap())
            .unwrap();
        r.recharge(again, 70);
        assert_eq!(
            r.used(),
            110,
            "a recharge ignores the cap: the memory is already held"
        );
        assert!(!r.try_charge(slot, 1));
    }

    #[test]
    fn slots_of_another_pid_namespace_wait_for_their_release() {
        let dir = tempfile::tempdir().unwrap();
        let r = Region::open_or_create(&dir.path().join("r"), 100).unwrap();
        // Pid 2 of some confined workload: no such process here, but its own namespace's.
        let s = r.claim(2, 7).unwrap();
        assert!(r.try_charge(s, 60));
        r.layout().slots[s]
            .ns
            .store(4_026_000_001, Ordering::SeqCst);
        assert_eq!(
            r.reclaim_dead(),
            0,
            "another namespace's slot is not judged from here"
        );
        assert_eq!(r.release_namespace(4_026_000_002), 0);
        assert_eq!(r.release_namespace(4_026_000_001), 60);
        assert_eq!(r.used(), 0);
    }

    #[test]
    fn a_file_that_is_not_a_region_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, vec![0u8; size_of::<Layout>()]).unwrap();
        assert!(Region::open(&p).is_err());
    }
}
