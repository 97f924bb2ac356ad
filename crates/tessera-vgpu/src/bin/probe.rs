//! `tessera-vgpu-probe`: a small CUDA program for testing slices, with no CUDA toolkit anywhere.
//!
//! It loads the driver the way runtimes do (`dlopen("libcuda.so.1")` and `dlsym`), loads
//! hand-written PTX, and reports one line of `key=value` results:
//!
//! - `oom [--via PATH] [--max BYTES] [--hold SECONDS]`: allocates 64 MiB at a time (through
//!   `cuMemAlloc`, or managed, async, pool, pitch, vmm, array) until the driver refuses (or
//!   `--max` is reached); prints `allocated_bytes=N result=NAME`; holds the memory if asked.
//! - `meminfo`: prints `free_bytes=F total_bytes=T device_total_bytes=D`.
//! - `launch --seconds S [--empty]`: a launch loop; prints `launches_per_s=R kernels_per_s=R`.
//!   With `--sync-every N`, the loop synchronizes its stream after every N launches, as a
//!   training step does when it reads its loss.
//! - `graph --seconds S`: the same through a CUDA graph of 10 kernels.
//! - `check`: exercises what a program does besides launching, each checked by reading device
//!   memory back: a kernel that writes its parameters' value (`tessera_fill`), memset, copies
//!   both ways and on the device (several MiB, so in chunks when remote), events, an
//!   asynchronous copy into pinned memory, a captured graph, a pitched 2D copy both ways; prints
//!   `fill_ok=1 memset_ok=1 ...`.
//! - `copy --bytes N --rounds R [--pinned]`: host-to-device and device-to-host bandwidth.
//! - `free-burst [--hold S]`: four 64 MiB allocations freed in a burst, then no CUDA call for S
//!   seconds (a remote client must still send the frees).
//! - `async-error`: a memset the driver must refuse (address 0), then two synchronizations;
//!   prints what each returned (on a remote GPU the memset is not waited for: its error comes at
//!   the first synchronization, as CUDA reports errors of asynchronous work).
//!
//! With `--proc-address [--ptds]` it finds entry points through `cuGetProcAddress_v2` (with the
//! per-thread default stream flag), as the CUDA runtime and PyTorch do, instead of `dlsym`.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::time::{Duration, Instant};

type Ptr = *mut c_void;
type R = c_uint;

const PTX: &CStr = c"
.version 7.0
.target sm_70
.address_size 64

.visible .entry tessera_spin(.param .u64 cycles)
{
    .reg .u64 %rd<5>;
    .reg .pred %p;
    ld.param.u64 %rd1, [cycles];
    mov.u64 %rd2, %clock64;
SPIN:
    mov.u64 %rd3, %clock64;
    sub.u64 %rd4, %rd3, %rd2;
    setp.lt.u64 %p, %rd4, %rd1;
    @%p bra SPIN;
    ret;
}

.visible .entry tessera_empty()
{
    ret;
}

.visible .entry tessera_fill(.param .u64 ptr, .param .u32 value, .param .u64 count)
{
    .reg .u64 %rd<7>;
    .reg .u32 %r<6>;
    .reg .pred %p;
    ld.param.u64 %rd1, [ptr];
    ld.param.u32 %r1, [value];
    ld.param.u64 %rd2, [count];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    cvt.u64.u32 %rd3, %r5;
    setp.ge.u64 %p, %rd3, %rd2;
    @%p bra DONE;
    cvta.to.global.u64 %rd4, %rd1;
    shl.b64 %rd5, %rd3, 2;
    add.u64 %rd6, %rd4, %rd5;
    st.global.u32 [%rd6], %r1;
DONE:
    ret;
}
";

struct Driver {
    lib: Ptr,
    /// Find entry points through cuGetProcAddress_v2 (as the CUDA runtime and PyTorch do) with
    /// these flags, instead of dlsym.
    proc_address: Option<u64>,
}

type GetProcFn = unsafe extern "C" fn(*const c_char, *mut Ptr, c_int, u64, *mut c_int) -> R;

impl Driver {
    fn open(proc_address: Option<u64>) -> Driver {
        // SAFETY: dlopen of the driver by its soname.
        let lib = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW) };
        if lib.is_null() {
            fail(
                "libcuda.so.1 cannot be loaded (no driver, and no simulated one on the library path)",
            );
        }
        Driver { lib, proc_address }
    }

    /// The driver function `name`: through dlsym, or through cuGetProcAddress_v2 by its base
    /// name (`cuMemAlloc` for `cuMemAlloc_v2`), which picks the variant for CUDA 12.8 and the
    /// flags (the per-thread default stream flag selects `_ptsz` variants).
    fn sym<T: Copy>(&self, name: &CStr) -> T {
        let Some(flags) = self.proc_address else {
            return self.dlsym(name);
        };
        let get: GetProcFn = self.dlsym(c"cuGetProcAddress_v2");
        let text = name.to_string_lossy();
        let base = text.strip_suffix("_v2").unwrap_or(&text);
        let base = std::ffi::CString::new(base).unwrap_or_default();
        let mut f: Ptr = std::ptr::null_mut();
        let mut status = 0;
        // SAFETY: a NUL-terminated name and our outputs.
        let r = unsafe { get(base.as_ptr(), &mut f, 12080, flags, &mut status) };
        if r != 0 || f.is_null() {
            fail(&format!(
                "cuGetProcAddress_v2({}) failed: error {r}",
                base.to_string_lossy()
            ));
        }
        // SAFETY: T is the C function pointer type of that symbol.
        unsafe { std::mem::transmute_copy::<Ptr, T>(&f) }
    }

    /// The driver function `name` through dlsym.
    fn dlsym<T: Copy>(&self, name: &CStr) -> T {
        // SAFETY: a valid handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(self.lib, name.as_ptr()) };
        if p.is_null() {
            fail(&format!("the driver has no {}", name.to_string_lossy()));
        }
        assert_eq!(size_of::<T>(), size_of::<Ptr>());
        // SAFETY: T is the C function pointer type of that symbol.
        unsafe { std::mem::transmute_copy::<Ptr, T>(&p) }
    }

    fn check(&self, what: &str, r: R) {
        if r != 0 {
            fail(&format!("{what} failed: {}", self.error_name(r)));
        }
    }

    fn error_name(&self, r: R) -> String {
        let name: unsafe extern "C" fn(R, *mut *const c_char) -> R = self.sym(c"cuGetErrorName");
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: our output pointer; the driver returns a static string.
        if unsafe { name(r, &mut p) } == 0 && !p.is_null() {
            // SAFETY: a static NUL-terminated string from the driver.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            format!("error {r}")
        }
    }

    /// cuInit, device 0, its primary context made current.
    fn context(&self) {
        let init: unsafe extern "C" fn(c_uint) -> R = self.sym(c"cuInit");
        let get: unsafe extern "C" fn(*mut c_int, c_int) -> R = self.sym(c"cuDeviceGet");
        let retain: unsafe extern "C" fn(*mut Ptr, c_int) -> R =
            self.sym(c"cuDevicePrimaryCtxRetain");
        let set: unsafe extern "C" fn(Ptr) -> R = self.sym(c"cuCtxSetCurrent");
        let (mut dev, mut ctx) = (0, std::ptr::null_mut());
        // SAFETY: driver calls with our own outputs.
        unsafe {
            self.check("cuInit", init(0));
            self.check("cuDeviceGet", get(&mut dev, 0));
            self.check("cuDevicePrimaryCtxRetain", retain(&mut ctx, dev));
            self.check("cuCtxSetCurrent", set(ctx));
        }
    }

    fn function(&self, name: &CStr) -> Ptr {
        let load: unsafe extern "C" fn(*mut Ptr, *const c_void) -> R =
            self.sym(c"cuModuleLoadData");
        let get: unsafe extern "C" fn(*mut Ptr, Ptr, *const c_char) -> R =
            self.sym(c"cuModuleGetFunction");
        let (mut module, mut f) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: PTX text and our outputs.
        unsafe {
            self.check(
                "cuModuleLoadData",
                load(&mut module, PTX.as_ptr() as *const c_void),
            );
            self.check("cuModuleGetFunction", get(&mut f, module, name.as_ptr()));
        }
        f
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("tessera-vgpu-probe: {msg}");
    std::process::exit(2);
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| fail(&format!("{name} {v}: not a number")))
        })
}

type LaunchFn = unsafe extern "C" fn(
    Ptr,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    Ptr,
    *mut Ptr,
    *mut Ptr,
) -> R;

/// The spin kernel: on a real GPU ~100 µs on every SM of an H100; on the simulated driver its
/// time follows its 132 × 256 threads.
fn launch_spin(d: &Driver, launch: LaunchFn, f: Ptr, stream: Ptr, cycles: &mut u64, empty: bool) {
    let mut params = [cycles as *mut u64 as Ptr];
    let (grid, block) = if empty { (1, 1) } else { (132, 256) };
    let p = if empty {
        std::ptr::null_mut()
    } else {
        params.as_mut_ptr()
    };
    // SAFETY: a loaded function, our parameter array and a valid stream.
    let r = unsafe {
        launch(
            f,
            grid,
            1,
            1,
            block,
            1,
            1,
            0,
            stream,
            p,
            std::ptr::null_mut(),
        )
    };
    d.check("cuLaunchKernel", r);
}

/// One 64 MiB-style allocation through the path named `via`; returns the driver's result.
fn allocator<'a>(d: &'a Driver, via: &str) -> Box<dyn Fn(u64) -> R + 'a> {
    let null = std::ptr::null_mut();
    match via {
        "alloc" => {
            let f: unsafe extern "C" fn(*mut u64, usize) -> R = d.sym(c"cuMemAlloc_v2");
            // SAFETY: a driver call with our own output and valid arguments (so in every arm).
            Box::new(move |n| unsafe { f(&mut 0, n as usize) })
        }
        "managed" => {
            let f: unsafe extern "C" fn(*mut u64, usize, c_uint) -> R = d.sym(c"cuMemAllocManaged");
            // SAFETY: a driver call with our own output and valid arguments.
            Box::new(move |n| unsafe { f(&mut 0, n as usize, 1) })
        }
        "async" => {
            let f: unsafe extern "C" fn(*mut u64, usize, Ptr) -> R = d.sym(c"cuMemAllocAsync");
            // SAFETY: a driver call with our own output and valid arguments.
            Box::new(move |n| unsafe { f(&mut 0, n as usize, null) })
        }
        "pool" => {
            let get: unsafe extern "C" fn(*mut Ptr, c_int) -> R =
                d.sym(c"cuDeviceGetDefaultMemPool");
            let f: unsafe extern "C" fn(*mut u64, usize, Ptr, Ptr) -> R =
                d.sym(c"cuMemAllocFromPoolAsync");
            let mut pool = std::ptr::null_mut();
            // SAFETY: the driver writes the pool handle into our own variable.
            d.check("cuDeviceGetDefaultMemPool", unsafe { get(&mut pool, 0) });
            // SAFETY: a driver call with our own output and valid arguments.
            Box::new(move |n| unsafe { f(&mut 0, n as usize, pool, null) })
        }
        "pitch" => {
            let f: unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, c_uint) -> R =
                d.sym(c"cuMemAllocPitch_v2");
            // SAFETY: a driver call with our own output and valid arguments.
            Box::new(move |n| unsafe { f(&mut 0, &mut 0, (n / 4) as usize, 4, 4) })
        }
        "vmm" => {
            let f: unsafe extern "C" fn(*mut u64, usize, *const u32, u64) -> R =
                d.sym(c"cuMemCreate");
            // CUmemAllocationProp: pinned device memory on device 0.
            let prop: [u32; 8] = [1, 0, 1, 0, 0, 0, 0, 0];
            // SAFETY: a driver call with our own output and valid arguments.
            Box::new(move |n| unsafe { f(&mut 0, n as usize, prop.as_ptr(), 0) })
        }
        "array" => {
            // CUDA_ARRAY_DESCRIPTOR: width, height, format (FLOAT), channels.
            #[repr(C)]
            struct Desc(usize, usize, c_uint, c_uint);
            let f: unsafe extern "C" fn(*mut Ptr, *const Desc) -> R = d.sym(c"cuArrayCreate_v2");
            Box::new(move |n| {
                let desc = Desc(16384, (n / 16384 / 4) as usize, 0x20, 1);
                // SAFETY: a driver call with our own output and a descriptor that outlives it.
                unsafe { f(&mut std::ptr::null_mut(), &desc) }
            })
        }
        other => fail(&format!(
            "--via {other}: use alloc, managed, async, pool, pitch, vmm or array"
        )),
    }
}

/// NVML's memory info for this process's device (the first of CUDA_VISIBLE_DEVICES), as
/// nvidia-smi and frameworks read it; `None` without NVML.
fn nvml_memory() -> Option<(u64, u64)> {
    // SAFETY: dlopen of NVML by its soname.
    let lib = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW) };
    if lib.is_null() {
        return None;
    }
    let sym = |name: &CStr| {
        // SAFETY: a valid handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    type InitFn = unsafe extern "C" fn() -> c_uint;
    type HandleFn = unsafe extern "C" fn(c_uint, *mut Ptr) -> c_uint;
    type MemFn = unsafe extern "C" fn(Ptr, *mut [u64; 3]) -> c_uint;
    let index: c_uint = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|v| v.split(',').next()?.trim().parse().ok())
        .unwrap_or(0);
    // SAFETY: NVML's documented signatures; our own outputs (nvmlMemory_t is total, free, used).
    unsafe {
        let init: InitFn = std::mem::transmute(sym(c"nvmlInit_v2")?);
        let handle: HandleFn = std::mem::transmute(sym(c"nvmlDeviceGetHandleByIndex_v2")?);
        let info: MemFn = std::mem::transmute(sym(c"nvmlDeviceGetMemoryInfo")?);
        let mut h: Ptr = std::ptr::null_mut();
        let mut m = [0u64; 3];
        (init() == 0 && handle(index, &mut h) == 0 && info(h, &mut m) == 0).then_some((m[0], m[1]))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("");
    // --proc-address: entry points through cuGetProcAddress_v2; --ptds: with the per-thread
    // default stream flag.
    let proc_address = args.iter().any(|a| a == "--proc-address").then(|| {
        if args.iter().any(|a| a == "--ptds") {
            2
        } else {
            0
        }
    });
    let d = Driver::open(proc_address);
    d.context();
    match mode {
        "oom" => {
            let via: String = arg(&args, "--via").unwrap_or_else(|| "alloc".into());
            let alloc = allocator(&d, &via);
            let max: u64 = arg(&args, "--max").unwrap_or(u64::MAX);
            let step = 64u64 << 20;
            let mut total = 0u64;
            let result = loop {
                if total + step > max {
                    break "max_reached".to_string();
                }
                let r = alloc(step);
                if r != 0 {
                    break d.error_name(r);
                }
                total += step;
            };
            println!("allocated_bytes={total} result={result}");
            if let Some(hold) = arg::<f64>(&args, "--hold") {
                std::thread::sleep(Duration::from_secs_f64(hold));
            }
        }
        "meminfo" => {
            let info: unsafe extern "C" fn(*mut usize, *mut usize) -> R = d.sym(c"cuMemGetInfo_v2");
            let total_mem: unsafe extern "C" fn(*mut usize, c_int) -> R =
                d.sym(c"cuDeviceTotalMem_v2");
            let (mut free, mut total, mut dev_total) = (0, 0, 0);
            // SAFETY: our outputs.
            unsafe {
                d.check("cuMemGetInfo_v2", info(&mut free, &mut total));
                d.check("cuDeviceTotalMem_v2", total_mem(&mut dev_total, 0));
            }
            print!("free_bytes={free} total_bytes={total} device_total_bytes={dev_total}");
            match nvml_memory() {
                Some((total, free)) => println!(" nvml_total_bytes={total} nvml_free_bytes={free}"),
                None => println!(),
            }
        }
        "launch" | "graph" => {
            let seconds: f64 = arg(&args, "--seconds").unwrap_or(2.0);
            let empty = args.iter().any(|a| a == "--empty");
            let f = d.function(if empty {
                c"tessera_empty"
            } else {
                c"tessera_spin"
            });
            let launch: LaunchFn = d.sym(c"cuLaunchKernel");
            let sync: unsafe extern "C" fn(Ptr) -> R = d.sym(c"cuStreamSynchronize");
            let create: unsafe extern "C" fn(*mut Ptr, c_uint) -> R = d.sym(c"cuStreamCreate");
            let mut stream = std::ptr::null_mut();
            // SAFETY: our output.
            d.check("cuStreamCreate", unsafe { create(&mut stream, 0) });
            let mut cycles: u64 = 200_000;
            let per_launch;
            let mut step: Box<dyn FnMut()> = if mode == "graph" {
                let begin: unsafe extern "C" fn(Ptr, c_uint) -> R =
                    d.sym(c"cuStreamBeginCapture_v2");
                let end: unsafe extern "C" fn(Ptr, *mut Ptr) -> R = d.sym(c"cuStreamEndCapture");
                let inst: unsafe extern "C" fn(*mut Ptr, Ptr, u64) -> R =
                    d.sym(c"cuGraphInstantiateWithFlags");
                let glaunch: unsafe extern "C" fn(Ptr, Ptr) -> R = d.sym(c"cuGraphLaunch");
                let (mut graph, mut exec) = (std::ptr::null_mut(), std::ptr::null_mut());
                // SAFETY: capture on our stream; outputs are ours.
                unsafe {
                    d.check("cuStreamBeginCapture_v2", begin(stream, 0));
                    for _ in 0..10 {
                        launch_spin(&d, launch, f, stream, &mut cycles, empty);
                    }
                    d.check("cuStreamEndCapture", end(stream, &mut graph));
                    d.check("cuGraphInstantiateWithFlags", inst(&mut exec, graph, 0));
                }
                per_launch = 10.0;
                let d = &d;
                Box::new(move || {
                    // SAFETY: an instantiated graph on our stream.
                    d.check("cuGraphLaunch", unsafe { glaunch(exec, stream) });
                })
            } else {
                per_launch = 1.0;
                let d = &d;
                let cycles = &mut cycles;
                Box::new(move || launch_spin(d, launch, f, stream, cycles, empty))
            };
            let sync_every: u64 = arg(&args, "--sync-every").unwrap_or(0);
            let start = Instant::now();
            let (mut n, mut syncs) = (0u64, 0u64);
            while start.elapsed().as_secs_f64() < seconds {
                step();
                n += 1;
                if sync_every > 0 && n % sync_every == 0 {
                    // SAFETY: our stream.
                    d.check("cuStreamSynchronize", unsafe { sync(stream) });
                    syncs += 1;
                }
            }
            // SAFETY: our stream.
            d.check("cuStreamSynchronize", unsafe { sync(stream) });
            let secs = start.elapsed().as_secs_f64();
            println!(
                "launches_per_s={:.1} kernels_per_s={:.1} launches={n} syncs={syncs} seconds={secs:.3}",
                n as f64 / secs,
                n as f64 * per_launch / secs
            );
        }
        "free-burst" => {
            // Four allocations, then four frees in a burst, then no CUDA call at all: what a
            // program does before it turns to work of its own.
            let alloc: AllocFn = d.sym(c"cuMemAlloc_v2");
            let free: unsafe extern "C" fn(u64) -> R = d.sym(c"cuMemFree_v2");
            let mut ptrs = [0u64; 4];
            for p in &mut ptrs {
                // SAFETY: our output.
                d.check("cuMemAlloc", unsafe { alloc(p, 64 << 20) });
            }
            for p in ptrs {
                // SAFETY: an allocation of ours.
                d.check("cuMemFree", unsafe { free(p) });
            }
            println!("freed=4");
            if let Some(hold) = arg::<f64>(&args, "--hold") {
                std::thread::sleep(Duration::from_secs_f64(hold));
            }
        }
        "check" => check(&d),
        "copy" => copy(&d, &args),
        "async-error" => {
            let memset: unsafe extern "C" fn(u64, c_uint, usize) -> R = d.sym(c"cuMemsetD32_v2");
            let sync: unsafe extern "C" fn() -> R = d.sym(c"cuCtxSynchronize");
            // SAFETY: address 0 is never device memory: every driver refuses it, without
            // touching anything.
            let r = unsafe { memset(0, 1, 16) };
            // SAFETY: no arguments.
            let s1 = unsafe { sync() };
            // SAFETY: no arguments.
            let s2 = unsafe { sync() };
            println!(
                "call_result={} sync_result={} next_sync_result={}",
                d.error_name(r),
                d.error_name(s1),
                d.error_name(s2)
            );
        }
        _ => fail(
            "usage: tessera-vgpu-probe oom [--max BYTES] [--hold S] | meminfo | launch --seconds S [--empty] [--sync-every N] | graph --seconds S | free-burst [--hold S] | check | copy --bytes N [--rounds R] [--pinned] | async-error",
        ),
    }
}

type AllocFn = unsafe extern "C" fn(*mut u64, usize) -> R;
type HtoDFn = unsafe extern "C" fn(u64, *const c_void, usize) -> R;
type DtoHFn = unsafe extern "C" fn(Ptr, u64, usize) -> R;

/// Each feature a program uses besides launch loops, checked by what device memory holds after.
fn check(d: &Driver) {
    const WORDS: usize = 1 << 20; // 4 MiB: several chunks on a remote GPU
    let alloc: AllocFn = d.sym(c"cuMemAlloc_v2");
    let htod: HtoDFn = d.sym(c"cuMemcpyHtoD_v2");
    let dtoh: DtoHFn = d.sym(c"cuMemcpyDtoH_v2");
    let dtod: unsafe extern "C" fn(u64, u64, usize) -> R = d.sym(c"cuMemcpyDtoD_v2");
    let memset: unsafe extern "C" fn(u64, c_uint, usize) -> R = d.sym(c"cuMemsetD32_v2");
    let launch: LaunchFn = d.sym(c"cuLaunchKernel");
    let sync: unsafe extern "C" fn() -> R = d.sym(c"cuCtxSynchronize");
    let bytes = WORDS * 4;
    let (mut a, mut b) = (0u64, 0u64);
    let mut host = vec![0u32; WORDS];
    let read = |ptr: u64, host: &mut Vec<u32>| {
        // SAFETY: our host buffer of `bytes` bytes and our device allocation.
        d.check("cuMemcpyDtoH", unsafe {
            dtoh(host.as_mut_ptr().cast(), ptr, bytes)
        });
    };
    // SAFETY: driver calls with our own outputs and buffers.
    unsafe {
        d.check("cuMemAlloc", alloc(&mut a, bytes));
        d.check("cuMemAlloc", alloc(&mut b, bytes));
    }
    // A kernel whose parameters say what to write where.
    let fill = d.function(c"tessera_fill");
    let (mut ptr, mut value, mut count) = (a, 0x5eed_u32, WORDS as u64);
    let mut params = [
        (&mut ptr as *mut u64).cast::<c_void>(),
        (&mut value as *mut u32).cast(),
        (&mut count as *mut u64).cast(),
    ];
    // SAFETY: a loaded function and a parameter array matching its three parameters.
    let r = unsafe {
        launch(
            fill,
            (WORDS / 256) as c_uint,
            1,
            1,
            256,
            1,
            1,
            0,
            std::ptr::null_mut(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    d.check("cuLaunchKernel(tessera_fill)", r);
    read(a, &mut host);
    let fill_ok = host.iter().all(|w| *w == 0x5eed);
    // SAFETY: our allocation of WORDS words.
    d.check("cuMemsetD32", unsafe { memset(a, 7, WORDS) });
    read(a, &mut host);
    let memset_ok = host.iter().all(|w| *w == 7);
    let pattern: Vec<u32> = (0..WORDS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    // SAFETY: our buffers and allocations of `bytes` bytes.
    unsafe {
        d.check("cuMemcpyHtoD", htod(b, pattern.as_ptr().cast(), bytes));
        d.check("cuMemcpyDtoD", dtod(a, b, bytes));
    }
    read(a, &mut host);
    let copy_ok = host == pattern;
    // Events around a kernel.
    let create: unsafe extern "C" fn(*mut Ptr, c_uint) -> R = d.sym(c"cuEventCreate");
    let record: unsafe extern "C" fn(Ptr, Ptr) -> R = d.sym(c"cuEventRecord");
    let esync: unsafe extern "C" fn(Ptr) -> R = d.sym(c"cuEventSynchronize");
    let elapsed: unsafe extern "C" fn(*mut f32, Ptr, Ptr) -> R = d.sym(c"cuEventElapsedTime");
    let spin = d.function(c"tessera_spin");
    let (mut e1, mut e2, mut ms) = (std::ptr::null_mut(), std::ptr::null_mut(), -1f32);
    let mut cycles = 200_000u64;
    // SAFETY: our events, our outputs, the default stream.
    unsafe {
        d.check("cuEventCreate", create(&mut e1, 0));
        d.check("cuEventCreate", create(&mut e2, 0));
        d.check("cuEventRecord", record(e1, std::ptr::null_mut()));
        launch_spin(d, launch, spin, std::ptr::null_mut(), &mut cycles, false);
        d.check("cuEventRecord", record(e2, std::ptr::null_mut()));
        d.check("cuEventSynchronize", esync(e2));
        d.check("cuEventElapsedTime", elapsed(&mut ms, e1, e2));
    }
    let events_ok = ms > 0.0;
    // An asynchronous copy back into pinned memory on a stream of our own.
    let host_alloc: unsafe extern "C" fn(*mut Ptr, usize) -> R = d.sym(c"cuMemAllocHost_v2");
    let dtoh_async: unsafe extern "C" fn(Ptr, u64, usize, Ptr) -> R =
        d.sym(c"cuMemcpyDtoHAsync_v2");
    let screate: unsafe extern "C" fn(*mut Ptr, c_uint) -> R = d.sym(c"cuStreamCreate");
    let ssync: unsafe extern "C" fn(Ptr) -> R = d.sym(c"cuStreamSynchronize");
    let (mut pinned, mut stream) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: our pinned buffer of `bytes` bytes, our stream, our allocation.
    let pinned_ok = unsafe {
        d.check("cuMemAllocHost", host_alloc(&mut pinned, bytes));
        d.check("cuStreamCreate", screate(&mut stream, 0));
        d.check("cuMemcpyDtoHAsync", dtoh_async(pinned, a, bytes, stream));
        d.check("cuStreamSynchronize", ssync(stream));
        std::slice::from_raw_parts(pinned as *const u32, WORDS) == &pattern[..]
    };
    // A captured graph, launched twice.
    let begin: unsafe extern "C" fn(Ptr, c_uint) -> R = d.sym(c"cuStreamBeginCapture_v2");
    let end: unsafe extern "C" fn(Ptr, *mut Ptr) -> R = d.sym(c"cuStreamEndCapture");
    let inst: unsafe extern "C" fn(*mut Ptr, Ptr, u64) -> R = d.sym(c"cuGraphInstantiateWithFlags");
    let glaunch: unsafe extern "C" fn(Ptr, Ptr) -> R = d.sym(c"cuGraphLaunch");
    let (mut graph, mut exec) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: capture on our stream; outputs are ours.
    let graph_ok = unsafe {
        d.check("cuStreamBeginCapture", begin(stream, 0));
        for _ in 0..3 {
            launch_spin(d, launch, spin, stream, &mut cycles, false);
        }
        d.check("cuStreamEndCapture", end(stream, &mut graph));
        d.check("cuGraphInstantiate", inst(&mut exec, graph, 0));
        d.check("cuGraphLaunch", glaunch(exec, stream));
        d.check("cuGraphLaunch", glaunch(exec, stream));
        ssync(stream) == 0 && sync() == 0
    };
    let copy2d_ok = copy_2d(d);
    let flag = |b: bool| b as u8;
    println!(
        "fill_ok={} memset_ok={} copy_ok={} events_ok={} pinned_ok={} graph_ok={} copy2d_ok={}",
        flag(fill_ok),
        flag(memset_ok),
        flag(copy_ok),
        flag(events_ok),
        flag(pinned_ok),
        flag(graph_ok),
        flag(copy2d_ok)
    );
}

/// Host-to-device and device-to-host bandwidth over `--rounds` copies of `--bytes`.
fn copy(d: &Driver, args: &[String]) {
    let bytes: usize = arg(args, "--bytes").unwrap_or(256 << 20);
    let rounds: u32 = arg(args, "--rounds").unwrap_or(4);
    let alloc: AllocFn = d.sym(c"cuMemAlloc_v2");
    let htod: HtoDFn = d.sym(c"cuMemcpyHtoD_v2");
    let dtoh: DtoHFn = d.sym(c"cuMemcpyDtoH_v2");
    let sync: unsafe extern "C" fn() -> R = d.sym(c"cuCtxSynchronize");
    let mut dev = 0u64;
    // SAFETY: our output.
    d.check("cuMemAlloc", unsafe { alloc(&mut dev, bytes) });
    let mut pageable = Vec::new();
    let host: *mut u8 = if args.iter().any(|a| a == "--pinned") {
        let host_alloc: unsafe extern "C" fn(*mut Ptr, usize) -> R = d.sym(c"cuMemAllocHost_v2");
        let mut p = std::ptr::null_mut();
        // SAFETY: our output.
        d.check("cuMemAllocHost", unsafe { host_alloc(&mut p, bytes) });
        p.cast()
    } else {
        pageable = vec![1u8; bytes];
        pageable.as_mut_ptr()
    };
    let rate = |secs: f64| (bytes as f64 * rounds as f64) / secs / 1e6;
    let start = Instant::now();
    for _ in 0..rounds {
        // SAFETY: our buffers of `bytes` bytes.
        d.check("cuMemcpyHtoD", unsafe { htod(dev, host.cast(), bytes) });
    }
    // SAFETY: no arguments.
    d.check("cuCtxSynchronize", unsafe { sync() });
    let up = rate(start.elapsed().as_secs_f64());
    let start = Instant::now();
    for _ in 0..rounds {
        // SAFETY: our buffers of `bytes` bytes.
        d.check("cuMemcpyDtoH", unsafe { dtoh(host.cast(), dev, bytes) });
    }
    let down = rate(start.elapsed().as_secs_f64());
    drop(pageable);
    println!("htod_mb_s={up:.0} dtoh_mb_s={down:.0} bytes={bytes} rounds={rounds}");
}

/// A pitched 2D copy to the device and back, between host rows of other pitches: every row's
/// bytes come back, and nothing between the rows is written.
fn copy_2d(d: &Driver) -> bool {
    use tessera_shm::cuda::{MEMORY_DEVICE, MEMORY_HOST, Memcpy2d};
    let (width, height) = (1000usize, 300usize);
    let alloc: unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, c_uint) -> R =
        d.sym(c"cuMemAllocPitch_v2");
    let copy: unsafe extern "C" fn(*const Memcpy2d) -> R = d.sym(c"cuMemcpy2D_v2");
    let (mut dev, mut pitch) = (0u64, 0usize);
    // SAFETY: our outputs.
    d.check("cuMemAllocPitch", unsafe {
        alloc(&mut dev, &mut pitch, width, height, 4)
    });
    let (up_pitch, down_pitch) = (1024usize, 1100usize);
    let source: Vec<u8> = (0..up_pitch * height)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut back = vec![0xAAu8; down_pitch * height];
    let plan = |src_type,
                src_host: *const c_void,
                src_device,
                src_pitch,
                dst_type,
                dst_host: Ptr,
                dst_device,
                dst_pitch| Memcpy2d {
        src_x_in_bytes: 0,
        src_y: 0,
        src_memory_type: src_type,
        src_host,
        src_device,
        src_array: std::ptr::null_mut(),
        src_pitch,
        dst_x_in_bytes: 0,
        dst_y: 0,
        dst_memory_type: dst_type,
        dst_host,
        dst_device,
        dst_array: std::ptr::null_mut(),
        dst_pitch,
        width_in_bytes: width,
        height,
    };
    let up = plan(
        MEMORY_HOST,
        source.as_ptr().cast(),
        0,
        up_pitch,
        MEMORY_DEVICE,
        std::ptr::null_mut(),
        dev,
        pitch,
    );
    let down = plan(
        MEMORY_DEVICE,
        std::ptr::null(),
        dev,
        pitch,
        MEMORY_HOST,
        back.as_mut_ptr().cast(),
        0,
        down_pitch,
    );
    // SAFETY: both plans name our buffers and allocation, each row inside them.
    unsafe {
        d.check("cuMemcpy2D (up)", copy(&up));
        d.check("cuMemcpy2D (down)", copy(&down));
    }
    (0..height).all(|row| {
        back[row * down_pitch..row * down_pitch + width]
            == source[row * up_pitch..row * up_pitch + width]
            && back[row * down_pitch + width..(row + 1) * down_pitch]
                .iter()
                .all(|b| *b == 0xAA)
    })
}
