//! A process's slice: its configuration, the memory accounting it shares with the other
//! processes of its allocation, and the compute limiter it shares with the slices on its device.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use tessera_shm::{Region, Schedule};

use crate::config::{self, Config};
use crate::limiter::Limiter;

pub type CUresult = u32;
pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;

pub struct Slice {
    pub config: Config,
    region: Region,
    pid: AtomicI32,
    /// The process's start time when it took its slot; another one with the same pid means the
    /// process was restored from a checkpoint.
    start: AtomicU64,
    slot: AtomicUsize,
    /// Device pointers, VMM handles and arrays → bytes charged for them.
    sizes: Mutex<HashMap<u64, u64>>,
    pub limiter: Limiter,
}

static SLICE: OnceLock<Result<Slice, String>> = OnceLock::new();
static REPORTED: AtomicBool = AtomicBool::new(false);

fn key_of(path: &std::path::Path) -> u64 {
    // FNV-1a: a stable, nonzero key per slice region path.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

fn pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

fn init() -> Result<Slice, String> {
    let config = config::parse(|k| std::env::var(k).ok())?;
    let region = Region::open_or_create(&config.slice_path, config.memory_bytes).map_err(|e| {
        format!(
            "the slice's accounting region {} cannot be opened: {e}",
            config.slice_path.display()
        )
    })?;
    let schedule = Schedule::open_or_create(&config.device_path).map_err(|e| {
        format!(
            "the device schedule {} cannot be opened: {e}",
            config.device_path.display()
        )
    })?;
    let limiter = Limiter::new(
        schedule,
        key_of(&config.slice_path),
        config.share_milli,
        config.burst,
        config.period_ns,
    )
    .ok_or("the device schedule is full (64 slices on one device)")?;
    let slice = Slice {
        config,
        region,
        pid: AtomicI32::new(0),
        start: AtomicU64::new(0),
        slot: AtomicUsize::new(0),
        sizes: Mutex::new(HashMap::new()),
        limiter,
    };
    slice.own_slot()?;
    Ok(slice)
}

/// The process's slice, or the error code that refuses CUDA (after one message on stderr).
pub fn slice() -> Result<&'static Slice, CUresult> {
    match SLICE.get_or_init(init) {
        Ok(s) => Ok(s),
        Err(msg) => {
            if !REPORTED.swap(true, Ordering::SeqCst) {
                eprintln!("tessera-vgpu: {msg}. CUDA is refused to this process (fail closed).");
            }
            Err(CUDA_ERROR_NOT_INITIALIZED)
        }
    }
}

/// The slice if it is ready, without initialising it (for the launch path).
pub fn ready() -> Option<&'static Slice> {
    SLICE.get().and_then(|r| r.as_ref().ok())
}

impl Slice {
    /// This process's accounting slot. A forked child claims its own (with its own allowance);
    /// a process restored from a checkpoint (same pid, new start time) stamps its slot anew, or,
    /// when another process gave the slot back meanwhile, counts what it holds in a new one.
    /// Called on allocations and frees, never on launches.
    fn own_slot(&self) -> Result<usize, String> {
        let me = pid();
        let start = tessera_shm::process_start_time(me).unwrap_or(0);
        if self.pid.load(Ordering::SeqCst) == me {
            let slot = self.slot.load(Ordering::SeqCst);
            if self.start.load(Ordering::SeqCst) == start {
                return Ok(slot);
            }
            self.start.store(start, Ordering::SeqCst);
            if self.region.restamp(slot, me, start) {
                return Ok(slot);
            }
            let held: u64 = self
                .sizes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .sum::<u64>()
                + self.config.context_bytes;
            let slot = self
                .region
                .claim(me, start)
                .ok_or("the slice's accounting region is full (512 processes)")?;
            self.region.recharge(slot, held);
            self.slot.store(slot, Ordering::SeqCst);
            return Ok(slot);
        }
        let slot = self
            .region
            .claim(me, start)
            .ok_or("the slice's accounting region is full (512 processes)")?;
        if self.config.context_bytes > 0 && !self.region.try_charge(slot, self.config.context_bytes)
        {
            return Err(format!(
                "no room in the slice for this process's context allowance of {} bytes",
                self.config.context_bytes
            ));
        }
        self.slot.store(slot, Ordering::SeqCst);
        self.start.store(start, Ordering::SeqCst);
        self.pid.store(me, Ordering::SeqCst);
        self.sizes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(slot)
    }

    /// The cap, as the region holds it (the agent's value wins over the environment's).
    pub fn cap(&self) -> u64 {
        self.region.cap()
    }

    /// Bytes held by the slice's processes; processes that ended give theirs back first.
    pub fn used(&self) -> u64 {
        self.region.reclaim_dead();
        self.region.used()
    }

    /// Reserves `bytes`; `Err(CUDA_ERROR_OUT_OF_MEMORY)` past the cap.
    pub fn charge(&self, bytes: u64) -> Result<(), CUresult> {
        let slot = self.own_slot().map_err(|_| CUDA_ERROR_OUT_OF_MEMORY)?;
        if self.region.try_charge(slot, bytes) {
            Ok(())
        } else {
            Err(CUDA_ERROR_OUT_OF_MEMORY)
        }
    }

    pub fn credit(&self, bytes: u64) {
        if let Ok(slot) = self.own_slot() {
            self.region.credit(slot, bytes);
        }
    }

    pub fn remember(&self, id: u64, bytes: u64) {
        self.sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, bytes);
    }

    /// Credits what `id` was charged, if it is ours.
    pub fn forget(&self, id: u64) {
        let bytes = self
            .sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(b) = bytes {
            self.credit(b);
        }
    }
}
