//! The GPU node's driver, as the server reaches it: `dlopen("libcuda.so.1")` and `dlsym`, the way
//! any CUDA program does, so that the slice library the agent preloads into the server sits on
//! every call (the remote slice's cap and share are enforced by the same code as local slices).

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};

pub type CUresult = c_uint;
pub type Ptr = *mut c_void;

macro_rules! driver {
    ($($name:ident: fn($($ty:ty),*);)*) => {
        /// The driver's functions this server calls; `None` where the driver has none.
        #[allow(non_snake_case)]
        pub struct Driver {
            $(pub $name: Option<unsafe extern "C" fn($($ty),*) -> CUresult>,)*
        }

        impl Driver {
            fn resolve(lib: Ptr) -> Driver {
                Driver {
                    $($name: {
                        let name = CString::new(stringify!($name)).unwrap_or_default();
                        // SAFETY: a valid handle and a NUL-terminated name.
                        let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
                        // SAFETY: the driver's symbol of that name has this C signature.
                        (!p.is_null()).then(|| unsafe {
                            std::mem::transmute::<Ptr, unsafe extern "C" fn($($ty),*) -> CUresult>(p)
                        })
                    },)*
                }
            }
        }
    };
}

driver! {
    cuInit: fn(c_uint);
    cuDriverGetVersion: fn(*mut c_int);
    cuDeviceGet: fn(*mut c_int, c_int);
    cuDeviceGetName: fn(*mut c_char, c_int, c_int);
    cuDeviceGetUuid: fn(*mut [u8; 16], c_int);
    cuDeviceGetAttribute: fn(*mut c_int, c_int, c_int);
    cuDeviceTotalMem_v2: fn(*mut usize, c_int);
    cuDevicePrimaryCtxRetain: fn(*mut Ptr, c_int);
    cuCtxSetCurrent: fn(Ptr);
    cuCtxSynchronize: fn();
    cuMemAlloc_v2: fn(*mut u64, usize);
    cuMemAllocManaged: fn(*mut u64, usize, c_uint);
    cuMemAllocPitch_v2: fn(*mut u64, *mut usize, usize, usize, c_uint);
    cuMemAllocAsync: fn(*mut u64, usize, Ptr);
    cuMemAllocFromPoolAsync: fn(*mut u64, usize, Ptr, Ptr);
    cuDeviceGetDefaultMemPool: fn(*mut Ptr, c_int);
    cuMemFree_v2: fn(u64);
    cuMemFreeAsync: fn(u64, Ptr);
    cuMemGetInfo_v2: fn(*mut usize, *mut usize);
    cuMemcpyHtoD_v2: fn(u64, *const c_void, usize);
    cuMemcpyHtoDAsync_v2: fn(u64, *const c_void, usize, Ptr);
    cuMemcpyDtoH_v2: fn(Ptr, u64, usize);
    cuMemcpyDtoD_v2: fn(u64, u64, usize);
    cuMemcpyDtoDAsync_v2: fn(u64, u64, usize, Ptr);
    cuMemsetD8_v2: fn(u64, u8, usize);
    cuMemsetD32_v2: fn(u64, c_uint, usize);
    cuMemsetD8Async: fn(u64, u8, usize, Ptr);
    cuMemsetD32Async: fn(u64, c_uint, usize, Ptr);
    cuModuleLoadData: fn(*mut Ptr, *const c_void);
    cuModuleGetFunction: fn(*mut Ptr, Ptr, *const c_char);
    cuModuleUnload: fn(Ptr);
    cuFuncGetParamInfo: fn(Ptr, usize, *mut usize, *mut usize);
    cuStreamCreateWithPriority: fn(*mut Ptr, c_uint, c_int);
    cuStreamDestroy_v2: fn(Ptr);
    cuStreamSynchronize: fn(Ptr);
    cuStreamQuery: fn(Ptr);
    cuStreamWaitEvent: fn(Ptr, Ptr, c_uint);
    cuEventCreate: fn(*mut Ptr, c_uint);
    cuEventDestroy_v2: fn(Ptr);
    cuEventRecord: fn(Ptr, Ptr);
    cuEventQuery: fn(Ptr);
    cuEventSynchronize: fn(Ptr);
    cuEventElapsedTime: fn(*mut f32, Ptr, Ptr);
    cuLaunchKernel: fn(Ptr, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, Ptr, *mut Ptr, *mut Ptr);
    cuLaunchCooperativeKernel: fn(Ptr, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, Ptr, *mut Ptr);
    cuLaunchKernelEx: fn(*const LaunchConfig, Ptr, *mut Ptr, *mut Ptr);
    cuStreamBeginCapture_v2: fn(Ptr, c_uint);
    cuStreamEndCapture: fn(Ptr, *mut Ptr);
    cuGraphInstantiateWithFlags: fn(*mut Ptr, Ptr, u64);
    cuGraphLaunch: fn(Ptr, Ptr);
    cuGraphDestroy: fn(Ptr);
    cuGraphExecDestroy: fn(Ptr);
}

pub use tessera_shm::cuda::LaunchConfig;

/// Calls a driver function, or answers `CUDA_ERROR_NOT_FOUND` where the driver has none. Every
/// use is an FFI call whose arguments are the server's own buffers and handles; the arguments
/// are plain values (no unsafe operation hides in them), so they may expand inside the block.
macro_rules! call {
    ($d:expr, $name:ident($($arg:expr),*)) => {
        match $d.$name {
            // SAFETY: the driver's function with arguments the caller checked.
            Some(f) => unsafe { f($($arg),*) },
            None => $crate::wire::status::NOT_FOUND,
        }
    };
}
pub(crate) use call;

impl Driver {
    /// The driver on this machine's library path (or the error dlopen gave).
    pub fn open() -> Result<&'static Driver, String> {
        // SAFETY: dlopen of the driver by its soname.
        let lib = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW) };
        if lib.is_null() {
            // SAFETY: dlerror returns null or a NUL-terminated message.
            let why = unsafe { libc::dlerror() };
            let why = if why.is_null() {
                "unknown".into()
            } else {
                // SAFETY: checked non-null, NUL-terminated.
                unsafe { CStr::from_ptr(why) }
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(format!("libcuda.so.1 cannot be loaded: {why}"));
        }
        Ok(Box::leak(Box::new(Driver::resolve(lib))))
    }
}
