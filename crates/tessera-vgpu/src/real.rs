//! Finding the real driver: glibc's own `dlsym` (we export one of our own), and the libraries.

use std::ffi::{CStr, c_char, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);
static LIBCUDA: AtomicUsize = AtomicUsize::new(0);
static LIBNVML: AtomicUsize = AtomicUsize::new(0);

/// glibc's `dlsym`, found with `dlvsym` (which we do not override), so that our own `dlsym`
/// can pass through to it.
pub fn dlsym() -> DlsymFn {
    let mut p = REAL_DLSYM.load(Ordering::Acquire);
    if p == 0 {
        for version in [c"GLIBC_2.34", c"GLIBC_2.2.5"] {
            // SAFETY: dlvsym with RTLD_NEXT and static NUL-terminated names.
            p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) }
                as usize;
            if p != 0 {
                break;
            }
        }
        if p == 0 {
            // No versioned dlsym: nothing can be resolved; say so and stop rather than recurse.
            eprintln!("tessera-vgpu: cannot find glibc's dlsym; stopping");
            std::process::abort();
        }
        REAL_DLSYM.store(p, Ordering::Release);
    }
    // SAFETY: p is glibc's dlsym, whose signature this is.
    unsafe { std::mem::transmute::<usize, DlsymFn>(p) }
}

fn open(cache: &AtomicUsize, name: &CStr) -> *mut c_void {
    let mut h = cache.load(Ordering::Acquire);
    if h == 0 {
        // SAFETY: dlopen of a library by its soname.
        h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) } as usize;
        cache.store(h, Ordering::Release);
    }
    h as *mut c_void
}

/// The real driver's `name`, or 0.
pub fn cuda(name: &CStr) -> usize {
    let h = open(&LIBCUDA, c"libcuda.so.1");
    if h.is_null() {
        return 0;
    }
    // SAFETY: a valid handle and a NUL-terminated name.
    unsafe { dlsym()(h, name.as_ptr()) as usize }
}

/// The real NVML's `name`, or 0.
pub fn nvml(name: &CStr) -> usize {
    let h = open(&LIBNVML, c"libnvidia-ml.so.1");
    if h.is_null() {
        return 0;
    }
    // SAFETY: a valid handle and a NUL-terminated name.
    unsafe { dlsym()(h, name.as_ptr()) as usize }
}

/// `real!(cuda, cuMemAlloc_v2 as fn(*mut u64, usize) -> u32)`: the real function, resolved once
/// per call site and then read with one atomic load.
#[macro_export]
macro_rules! real {
    ($lib:ident, $name:ident as $ty:ty) => {{
        static SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut p = SLOT.load(std::sync::atomic::Ordering::Relaxed);
        if p == 0 {
            p = $crate::real::$lib(
                // SAFETY: a static NUL-terminated name.
                unsafe {
                    std::ffi::CStr::from_bytes_with_nul_unchecked(
                        concat!(stringify!($name), "\0").as_bytes(),
                    )
                },
            );
            SLOT.store(p, std::sync::atomic::Ordering::Relaxed);
        }
        if p == 0 {
            None
        } else {
            // SAFETY: the symbol of that name has this C signature.
            Some(unsafe { std::mem::transmute::<usize, $ty>(p) })
        }
    }};
}
