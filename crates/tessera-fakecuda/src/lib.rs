//! A simulated CUDA driver (`libcuda.so.1`) for machines without a GPU.
//!
//! It exists only so that Tessera's interception library and agent can be tested end to end where
//! there is no GPU; it is not a product feature. It implements the driver calls Tessera's tests
//! and probe use: init, devices and attributes, primary and created contexts, memory (plain,
//! pitch, managed, async and pools, VMM basics, arrays), copies, PTX modules, kernel launches that
//! take simulated time, streams, events and minimal graphs (stream capture), and
//! `cuFuncGetParamInfo` from the PTX entry's parameter list. One kernel does real work: an entry
//! named `tessera_fill(.u64 ptr, .u32 value, .u64 count)` writes `value` into `count` 32-bit words
//! at `ptr` when launched outside a capture, so that tests can check that a launch's parameters
//! arrived intact.
//!
//! Devices are shared by every process on the machine, like real ones: each simulated device is a
//! file under `TESSERA_FAKECUDA_DIR` (default `/dev/shm/tessera-fakecuda`) that holds its memory
//! accounting and its timeline, so memory runs out for everyone and launches from several
//! processes queue behind each other. Configuration (read by the first process that creates a
//! device): `TESSERA_FAKECUDA_DEVICES` (count, default 1), `TESSERA_FAKECUDA_MEMORY` (bytes per
//! device, default 80 GiB), `TESSERA_FAKECUDA_NS_PER_THREAD` (simulated time per kernel thread,
//! default 3 ns, so 132 × 256 threads take ~100 µs). Device memory is backed by lazily
//! committed host memory, so copies move real bytes. The same library answers a few NVML calls
//! (init, device count and handles, index, memory info) when linked as `libnvidia-ml.so.1`.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tessera_shm::Region;
use tessera_shm::cuda::{
    Array3dDescriptor, ArrayDescriptor, NvmlMemory, NvmlMemoryV2, array_bytes, array3d_bytes,
};

pub type CUresult = c_uint;
pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_IMAGE: CUresult = 200;
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;

/// The driver API version this stand-in reports (12.8).
pub const DRIVER_VERSION: c_int = 12080;
/// A launch never takes less than this (driver and launch overhead), unless
/// `TESSERA_FAKECUDA_MIN_KERNEL_NS` says otherwise (0 makes a launch loop bound by the CPU, to
/// measure what an interposed library adds per call).
const MIN_KERNEL_NS: u64 = 2_000;
/// How far ahead of the device a stream may queue before a launch blocks (a real driver blocks
/// when its push buffer fills; this keeps the simulation's queues short and contention visible).
const MAX_QUEUE_NS: u64 = 5_000_000;
const GIB: u64 = 1 << 30;

/// Device words in each device's shared region.
const WORD_BUSY_UNTIL: usize = 0;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_until(ns: u64) {
    let now = monotonic_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

struct Device {
    region: Region,
    slot: usize,
}

struct Process {
    devices: Vec<Device>,
    ns_per_thread: f64,
    min_kernel_ns: u64,
    /// Device pointer → (device, bytes, mapping length).
    allocations: Mutex<HashMap<u64, (usize, u64)>>,
    /// VMM handles → (device, bytes).
    handles: Mutex<HashMap<u64, (usize, u64)>>,
    next_handle: AtomicU64,
    /// The latest end of any work this process queued (cuCtxSynchronize waits for it).
    last_end: AtomicU64,
    default_stream: Stream,
    name: String,
}

static PROCESS: OnceLock<Result<Process, CUresult>> = OnceLock::new();

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn init_process() -> Result<Process, CUresult> {
    let dir = std::env::var_os("TESSERA_FAKECUDA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm/tessera-fakecuda"));
    std::fs::create_dir_all(&dir).map_err(|_| CUDA_ERROR_NOT_INITIALIZED)?;
    let count = env_u64("TESSERA_FAKECUDA_DEVICES", 1).clamp(1, 64) as usize;
    let memory = env_u64("TESSERA_FAKECUDA_MEMORY", 80 * GIB);
    let ns_per_thread = std::env::var("TESSERA_FAKECUDA_NS_PER_THREAD")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v >= 0.0)
        .unwrap_or(3.0);
    // Like the real driver, CUDA_VISIBLE_DEVICES picks and orders the devices a process sees.
    let visible: Vec<usize> = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map_while(|d| d.trim().parse::<usize>().ok())
            .filter(|d| *d < count)
            .collect(),
        Ok(_) => vec![],
        Err(_) => (0..count).collect(),
    };
    let pid = std::process::id() as i32;
    let start = tessera_shm::process_start_time(pid).unwrap_or(0);
    let mut devices = Vec::new();
    for physical in visible {
        let region = Region::open_or_create(&dir.join(format!("device{physical}")), memory)
            .map_err(|_| CUDA_ERROR_NOT_INITIALIZED)?;
        let slot = region.claim(pid, start).ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
        devices.push(Device { region, slot });
    }
    Ok(Process {
        devices,
        ns_per_thread,
        min_kernel_ns: env_u64("TESSERA_FAKECUDA_MIN_KERNEL_NS", MIN_KERNEL_NS),
        allocations: Mutex::new(HashMap::new()),
        handles: Mutex::new(HashMap::new()),
        next_handle: AtomicU64::new(1),
        last_end: AtomicU64::new(0),
        default_stream: Stream::default(),
        name: std::env::var("TESSERA_FAKECUDA_NAME")
            .unwrap_or_else(|_| "Tessera Simulated H100 80GB".into()),
    })
}

fn process() -> Result<&'static Process, CUresult> {
    match PROCESS.get() {
        Some(Ok(p)) => Ok(p),
        Some(Err(e)) => Err(*e),
        None => Err(CUDA_ERROR_NOT_INITIALIZED),
    }
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

// ---- contexts --------------------------------------------------------------------------------

/// A context: the device it belongs to.
struct Context {
    device: usize,
}

thread_local! {
    static CURRENT: std::cell::Cell<*mut Context> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

static PRIMARY: OnceLock<Vec<usize>> = OnceLock::new();

fn primary(device: usize) -> *mut Context {
    let table = PRIMARY.get_or_init(|| {
        (0..64)
            .map(|d| Box::into_raw(Box::new(Context { device: d })) as usize)
            .collect()
    });
    table[device] as *mut Context
}

fn current_device() -> Result<usize, CUresult> {
    let ctx = CURRENT.with(|c| c.get());
    if ctx.is_null() {
        return Err(CUDA_ERROR_INVALID_CONTEXT);
    }
    // SAFETY: contexts are leaked boxes that live for the process.
    Ok(unsafe { (*ctx).device })
}

fn device(p: &Process, dev: c_int) -> Result<&Device, CUresult> {
    usize::try_from(dev)
        .ok()
        .and_then(|d| p.devices.get(d))
        .ok_or(CUDA_ERROR_INVALID_DEVICE)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match PROCESS.get_or_init(init_process) {
        Ok(p) if p.devices.is_empty() => CUDA_ERROR_NO_DEVICE,
        Ok(_) => CUDA_SUCCESS,
        Err(e) => *e,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    if version.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: checked non-null; the caller passes a writable int.
    unsafe { *version = DRIVER_VERSION };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    let p = tri!(process());
    // SAFETY: the caller passes a writable int.
    unsafe { *count = p.devices.len() as c_int };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut c_int, ordinal: c_int) -> CUresult {
    let p = tri!(process());
    tri!(device(p, ordinal));
    // SAFETY: the caller passes a writable int.
    unsafe { *dev = ordinal };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    if name.is_null() || len <= 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let bytes = p.name.as_bytes();
    let n = bytes.len().min(len as usize - 1);
    // SAFETY: the caller's buffer holds `len` bytes; we write n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), name as *mut u8, n);
        *name.add(n) = 0;
    }
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: c_int) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    let mut id = *b"tessera-fake-gpu";
    id[15] = dev as u8;
    // SAFETY: the caller passes a 16-byte CUuuid.
    unsafe { *uuid = id };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: c_int) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuDeviceGetUuid(uuid, dev) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attrib: c_int,
    dev: c_int,
) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    let v = match attrib {
        1 => 1024,              // max threads per block
        2 | 3 => 1024,          // max block dim x, y
        4 => 64,                // max block dim z
        5 => i32::MAX,          // max grid dim x
        6 | 7 => 65535,         // max grid dim y, z
        8 => 48 * 1024,         // shared memory per block
        10 => 32,               // warp size
        16 => 132,              // multiprocessors
        75 => 9,                // compute capability major
        76 => 0,                // compute capability minor
        13 => 1_980_000,        // clock rate, kHz
        36 => 2_619_000,        // memory clock rate, kHz
        37 => 5120,             // memory bus width
        39 => 2048,             // max threads per multiprocessor
        41 | 83 | 88 | 89 => 1, // unified addressing, managed memory, pageable access, concurrent managed
        102 | 115 => 1,         // virtual memory management, memory pools
        _ => 0,
    };
    // SAFETY: the caller passes a writable int.
    unsafe { *value = v };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    let p = tri!(process());
    let d = tri!(device(p, dev));
    // SAFETY: the caller passes a writable size_t.
    unsafe { *bytes = d.region.cap() as usize };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: c_int) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    // SAFETY: the caller passes a writable CUcontext.
    unsafe { *ctx = primary(dev as usize) as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: c_int) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(dev: c_int) -> CUresult {
    cuDevicePrimaryCtxRelease_v2(dev)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: c_int,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    // SAFETY: the caller passes writable outputs.
    unsafe {
        *flags = 0;
        *active = 1;
    }
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut *mut c_void,
    _flags: c_uint,
    dev: c_int,
) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    let c = Box::into_raw(Box::new(Context {
        device: dev as usize,
    }));
    CURRENT.with(|cur| cur.set(c));
    // SAFETY: the caller passes a writable CUcontext.
    unsafe { *ctx = c as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxDestroy_v2(ctx: *mut c_void) -> CUresult {
    if ctx.is_null() {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    CURRENT.with(|cur| {
        if cur.get() == ctx as *mut Context {
            cur.set(std::ptr::null_mut());
        }
    });
    // Contexts are small and may still be referenced by other threads; they are not freed.
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> CUresult {
    CURRENT.with(|cur| cur.set(ctx as *mut Context));
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut *mut c_void) -> CUresult {
    // SAFETY: the caller passes a writable CUcontext.
    unsafe { *ctx = CURRENT.with(|c| c.get()) as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxPushCurrent_v2(ctx: *mut c_void) -> CUresult {
    cuCtxSetCurrent(ctx)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(ctx: *mut *mut c_void) -> CUresult {
    if !ctx.is_null() {
        // SAFETY: non-null; the caller passes a writable CUcontext.
        unsafe { *ctx = CURRENT.with(|c| c.get()) as *mut c_void };
    }
    CURRENT.with(|c| c.set(std::ptr::null_mut()));
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    let d = tri!(current_device());
    // SAFETY: the caller passes a writable int.
    unsafe { *dev = d as c_int };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    let p = tri!(process());
    sleep_until(p.last_end.load(Ordering::SeqCst));
    CUDA_SUCCESS
}

// ---- memory ----------------------------------------------------------------------------------

/// Reserves host address space for a device allocation; pages are committed only when touched.
fn map_bytes(bytes: u64, prot: c_int) -> Option<u64> {
    let len = bytes.max(1) as usize;
    // SAFETY: an anonymous private mapping; no existing memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (ptr != libc::MAP_FAILED).then_some(ptr as u64)
}

fn unmap_bytes(ptr: u64, bytes: u64) {
    // SAFETY: ptr/len come from map_bytes of the same allocation.
    unsafe { libc::munmap(ptr as *mut c_void, bytes.max(1) as usize) };
}

fn alloc_on(dev: usize, bytes: u64) -> Result<u64, CUresult> {
    let p = process()?;
    if bytes == 0 {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    let d = p.devices.get(dev).ok_or(CUDA_ERROR_INVALID_DEVICE)?;
    if !d.region.try_charge(d.slot, bytes) {
        return Err(CUDA_ERROR_OUT_OF_MEMORY);
    }
    let Some(ptr) = map_bytes(bytes, libc::PROT_READ | libc::PROT_WRITE) else {
        d.region.credit(d.slot, bytes);
        return Err(CUDA_ERROR_OUT_OF_MEMORY);
    };
    p.allocations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(ptr, (dev, bytes));
    Ok(ptr)
}

fn free_ptr(ptr: u64) -> CUresult {
    let p = tri!(process());
    let Some((dev, bytes)) = p
        .allocations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&ptr)
    else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    unmap_bytes(ptr, bytes);
    let d = &p.devices[dev];
    d.region.credit(d.slot, bytes);
    CUDA_SUCCESS
}

unsafe fn alloc_out(out: *mut u64, bytes: u64) -> CUresult {
    if out.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let dev = tri!(current_device());
    let ptr = tri!(alloc_on(dev, bytes));
    // SAFETY: checked non-null; the caller passes a writable CUdeviceptr.
    unsafe { *out = ptr };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { alloc_out(dptr, bytes as u64) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut u64,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { alloc_out(dptr, bytes as u64) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    _element: c_uint,
) -> CUresult {
    let row = width.div_ceil(512) * 512;
    // SAFETY: forwarded contract; pitch is a writable size_t.
    unsafe {
        let r = alloc_out(dptr, (row * height) as u64);
        if r == CUDA_SUCCESS {
            *pitch = row;
        }
        r
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut u64,
    bytes: usize,
    _stream: *mut c_void,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { alloc_out(dptr, bytes as u64) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut u64,
    bytes: usize,
    _pool: *mut c_void,
    _stream: *mut c_void,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { alloc_out(dptr, bytes as u64) }
}

/// The device's default memory pool (one per device; allocations from it are ordinary ones).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut *mut c_void, dev: c_int) -> CUresult {
    let p = tri!(process());
    tri!(device(p, dev));
    if pool.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: checked non-null; the handle is an opaque nonzero token.
    unsafe { *pool = (0x1000 + dev as usize) as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFree_v2(dptr: u64) -> CUresult {
    free_ptr(dptr)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeAsync(dptr: u64, _stream: *mut c_void) -> CUresult {
    free_ptr(dptr)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let p = tri!(process());
    let dev = tri!(current_device());
    let d = &p.devices[dev];
    let cap = d.region.cap();
    // Like a real device, memory of processes that have ended is free again.
    d.region.reclaim_dead();
    // SAFETY: the caller passes writable size_ts.
    unsafe {
        *total = cap as usize;
        *free = cap.saturating_sub(d.region.used()) as usize;
    }
    CUDA_SUCCESS
}

unsafe fn array_out(out: *mut *mut c_void, bytes: u64) -> CUresult {
    let dev = tri!(current_device());
    let ptr = tri!(alloc_on(dev, bytes));
    // SAFETY: the caller passes a writable handle; arrays are identified by their backing.
    unsafe { *out = ptr as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(
    arr: *mut *mut c_void,
    desc: *const ArrayDescriptor,
) -> CUresult {
    if desc.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid descriptor and a writable handle.
    unsafe { array_out(arr, array_bytes(&*desc)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    arr: *mut *mut c_void,
    desc: *const Array3dDescriptor,
) -> CUresult {
    if desc.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid descriptor and a writable handle.
    unsafe { array_out(arr, array3d_bytes(&*desc, 1)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    arr: *mut *mut c_void,
    desc: *const Array3dDescriptor,
    levels: c_uint,
) -> CUresult {
    if desc.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid descriptor and a writable handle.
    unsafe { array_out(arr, array3d_bytes(&*desc, levels)) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuArrayDestroy(arr: *mut c_void) -> CUresult {
    free_ptr(arr as u64)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMipmappedArrayDestroy(arr: *mut c_void) -> CUresult {
    free_ptr(arr as u64)
}

/// VMM: physical memory is charged at creation; addresses are reserved and mapped separately.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    bytes: usize,
    _prop: *const c_void,
    _flags: u64,
) -> CUresult {
    let p = tri!(process());
    let dev = tri!(current_device());
    let d = &p.devices[dev];
    if bytes == 0 || handle.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !d.region.try_charge(d.slot, bytes as u64) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let h = p.next_handle.fetch_add(1, Ordering::SeqCst);
    p.handles
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(h, (dev, bytes as u64));
    // SAFETY: checked non-null.
    unsafe { *handle = h };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemRelease(handle: u64) -> CUresult {
    let p = tri!(process());
    let Some((dev, bytes)) = p
        .handles
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&handle)
    else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    let d = &p.devices[dev];
    d.region.credit(d.slot, bytes);
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    _prop: *const c_void,
    _option: c_uint,
) -> CUresult {
    // SAFETY: the caller passes a writable size_t.
    unsafe { *granularity = 2 << 20 };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut u64,
    bytes: usize,
    _alignment: usize,
    _addr: u64,
    _flags: u64,
) -> CUresult {
    let Some(p) = map_bytes(bytes as u64, libc::PROT_NONE) else {
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    // SAFETY: the caller passes a writable CUdeviceptr.
    unsafe { *ptr = p };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemAddressFree(ptr: u64, bytes: usize) -> CUresult {
    unmap_bytes(ptr, bytes as u64);
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemMap(
    ptr: u64,
    bytes: usize,
    _offset: usize,
    _handle: u64,
    _flags: u64,
) -> CUresult {
    // SAFETY: the range was reserved by cuMemAddressReserve.
    let r = unsafe {
        libc::mprotect(
            ptr as *mut c_void,
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if r == 0 {
        CUDA_SUCCESS
    } else {
        CUDA_ERROR_INVALID_VALUE
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemUnmap(ptr: u64, bytes: usize) -> CUresult {
    // SAFETY: the range was reserved by cuMemAddressReserve.
    let r = unsafe { libc::mprotect(ptr as *mut c_void, bytes, libc::PROT_NONE) };
    if r == 0 {
        CUDA_SUCCESS
    } else {
        CUDA_ERROR_INVALID_VALUE
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemSetAccess(
    _ptr: u64,
    _bytes: usize,
    _desc: *const c_void,
    _count: usize,
) -> CUresult {
    CUDA_SUCCESS
}

fn copy(dst: u64, src: u64, bytes: usize) -> CUresult {
    if bytes == 0 {
        return CUDA_SUCCESS;
    }
    if dst == 0 || src == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: both ranges are the caller's (host memory, or device memory backed by host pages).
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, bytes: usize) -> CUresult {
    copy(dst, src as u64, bytes)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, bytes: usize) -> CUresult {
    copy(dst as u64, src, bytes)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoD_v2(dst: u64, src: u64, bytes: usize) -> CUresult {
    copy(dst, src, bytes)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: u64,
    src: *const c_void,
    bytes: usize,
    _s: *mut c_void,
) -> CUresult {
    copy(dst, src as u64, bytes)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: u64,
    bytes: usize,
    _s: *mut c_void,
) -> CUresult {
    copy(dst as u64, src, bytes)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD8_v2(dst: u64, value: u8, count: usize) -> CUresult {
    if dst == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the range is the caller's device memory, backed by host pages.
    unsafe { std::ptr::write_bytes(dst as *mut u8, value, count) };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD32_v2(dst: u64, value: c_uint, count: usize) -> CUresult {
    if dst == 0 || dst % 4 != 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the range is the caller's device memory, backed by host pages.
    unsafe { std::slice::from_raw_parts_mut(dst as *mut u32, count) }.fill(value);
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD8Async(dst: u64, value: u8, count: usize, _s: *mut c_void) -> CUresult {
    cuMemsetD8_v2(dst, value, count)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD32Async(
    dst: u64,
    value: c_uint,
    count: usize,
    _s: *mut c_void,
) -> CUresult {
    cuMemsetD32_v2(dst, value, count)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: u64,
    src: u64,
    bytes: usize,
    _s: *mut c_void,
) -> CUresult {
    copy(dst, src, bytes)
}

/// Pinned host memory: ordinary pages here (nothing to pin them for).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytes: usize) -> CUresult {
    if pp.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some(p) = map_bytes(bytes.max(1) as u64, libc::PROT_READ | libc::PROT_WRITE) else {
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    // SAFETY: checked non-null.
    unsafe { *pp = p as *mut c_void };
    CUDA_SUCCESS
}

/// A 2D copy, row by row (every address here is host memory).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpy2D_v2(p: *const tessera_shm::cuda::Memcpy2d) -> CUresult {
    if p.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid CUDA_MEMCPY2D.
    let Some(rows) = (unsafe { *p }).rows() else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    // SAFETY: as above.
    let width = unsafe { (*p).width_in_bytes };
    for (dst, _, src, _) in rows {
        let r = copy(dst, src, width);
        if r != CUDA_SUCCESS {
            return r;
        }
    }
    CUDA_SUCCESS
}

// ---- modules, streams, launches, events, graphs -----------------------------------------------

struct Module {
    /// Each entry's name and its parameters' (offset, size), in order.
    entries: Vec<(String, Vec<(usize, usize)>)>,
}

struct Function {
    name: String,
    params: Vec<(usize, usize)>,
}

/// The (offset, size) of each parameter in a PTX entry's parameter list (`.param .u64 x, ...`),
/// each aligned to its size, as the driver lays out a kernel's parameter buffer.
fn ptx_params(signature: &str) -> Vec<(usize, usize)> {
    let Some(list) = signature
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(list, _)| list)
    else {
        return Vec::new();
    };
    let mut offset: usize = 0;
    list.split(',')
        .filter_map(|p| {
            let size = p.split_whitespace().find_map(|w| match w {
                ".u8" | ".s8" | ".b8" => Some(1),
                ".u16" | ".s16" | ".b16" | ".f16" => Some(2),
                ".u32" | ".s32" | ".b32" | ".f32" => Some(4),
                ".u64" | ".s64" | ".b64" | ".f64" => Some(8),
                _ => None,
            })?;
            offset = offset.div_ceil(size) * size;
            let at = offset;
            offset += size;
            Some((at, size))
        })
        .collect()
}

#[derive(Default)]
struct Stream {
    /// When the last work queued on this stream ends (monotonic ns).
    tail: AtomicU64,
    /// Kernel durations recorded while capturing into a graph.
    capture: Mutex<Option<Vec<u64>>>,
}

struct Graph {
    kernels: Vec<u64>,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(
    module: *mut *mut c_void,
    image: *const c_void,
) -> CUresult {
    if image.is_null() || module.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: PTX images are NUL-terminated text.
    let text = unsafe { CStr::from_ptr(image as *const c_char) }.to_string_lossy();
    if !text.contains(".version") || !text.contains(".target") {
        return CUDA_ERROR_INVALID_IMAGE;
    }
    let entries: Vec<(String, Vec<(usize, usize)>)> = text
        .split(".entry")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                .collect();
            let signature = rest.split('{').next().unwrap_or("");
            (!name.is_empty()).then(|| (name, ptx_params(signature)))
        })
        .collect();
    let m = Box::into_raw(Box::new(Module { entries }));
    // SAFETY: checked non-null.
    unsafe { *module = m as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut *mut c_void,
    image: *const c_void,
    _n: c_uint,
    _options: *mut c_void,
    _values: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuModuleLoadData(module, image) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> CUresult {
    if module.is_null() || name.is_null() || function.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: modules are our leaked boxes; name is NUL-terminated.
    let (m, name) = unsafe { (&*(module as *const Module), CStr::from_ptr(name)) };
    let name = name.to_string_lossy();
    let Some((_, params)) = m.entries.iter().find(|(e, _)| *e == name) else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let f = Box::into_raw(Box::new(Function {
        name: name.into_owned(),
        params: params.clone(),
    }));
    // SAFETY: checked non-null.
    unsafe { *function = f as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuModuleUnload(_module: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

/// `cuFuncGetParamInfo` (CUDA 12.4): where parameter `index` of `f` sits in its parameter buffer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuFuncGetParamInfo(
    f: *mut c_void,
    index: usize,
    offset: *mut usize,
    size: *mut usize,
) -> CUresult {
    if f.is_null() || offset.is_null() || size.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: functions are our leaked boxes.
    let f = unsafe { &*(f as *const Function) };
    let Some(&(at, len)) = f.params.get(index) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    // SAFETY: checked non-null.
    unsafe {
        *offset = at;
        *size = len;
    }
    CUDA_SUCCESS
}

/// Runs `tessera_fill`'s work: `value` into `count` 32-bit words at `ptr` (its three parameters).
fn fill(f: &Function, params: *mut *mut c_void) -> CUresult {
    if params.is_null() || f.params.len() != 3 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: kernelParams holds one pointer per parameter, each to a value of the declared size.
    let (ptr, value, count) = unsafe {
        (
            *(*params as *const u64),
            *(*params.add(1) as *const u32),
            *(*params.add(2) as *const u64),
        )
    };
    if ptr == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the range is device memory the program allocated, backed by host pages.
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut u32, count as usize) }.fill(value);
    CUDA_SUCCESS
}

/// The stream behind a handle: null and the legacy/per-thread default handles (1, 2) are the
/// process's default stream.
fn stream(p: &Process, handle: *mut c_void) -> &Stream {
    if (handle as usize) <= 2 {
        &p.default_stream
    } else {
        // SAFETY: streams are our leaked boxes.
        unsafe { &*(handle as *const Stream) }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(s: *mut *mut c_void, _flags: c_uint) -> CUresult {
    tri!(process());
    // SAFETY: the caller passes a writable CUstream.
    unsafe { *s = Box::into_raw(Box::new(Stream::default())) as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut *mut c_void,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuStreamCreate(s, flags) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamDestroy_v2(_s: *mut c_void) -> CUresult {
    // Work queued on it still completes; the small stream record is kept.
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(s: *mut c_void) -> CUresult {
    let p = tri!(process());
    sleep_until(stream(p, s).tail.load(Ordering::SeqCst));
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamQuery(s: *mut c_void) -> CUresult {
    let p = tri!(process());
    if stream(p, s).tail.load(Ordering::SeqCst) <= monotonic_ns() {
        CUDA_SUCCESS
    } else {
        CUDA_ERROR_NOT_READY
    }
}

/// Queues `ns` of work on `s` of the current device: the device runs one piece of work at a
/// time, for every process on the machine, in the order it was queued.
fn enqueue(s: *mut c_void, ns: u64) -> CUresult {
    let p = tri!(process());
    let dev = tri!(current_device());
    let st = stream(p, s);
    if let Some(graph) = st
        .capture
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
    {
        graph.push(ns);
        return CUDA_SUCCESS;
    }
    let busy = p.devices[dev].region.word(WORD_BUSY_UNTIL);
    let end = loop {
        let now = monotonic_ns();
        let current = busy.load(Ordering::SeqCst);
        let start = now.max(current).max(st.tail.load(Ordering::SeqCst));
        let end = start + ns;
        if busy
            .compare_exchange(current, end, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            break end;
        }
    };
    st.tail.fetch_max(end, Ordering::SeqCst);
    p.last_end.fetch_max(end, Ordering::SeqCst);
    // A full queue blocks the launching thread, as a real driver's does.
    sleep_until(end.saturating_sub(MAX_QUEUE_NS));
    CUDA_SUCCESS
}

fn kernel_ns(p: &Process, grid: [c_uint; 3], block: [c_uint; 3]) -> u64 {
    let threads: u64 = grid
        .iter()
        .chain(block.iter())
        .map(|d| u64::from((*d).max(1)))
        .product();
    ((threads as f64 * p.ns_per_thread) as u64).max(p.min_kernel_ns)
}

fn launch(
    f: *mut c_void,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    s: *mut c_void,
    params: *mut *mut c_void,
) -> CUresult {
    let p = tri!(process());
    if f.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: functions are our leaked boxes.
    let function = unsafe { &*(f as *const Function) };
    let capturing = stream(p, s)
        .capture
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some();
    if function.name == "tessera_fill" && !capturing {
        tri!(match fill(function, params) {
            CUDA_SUCCESS => Ok(()),
            e => Err(e),
        });
    }
    enqueue(s, kernel_ns(p, grid, block))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    _shared: c_uint,
    s: *mut c_void,
    params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    launch(f, [gx, gy, gz], [bx, by, bz], s, params)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchCooperativeKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    _shared: c_uint,
    s: *mut c_void,
    params: *mut *mut c_void,
) -> CUresult {
    launch(f, [gx, gy, gz], [bx, by, bz], s, params)
}

pub use tessera_shm::cuda::LaunchConfig;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const LaunchConfig,
    f: *mut c_void,
    params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    if config.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid CUlaunchConfig.
    let c = unsafe { &*config };
    launch(f, c.grid, c.block, c.stream, params)
}

struct Event {
    at: AtomicU64,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(e: *mut *mut c_void, _flags: c_uint) -> CUresult {
    // SAFETY: the caller passes a writable CUevent.
    unsafe {
        *e = Box::into_raw(Box::new(Event {
            at: AtomicU64::new(0),
        })) as *mut c_void
    };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventRecord(e: *mut c_void, s: *mut c_void) -> CUresult {
    let p = tri!(process());
    if e.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let at = stream(p, s).tail.load(Ordering::SeqCst).max(monotonic_ns());
    // SAFETY: events are our leaked boxes.
    unsafe { &*(e as *const Event) }
        .at
        .store(at, Ordering::SeqCst);
    CUDA_SUCCESS
}

fn event_at(e: *mut c_void) -> Result<u64, CUresult> {
    if e.is_null() {
        return Err(CUDA_ERROR_INVALID_HANDLE);
    }
    // SAFETY: events are our leaked boxes.
    Ok(unsafe { &*(e as *const Event) }.at.load(Ordering::SeqCst))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventQuery(e: *mut c_void) -> CUresult {
    if tri!(event_at(e)) <= monotonic_ns() {
        CUDA_SUCCESS
    } else {
        CUDA_ERROR_NOT_READY
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(e: *mut c_void) -> CUresult {
    sleep_until(tri!(event_at(e)));
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: *mut c_void,
    end: *mut c_void,
) -> CUresult {
    let (a, b) = (tri!(event_at(start)), tri!(event_at(end)));
    if a > monotonic_ns() || b > monotonic_ns() {
        return CUDA_ERROR_NOT_READY;
    }
    // SAFETY: the caller passes a writable float.
    unsafe { *ms = (b as f64 - a as f64) as f32 / 1e6 };
    CUDA_SUCCESS
}

/// Work queued on `s` after this starts no earlier than the event's time.
#[unsafe(no_mangle)]
pub extern "C" fn cuStreamWaitEvent(s: *mut c_void, e: *mut c_void, _flags: c_uint) -> CUresult {
    let p = tri!(process());
    let at = tri!(event_at(e));
    stream(p, s).tail.fetch_max(at, Ordering::SeqCst);
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventDestroy_v2(_e: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamBeginCapture_v2(s: *mut c_void, _mode: c_uint) -> CUresult {
    let p = tri!(process());
    *stream(p, s)
        .capture
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture(s: *mut c_void, graph: *mut *mut c_void) -> CUresult {
    let p = tri!(process());
    let Some(kernels) = stream(p, s)
        .capture
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    // SAFETY: the caller passes a writable CUgraph.
    unsafe { *graph = Box::into_raw(Box::new(Graph { kernels })) as *mut c_void };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    _flags: u64,
) -> CUresult {
    if graph.is_null() || exec.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: graphs are our leaked boxes; an executable graph is a copy of its kernels.
    unsafe {
        let g = &*(graph as *const Graph);
        *exec = Box::into_raw(Box::new(Graph {
            kernels: g.kernels.clone(),
        })) as *mut c_void;
    }
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiate_v2(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    _error_node: *mut *mut c_void,
    _log: *mut c_char,
    _log_size: usize,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuGraphInstantiateWithFlags(exec, graph, 0) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphLaunch(exec: *mut c_void, s: *mut c_void) -> CUresult {
    if exec.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // SAFETY: executable graphs are our leaked boxes.
    let g = unsafe { &*(exec as *const Graph) };
    // A graph's kernels run back to back with one launch's overhead.
    let p = tri!(process());
    enqueue(s, g.kernels.iter().sum::<u64>().max(p.min_kernel_ns))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphDestroy(_g: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphExecDestroy(_g: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

/// `$alias` does what `$target` does: the per-thread default stream is the process's default
/// stream in this simulation.
macro_rules! alias {
    ($alias:ident = $target:ident($($arg:ident: $ty:ty),*)) => {
        #[unsafe(no_mangle)]
        #[allow(unused_unsafe)]
        pub unsafe extern "C" fn $alias($($arg: $ty),*) -> CUresult {
            // SAFETY: the same contract as the function it stands for.
            unsafe { $target($($arg),*) }
        }
    };
}

alias!(cuMemAllocAsync_ptsz = cuMemAllocAsync(dptr: *mut u64, bytes: usize, stream: *mut c_void));
alias!(cuMemAllocFromPoolAsync_ptsz = cuMemAllocFromPoolAsync(dptr: *mut u64, bytes: usize, pool: *mut c_void, stream: *mut c_void));
alias!(cuMemFreeAsync_ptsz = cuMemFreeAsync(dptr: u64, stream: *mut c_void));
alias!(cuStreamSynchronize_ptsz = cuStreamSynchronize(s: *mut c_void));
alias!(cuLaunchKernel_ptsz = cuLaunchKernel(f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shared: c_uint, s: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void));
alias!(cuLaunchCooperativeKernel_ptsz = cuLaunchCooperativeKernel(f: *mut c_void, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shared: c_uint, s: *mut c_void, params: *mut *mut c_void));
alias!(cuLaunchKernelEx_ptsz = cuLaunchKernelEx(config: *const LaunchConfig, f: *mut c_void, params: *mut *mut c_void, extra: *mut *mut c_void));
alias!(cuEventRecord_ptsz = cuEventRecord(e: *mut c_void, s: *mut c_void));
alias!(cuStreamBeginCapture_v2_ptsz = cuStreamBeginCapture_v2(s: *mut c_void, mode: c_uint));
alias!(cuStreamEndCapture_ptsz = cuStreamEndCapture(s: *mut c_void, graph: *mut *mut c_void));
alias!(cuGraphLaunch_ptsz = cuGraphLaunch(exec: *mut c_void, s: *mut c_void));

// ---- errors and entry points -----------------------------------------------------------------

fn error_text(code: CUresult) -> Option<(&'static CStr, &'static CStr)> {
    Some(match code {
        CUDA_SUCCESS => (c"CUDA_SUCCESS", c"no error"),
        CUDA_ERROR_INVALID_VALUE => (c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
        CUDA_ERROR_OUT_OF_MEMORY => (c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
        CUDA_ERROR_NOT_INITIALIZED => (c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
        CUDA_ERROR_NO_DEVICE => (
            c"CUDA_ERROR_NO_DEVICE",
            c"no CUDA-capable device is detected",
        ),
        CUDA_ERROR_INVALID_DEVICE => (c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
        CUDA_ERROR_INVALID_IMAGE => (
            c"CUDA_ERROR_INVALID_IMAGE",
            c"device kernel image is invalid",
        ),
        CUDA_ERROR_INVALID_CONTEXT => (c"CUDA_ERROR_INVALID_CONTEXT", c"invalid device context"),
        CUDA_ERROR_INVALID_HANDLE => (c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
        CUDA_ERROR_NOT_FOUND => (c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
        CUDA_ERROR_NOT_READY => (c"CUDA_ERROR_NOT_READY", c"device not ready"),
        CUDA_ERROR_NOT_SUPPORTED => (c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
        _ => return None,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, out: *mut *const c_char) -> CUresult {
    let Some((_, text)) = error_text(code) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    // SAFETY: the caller passes a writable pointer; the text is static.
    unsafe { *out = text.as_ptr() };
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, out: *mut *const c_char) -> CUresult {
    let Some((name, _)) = error_text(code) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    // SAFETY: the caller passes a writable pointer; the text is static.
    unsafe { *out = name.as_ptr() };
    CUDA_SUCCESS
}

// ---- NVML (the same library answers as libnvidia-ml.so.1) ---------------------------------------

pub type NvmlReturn = c_uint;
const NVML_SUCCESS: NvmlReturn = 0;
const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;

/// NVML's view: every simulated device of the machine, by physical index (NVML ignores
/// CUDA_VISIBLE_DEVICES), each read from its shared file.
fn nvml_device(handle: *mut c_void) -> Option<(usize, Region)> {
    let index = (handle as usize).checked_sub(1)?;
    let count = env_u64("TESSERA_FAKECUDA_DEVICES", 1) as usize;
    if index >= count {
        return None;
    }
    let dir = std::env::var_os("TESSERA_FAKECUDA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm/tessera-fakecuda"));
    std::fs::create_dir_all(&dir).ok()?;
    let memory = env_u64("TESSERA_FAKECUDA_MEMORY", 80 * GIB);
    let region = Region::open_or_create(&dir.join(format!("device{index}")), memory).ok()?;
    region.reclaim_dead();
    Some((index, region))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    if count.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe { *count = env_u64("TESSERA_FAKECUDA_DEVICES", 1) as c_uint };
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    handle: *mut *mut c_void,
) -> NvmlReturn {
    if handle.is_null() || index as u64 >= env_u64("TESSERA_FAKECUDA_DEVICES", 1) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; handles are index + 1.
    unsafe { *handle = (index as usize + 1) as *mut c_void };
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(handle: *mut c_void, index: *mut c_uint) -> NvmlReturn {
    let Some((i, _)) = nvml_device(handle) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: the caller passes a writable uint.
    unsafe { *index = i as c_uint };
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    handle: *mut c_void,
    memory: *mut NvmlMemory,
) -> NvmlReturn {
    let Some((_, r)) = nvml_device(handle) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: the caller passes a writable nvmlMemory_t.
    unsafe { (*memory).set(r.cap(), r.used()) };
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    handle: *mut c_void,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    let Some((_, r)) = nvml_device(handle) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: the caller passes a writable nvmlMemory_v2_t (its version field set by them).
    unsafe { (*memory).set(r.cap(), r.used()) };
    NVML_SUCCESS
}

macro_rules! exports {
    ($($name:ident),* $(,)?) => {
        /// The address of the exported function `name`.
        pub fn export(name: &str) -> Option<*mut c_void> {
            match name {
                $(stringify!($name) => Some($name as *mut c_void),)*
                _ => None,
            }
        }
    };
}

exports!(
    cuInit,
    cuDriverGetVersion,
    cuDeviceGetCount,
    cuDeviceGet,
    cuDeviceGetName,
    cuDeviceGetUuid,
    cuDeviceGetUuid_v2,
    cuDeviceGetAttribute,
    cuDeviceTotalMem_v2,
    cuDevicePrimaryCtxRetain,
    cuDevicePrimaryCtxRelease_v2,
    cuDevicePrimaryCtxReset_v2,
    cuDevicePrimaryCtxGetState,
    cuCtxCreate_v2,
    cuCtxDestroy_v2,
    cuCtxSetCurrent,
    cuCtxGetCurrent,
    cuCtxPushCurrent_v2,
    cuCtxPopCurrent_v2,
    cuCtxGetDevice,
    cuCtxSynchronize,
    cuMemAlloc_v2,
    cuMemAllocManaged,
    cuMemAllocPitch_v2,
    cuMemAllocAsync,
    cuMemAllocAsync_ptsz,
    cuMemAllocFromPoolAsync,
    cuMemAllocFromPoolAsync_ptsz,
    cuMemFree_v2,
    cuMemFreeAsync,
    cuMemFreeAsync_ptsz,
    cuDeviceGetDefaultMemPool,
    cuMemGetInfo_v2,
    cuArrayCreate_v2,
    cuArray3DCreate_v2,
    cuMipmappedArrayCreate,
    cuArrayDestroy,
    cuMipmappedArrayDestroy,
    cuMemCreate,
    cuMemRelease,
    cuMemGetAllocationGranularity,
    cuMemAddressReserve,
    cuMemAddressFree,
    cuMemMap,
    cuMemUnmap,
    cuMemSetAccess,
    cuMemcpyHtoD_v2,
    cuMemcpyDtoH_v2,
    cuMemcpyDtoD_v2,
    cuMemcpyHtoDAsync_v2,
    cuMemcpyDtoHAsync_v2,
    cuMemsetD8_v2,
    cuMemsetD32_v2,
    cuMemAllocHost_v2,
    cuMemcpy2D_v2,
    cuMemsetD8Async,
    cuMemsetD32Async,
    cuMemcpyDtoDAsync_v2,
    cuStreamWaitEvent,
    cuModuleLoadData,
    cuModuleLoadDataEx,
    cuModuleGetFunction,
    cuModuleUnload,
    cuFuncGetParamInfo,
    cuStreamCreate,
    cuStreamCreateWithPriority,
    cuStreamDestroy_v2,
    cuStreamSynchronize,
    cuStreamSynchronize_ptsz,
    cuStreamQuery,
    cuLaunchKernel,
    cuLaunchKernel_ptsz,
    cuLaunchCooperativeKernel,
    cuLaunchCooperativeKernel_ptsz,
    cuLaunchKernelEx,
    cuLaunchKernelEx_ptsz,
    cuEventCreate,
    cuEventRecord,
    cuEventRecord_ptsz,
    cuEventQuery,
    cuEventSynchronize,
    cuEventElapsedTime,
    cuEventDestroy_v2,
    cuStreamBeginCapture_v2,
    cuStreamBeginCapture_v2_ptsz,
    cuStreamEndCapture,
    cuStreamEndCapture_ptsz,
    cuGraphInstantiateWithFlags,
    cuGraphInstantiate_v2,
    cuGraphLaunch,
    cuGraphLaunch_ptsz,
    cuGraphDestroy,
    cuGraphExecDestroy,
    cuGetErrorString,
    cuGetErrorName,
    cuGetProcAddress,
    cuGetProcAddress_v2,
    nvmlInit_v2,
    nvmlShutdown,
    nvmlDeviceGetCount_v2,
    nvmlDeviceGetHandleByIndex_v2,
    nvmlDeviceGetIndex,
    nvmlDeviceGetMemoryInfo,
    nvmlDeviceGetMemoryInfo_v2,
);

/// `cuGetProcAddress`: the newest variant of `symbol` this driver has for `version`; with the
/// per-thread default stream flag, the `_ptsz` variant where one exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    if symbol.is_null() || pfn.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: symbol is NUL-terminated.
    let name = unsafe { CStr::from_ptr(symbol) }.to_string_lossy();
    let found = tessera_shm::cuda::proc_address(&name, version, flags, export);
    match found {
        Some(f) => {
            // SAFETY: checked non-null.
            unsafe { *pfn = f };
            CUDA_SUCCESS
        }
        None => {
            // SAFETY: checked non-null.
            unsafe { *pfn = std::ptr::null_mut() };
            CUDA_ERROR_NOT_FOUND
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    // SAFETY: forwarded contract.
    let r = unsafe { cuGetProcAddress(symbol, pfn, version, flags) };
    if !status.is_null() {
        // CU_GET_PROC_ADDRESS_SUCCESS = 0, SYMBOL_NOT_FOUND = 1.
        // SAFETY: checked non-null.
        unsafe { *status = if r == CUDA_SUCCESS { 0 } else { 1 } };
    }
    r
}
