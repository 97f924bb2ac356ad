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
//! - `graph --seconds S`: the same through a CUDA graph of 10 kernels.
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
            let start = Instant::now();
            let mut n: u64 = 0;
            while start.elapsed().as_secs_f64() < seconds {
                step();
                n += 1;
            }
            // SAFETY: our stream.
            d.check("cuStreamSynchronize", unsafe { sync(stream) });
            let secs = start.elapsed().as_secs_f64();
            println!(
                "launches_per_s={:.1} kernels_per_s={:.1} launches={n} seconds={secs:.3}",
                n as f64 / secs,
                n as f64 * per_launch / secs
            );
        }
        _ => fail(
            "usage: tessera-vgpu-probe oom [--max BYTES] [--hold S] | meminfo | launch --seconds S [--empty] | graph --seconds S",
        ),
    }
}
