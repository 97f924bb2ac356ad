//! Tessera's CUDA interception library: makes a GPU slice real for programs that are not changed.
//!
//! The agent preloads it (`LD_PRELOAD`) into workloads on fractional slices. It sits on every path
//! from a program to the driver: it exports the driver's `cu*` symbols it hooks (for programs
//! linked against libcuda), overrides `dlsym` (for programs and runtimes that `dlopen` libcuda),
//! and rewrites the answers of `cuGetProcAddress` / `_v2` (how the CUDA runtime and PyTorch fetch
//! driver entry points), matching the real function that the driver returned, so versioned
//! (`_v2`, `_v3`) and per-thread-default-stream (`_ptsz`) variants are all caught. Everything it
//! does not hook passes through untouched.
//!
//! - Memory: every device allocation path is charged against the slice's cap before it reaches
//!   the driver; past the cap the program gets exactly `CUDA_ERROR_OUT_OF_MEMORY`. The cap is
//!   shared by all processes of the allocation (see `tessera-shm`), and `cuMemGetInfo`,
//!   `cuDeviceTotalMem` and NVML's memory info report the slice.
//! - Compute: launches (kernels, cooperative, `Ex`, graphs) pass a time-slice limiter
//!   ([`limiter`]).
//! - Configuration comes from the agent's `TESSERA_*` variables ([`config`]), read on the first
//!   CUDA call; a bad value refuses CUDA with a message on stderr (fail closed).

#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

pub mod config;
pub mod limiter;
#[macro_use]
pub mod real;
pub mod slice;

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use slice::{CUDA_ERROR_NOT_FOUND, CUDA_SUCCESS, CUresult, Slice, ready, slice};
use tessera_shm::cuda::{self, Array3dDescriptor, ArrayDescriptor, NvmlMemory, NvmlMemoryV2};

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

type Ptr = *mut c_void;

// ---- memory ----------------------------------------------------------------------------------

/// Charges `bytes`, runs the real allocation, records what it returned under `id()`, and gives
/// the charge back when the driver refused.
fn charged(
    s: &Slice,
    bytes: u64,
    call: impl FnOnce() -> CUresult,
    id: impl FnOnce() -> u64,
) -> CUresult {
    tri!(s.charge(bytes));
    let r = call();
    if r == CUDA_SUCCESS {
        s.remember(id(), bytes);
    } else {
        s.credit(bytes);
    }
    r
}

/// Runs a free and credits what `id` was charged when it succeeded.
fn freed(id: u64, call: impl FnOnce() -> CUresult) -> CUresult {
    let r = call();
    if r == CUDA_SUCCESS
        && let Ok(s) = slice()
    {
        s.forget(id);
    }
    r
}

/// The real driver function of the hook's own name.
macro_rules! real_of {
    ($name:ident($($ty:ty),*)) => {
        tri!(real!(cuda, $name as unsafe extern "C" fn($($ty),*) -> CUresult).ok_or(CUDA_ERROR_NOT_FOUND))
    };
}

/// A hook that charges `$bytes` before the real allocation and remembers the charge under the
/// handle `$id` names (read after success).
macro_rules! alloc_hook {
    ($name:ident($($arg:ident: $ty:ty),*) charge $bytes:expr, id $id:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            let s = tri!(slice());
            let real = real_of!($name($($ty),*));
            // SAFETY: the caller's arguments go to the real function unchanged; its output is
            // valid after success.
            charged(s, $bytes, || unsafe { real($($arg),*) }, || unsafe { $id })
        }
    };
}

/// A hook that credits the charge of the handle `$id` after the real free succeeded.
macro_rules! free_hook {
    ($name:ident($($arg:ident: $ty:ty),*) id $id:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            let real = real_of!($name($($ty),*));
            // SAFETY: the caller's arguments go to the real function unchanged.
            freed($id, || unsafe { real($($arg),*) })
        }
    };
}

alloc_hook!(cuMemAlloc_v2(dptr: *mut u64, bytes: usize) charge bytes as u64, id *dptr);
alloc_hook!(cuMemAllocManaged(dptr: *mut u64, bytes: usize, flags: c_uint) charge bytes as u64, id *dptr);
alloc_hook!(cuMemAllocAsync(dptr: *mut u64, bytes: usize, stream: Ptr) charge bytes as u64, id *dptr);
alloc_hook!(cuMemAllocAsync_ptsz(dptr: *mut u64, bytes: usize, stream: Ptr) charge bytes as u64, id *dptr);
alloc_hook!(cuMemAllocFromPoolAsync(dptr: *mut u64, bytes: usize, pool: Ptr, stream: Ptr) charge bytes as u64, id *dptr);
alloc_hook!(cuMemAllocFromPoolAsync_ptsz(dptr: *mut u64, bytes: usize, pool: Ptr, stream: Ptr) charge bytes as u64, id *dptr);
alloc_hook!(cuMemCreate(handle: *mut u64, bytes: usize, prop: Ptr, flags: u64) charge bytes as u64, id *handle);
// In the charges below: a non-null descriptor comes from the caller; a null one is charged
// nothing and refused by the driver.
alloc_hook!(cuArrayCreate_v2(arr: *mut Ptr, desc: *const ArrayDescriptor) charge
    // SAFETY: as said above.
    unsafe { array_bytes(desc) }, id *arr as u64);
alloc_hook!(cuArray3DCreate_v2(arr: *mut Ptr, desc: *const Array3dDescriptor) charge
    // SAFETY: as said above.
    unsafe { array3d_bytes(desc, 1) }, id *arr as u64);
alloc_hook!(cuMipmappedArrayCreate(arr: *mut Ptr, desc: *const Array3dDescriptor, levels: c_uint) charge
    // SAFETY: as said above.
    unsafe { array3d_bytes(desc, levels) }, id *arr as u64);
free_hook!(cuMemFree_v2(dptr: u64) id dptr);
free_hook!(cuMemFreeAsync(dptr: u64, stream: Ptr) id dptr);
free_hook!(cuMemFreeAsync_ptsz(dptr: u64, stream: Ptr) id dptr);
free_hook!(cuMemRelease(handle: u64) id handle);
free_hook!(cuArrayDestroy(arr: Ptr) id arr as u64);
free_hook!(cuMipmappedArrayDestroy(arr: Ptr) id arr as u64);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element: c_uint,
) -> CUresult {
    let s = tri!(slice());
    let real = real_of!(cuMemAllocPitch_v2(*mut u64, *mut usize, usize, usize, c_uint));
    // The driver picks the pitch; charge the widest it would pick (512-byte rows) up front, then
    // settle on the real size.
    let guess = (width.div_ceil(512) * 512 * height) as u64;
    tri!(s.charge(guess));
    // SAFETY: the caller's arguments go to the real function unchanged.
    let r = unsafe { real(dptr, pitch, width, height, element) };
    s.credit(guess);
    if r != CUDA_SUCCESS {
        return r;
    }
    // SAFETY: valid after success.
    let (ptr, real_bytes) = unsafe { (*dptr, (*pitch * height) as u64) };
    if s.charge(real_bytes).is_err() {
        if let Some(free) = real!(cuda, cuMemFree_v2 as unsafe extern "C" fn(u64) -> CUresult) {
            // SAFETY: freeing what the driver just gave us.
            unsafe { free(ptr) };
        }
        return slice::CUDA_ERROR_OUT_OF_MEMORY;
    }
    s.remember(ptr, real_bytes);
    r
}

/// Bytes of a 2D array; 0 for a null descriptor.
unsafe fn array_bytes(desc: *const ArrayDescriptor) -> u64 {
    // SAFETY: the caller passes null or a valid descriptor.
    unsafe { desc.as_ref() }.map_or(0, cuda::array_bytes)
}

/// Bytes of a 3D array with `levels` mip levels (each half the last in every dimension); 0 for a
/// null descriptor.
unsafe fn array3d_bytes(desc: *const Array3dDescriptor, levels: u32) -> u64 {
    // SAFETY: the caller passes null or a valid descriptor.
    unsafe { desc.as_ref() }.map_or(0, |d| cuda::array3d_bytes(d, levels))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let s = tri!(slice());
    let real = real_of!(cuMemGetInfo_v2(*mut usize, *mut usize));
    // SAFETY: the caller passes writable outputs, which the real call fills first.
    unsafe {
        let r = real(free, total);
        if r == CUDA_SUCCESS {
            let cap = s.cap();
            let left = cap.saturating_sub(s.used()) as usize;
            *total = (*total).min(cap as usize);
            *free = (*free).min(left);
        }
        r
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    let s = tri!(slice());
    let real = real_of!(cuDeviceTotalMem_v2(*mut usize, c_int));
    // SAFETY: as above.
    unsafe {
        let r = real(bytes, dev);
        if r == CUDA_SUCCESS {
            *bytes = (*bytes).min(s.cap() as usize);
        }
        r
    }
}

// ---- init, launches, captures ------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    // The slice first: a bad configuration refuses CUDA before the driver is touched.
    tri!(slice());
    let real = real_of!(cuInit(c_uint));
    // SAFETY: unchanged argument.
    unsafe { real(flags) }
}

fn drain() {
    if let Some(sync) = real!(cuda, cuCtxSynchronize as unsafe extern "C" fn() -> CUresult) {
        // SAFETY: no arguments; waits for this process's work in the current context.
        unsafe { sync() };
    }
}

/// The limiter, before every launch. The fast path is one atomic load to find the slice.
#[inline]
fn gate() -> Result<(), CUresult> {
    let s = match ready() {
        Some(s) => s,
        None => slice()?,
    };
    s.limiter.before_launch(drain);
    Ok(())
}

/// A launch hook: the limiter's gate, then the real launch.
macro_rules! launch_hook {
    ($name:ident($($arg:ident: $ty:ty),*)) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            tri!(gate());
            let real = real_of!($name($($ty),*));
            // SAFETY: unchanged arguments.
            unsafe { real($($arg),*) }
        }
    };
}

launch_hook!(cuLaunchKernel(f: Ptr, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, sh: c_uint, st: Ptr, p: *mut Ptr, e: *mut Ptr));
launch_hook!(cuLaunchKernel_ptsz(f: Ptr, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, sh: c_uint, st: Ptr, p: *mut Ptr, e: *mut Ptr));
launch_hook!(cuLaunchCooperativeKernel(f: Ptr, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, sh: c_uint, st: Ptr, p: *mut Ptr));
launch_hook!(cuLaunchCooperativeKernel_ptsz(f: Ptr, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, sh: c_uint, st: Ptr, p: *mut Ptr));
launch_hook!(cuLaunchKernelEx(config: *const c_void, f: Ptr, p: *mut Ptr, e: *mut Ptr));
launch_hook!(cuLaunchKernelEx_ptsz(config: *const c_void, f: Ptr, p: *mut Ptr, e: *mut Ptr));
launch_hook!(cuGraphLaunch(exec: Ptr, st: Ptr));
launch_hook!(cuGraphLaunch_ptsz(exec: Ptr, st: Ptr));

/// A capture records launches instead of running them, and synchronising would break it: the
/// limiter stands aside while one is open.
fn capture_changed(r: CUresult, opened: bool) -> CUresult {
    if r == CUDA_SUCCESS
        && let Some(s) = ready()
    {
        if opened {
            s.limiter.capturing.fetch_add(1, Ordering::SeqCst);
        } else {
            let _ = s
                .limiter
                .capturing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                    Some(c.saturating_sub(1))
                });
        }
    }
    r
}

/// A hook on the start (`true`) or end (`false`) of a stream capture.
macro_rules! capture_hook {
    ($name:ident($($arg:ident: $ty:ty),*) opens $opens:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            let real = real_of!($name($($ty),*));
            // SAFETY: unchanged arguments.
            capture_changed(unsafe { real($($arg),*) }, $opens)
        }
    };
}

capture_hook!(cuStreamBeginCapture_v2(st: Ptr, mode: c_uint) opens true);
capture_hook!(cuStreamBeginCapture_v2_ptsz(st: Ptr, mode: c_uint) opens true);
capture_hook!(cuStreamEndCapture(st: Ptr, graph: *mut Ptr) opens false);
capture_hook!(cuStreamEndCapture_ptsz(st: Ptr, graph: *mut Ptr) opens false);

// ---- NVML ------------------------------------------------------------------------------------

const NVML_SUCCESS: c_uint = 0;
const NVML_ERROR_UNINITIALIZED: c_uint = 1;
const NVML_ERROR_FUNCTION_NOT_FOUND: c_uint = 13;

/// Whether NVML's `device` is the one this slice is on.
fn is_slice_device(s: &Slice, device: Ptr) -> bool {
    let Some(index) = real!(
        nvml,
        nvmlDeviceGetIndex as unsafe extern "C" fn(Ptr, *mut c_uint) -> c_uint
    ) else {
        return false;
    };
    let mut i: c_uint = u32::MAX;
    // SAFETY: a device handle from the caller and our own output.
    unsafe { index(device, &mut i) == NVML_SUCCESS && i == s.config.physical_device }
}

/// What NVML should report for `device`: the slice's (cap, used) when it is the slice's device.
fn slice_memory(device: Ptr) -> Result<Option<(u64, u64)>, c_uint> {
    let s = slice().map_err(|_| NVML_ERROR_UNINITIALIZED)?;
    Ok(is_slice_device(s, device).then(|| (s.cap(), s.used())))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: Ptr, memory: *mut NvmlMemory) -> c_uint {
    let Some(real) = real!(
        nvml,
        nvmlDeviceGetMemoryInfo as unsafe extern "C" fn(Ptr, *mut NvmlMemory) -> c_uint
    ) else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    let slice = match slice_memory(device) {
        Ok(m) => m,
        Err(code) => return code,
    };
    // SAFETY: the caller's output, filled by the real call first.
    unsafe {
        let r = real(device, memory);
        if r == NVML_SUCCESS
            && let Some((cap, used)) = slice
        {
            (*memory).set(cap, used);
        }
        r
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: Ptr,
    memory: *mut NvmlMemoryV2,
) -> c_uint {
    let Some(real) = real!(
        nvml,
        nvmlDeviceGetMemoryInfo_v2 as unsafe extern "C" fn(Ptr, *mut NvmlMemoryV2) -> c_uint
    ) else {
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    };
    let slice = match slice_memory(device) {
        Ok(m) => m,
        Err(code) => return code,
    };
    // SAFETY: the caller's output, filled by the real call first.
    unsafe {
        let r = real(device, memory);
        if r == NVML_SUCCESS
            && let Some((cap, used)) = slice
        {
            (*memory).set(cap, used);
        }
        r
    }
}

// ---- entry points ----------------------------------------------------------------------------

macro_rules! hooks {
    ($($lib:ident: $($name:ident),*;)*) => {
        /// Our hook for the driver or NVML symbol `name`.
        fn hook_by_name(name: &[u8]) -> Option<Ptr> {
            match name {
                $($(n if n == stringify!($name).as_bytes() => Some($name as Ptr),)*)*
                _ => None,
            }
        }

        /// (real function, our hook) for every hook whose real function exists.
        fn hook_table() -> Vec<(usize, usize)> {
            let mut t = Vec::new();
            $($(
                let real = real::$lib(
                    // SAFETY: a static NUL-terminated name.
                    unsafe { CStr::from_bytes_with_nul_unchecked(concat!(stringify!($name), "\0").as_bytes()) },
                );
                if real != 0 {
                    t.push((real, $name as Ptr as usize));
                }
            )*)*
            t
        }
    };
}

hooks! {
    cuda: cuInit, cuMemAlloc_v2, cuMemAllocManaged, cuMemAllocPitch_v2, cuMemAllocAsync,
        cuMemAllocAsync_ptsz, cuMemAllocFromPoolAsync, cuMemAllocFromPoolAsync_ptsz, cuMemFree_v2,
        cuMemFreeAsync, cuMemFreeAsync_ptsz, cuMemCreate, cuMemRelease, cuArrayCreate_v2,
        cuArray3DCreate_v2, cuMipmappedArrayCreate, cuArrayDestroy, cuMipmappedArrayDestroy,
        cuMemGetInfo_v2, cuDeviceTotalMem_v2, cuLaunchKernel, cuLaunchKernel_ptsz,
        cuLaunchCooperativeKernel, cuLaunchCooperativeKernel_ptsz, cuLaunchKernelEx,
        cuLaunchKernelEx_ptsz, cuGraphLaunch, cuGraphLaunch_ptsz, cuStreamBeginCapture_v2,
        cuStreamBeginCapture_v2_ptsz, cuStreamEndCapture, cuStreamEndCapture_ptsz,
        cuGetProcAddress, cuGetProcAddress_v2;
    nvml: nvmlDeviceGetMemoryInfo, nvmlDeviceGetMemoryInfo_v2;
}

/// Replaces a real function the driver handed out with our hook for it, if we have one.
fn substitute(pfn: *mut Ptr) {
    static TABLE: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
    // SAFETY: the caller checked pfn; the driver just wrote it.
    let got = unsafe { *pfn } as usize;
    if got == 0 {
        return;
    }
    if let Some((_, hook)) = TABLE
        .get_or_init(hook_table)
        .iter()
        .find(|(r, _)| *r == got)
    {
        // SAFETY: as above.
        unsafe { *pfn = *hook as Ptr };
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut Ptr,
    version: c_int,
    flags: u64,
) -> CUresult {
    let real = tri!(
        real!(
            cuda,
            cuGetProcAddress
                as unsafe extern "C" fn(*const c_char, *mut Ptr, c_int, u64) -> CUresult
        )
        .ok_or(CUDA_ERROR_NOT_FOUND)
    );
    // SAFETY: unchanged arguments.
    let r = unsafe { real(symbol, pfn, version, flags) };
    if r == CUDA_SUCCESS && !pfn.is_null() {
        substitute(pfn);
    }
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut Ptr,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    let real = tri!(
        real!(
            cuda,
            cuGetProcAddress_v2
                as unsafe extern "C" fn(
                    *const c_char,
                    *mut Ptr,
                    c_int,
                    u64,
                    *mut c_int,
                ) -> CUresult
        )
        .ok_or(CUDA_ERROR_NOT_FOUND)
    );
    // SAFETY: unchanged arguments.
    let r = unsafe { real(symbol, pfn, version, flags, status) };
    if r == CUDA_SUCCESS && !pfn.is_null() {
        substitute(pfn);
    }
    r
}

/// `dlsym`: our hook for the driver and NVML symbols we hook, glibc's answer for everything else.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: Ptr, symbol: *const c_char) -> Ptr {
    if !symbol.is_null() {
        // SAFETY: dlsym's contract: a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
        if (name.starts_with(b"cu") || name.starts_with(b"nvml"))
            && let Some(h) = hook_by_name(name)
        {
            return h;
        }
    }
    // SAFETY: glibc's dlsym with the caller's arguments.
    unsafe { real::dlsym()(handle, symbol) }
}
