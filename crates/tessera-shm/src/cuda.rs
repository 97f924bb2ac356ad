//! The CUDA and NVML structures accounting reads and reports: how many bytes arrays and
//! mipmapped arrays take, from the descriptors the driver API receives, and NVML's memory info,
//! which both the slice library and the simulated driver fill; and a 2D copy's rows, which the
//! simulated driver and the remote client both copy one by one.

use std::ffi::c_uint;

/// CUDA_ARRAY_DESCRIPTOR.
#[repr(C)]
pub struct ArrayDescriptor {
    pub width: usize,
    pub height: usize,
    pub format: c_uint,
    pub channels: c_uint,
}

/// CUDA_ARRAY3D_DESCRIPTOR.
#[repr(C)]
pub struct Array3dDescriptor {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: c_uint,
    pub channels: c_uint,
    pub flags: c_uint,
}

/// Bytes per element of a CUarray_format, times its channels.
pub fn element_bytes(format: c_uint, channels: c_uint) -> u64 {
    let each = match format {
        0x01 | 0x08 => 1,        // unsigned and signed 8-bit
        0x02 | 0x09 | 0x10 => 2, // 16-bit integers and half floats
        _ => 4,
    };
    each * u64::from(channels.max(1))
}

/// Bytes of a 2D array.
pub fn array_bytes(d: &ArrayDescriptor) -> u64 {
    d.width.max(1) as u64 * d.height.max(1) as u64 * element_bytes(d.format, d.channels)
}

/// Bytes of a 3D array with `levels` mip levels, each half the last in every dimension.
pub fn array3d_bytes(d: &Array3dDescriptor, levels: u32) -> u64 {
    let (mut w, mut h, mut z, mut total) = (d.width.max(1), d.height.max(1), d.depth.max(1), 0);
    for _ in 0..levels.max(1) {
        total += w as u64 * h as u64 * z as u64 * element_bytes(d.format, d.channels);
        (w, h, z) = ((w / 2).max(1), (h / 2).max(1), (z / 2).max(1));
    }
    total
}

/// nvmlMemory_t.
#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// nvmlMemory_v2_t (its `version` is the caller's).
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

impl NvmlMemory {
    /// Reports `total` bytes of which `used` are taken.
    pub fn set(&mut self, total: u64, used: u64) {
        self.total = total;
        self.used = used.min(total);
        self.free = total - self.used;
    }
}

impl NvmlMemoryV2 {
    /// Reports `total` bytes of which `used` are taken (none reserved).
    pub fn set(&mut self, total: u64, used: u64) {
        self.total = total;
        self.reserved = 0;
        self.used = used.min(total);
        self.free = total - self.used;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_mip_levels_are_sized_by_format_channels_and_levels() {
        let d = ArrayDescriptor {
            width: 1024,
            height: 512,
            format: 0x20,
            channels: 4,
        };
        assert_eq!(array_bytes(&d), 1024 * 512 * 16);
        let m = Array3dDescriptor {
            width: 8,
            height: 8,
            depth: 1,
            format: 0x01,
            channels: 1,
            flags: 0,
        };
        // 64 + 16 + 4 + 1 bytes over four levels; more levels than sizes stay at 1.
        assert_eq!(array3d_bytes(&m, 4), 85);
        assert_eq!(array3d_bytes(&m, 5), 86);
    }
}

/// `CUDA_MEMCPY2D`: a copy of `height` rows of `width_in_bytes` between two pitched regions.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Memcpy2d {
    pub src_x_in_bytes: usize,
    pub src_y: usize,
    pub src_memory_type: u32,
    pub src_host: *const std::ffi::c_void,
    pub src_device: u64,
    pub src_array: *mut std::ffi::c_void,
    pub src_pitch: usize,
    pub dst_x_in_bytes: usize,
    pub dst_y: usize,
    pub dst_memory_type: u32,
    pub dst_host: *mut std::ffi::c_void,
    pub dst_device: u64,
    pub dst_array: *mut std::ffi::c_void,
    pub dst_pitch: usize,
    pub width_in_bytes: usize,
    pub height: usize,
}

/// `CUmemorytype`: host, device, array, unified.
pub const MEMORY_HOST: u32 = 1;
pub const MEMORY_DEVICE: u32 = 2;
pub const MEMORY_UNIFIED: u32 = 4;

impl Memcpy2d {
    /// Each row's (destination, source) address, with whether each is on the device; `None`
    /// for arrays (not forwarded) or a row wider than its pitch.
    pub fn rows(&self) -> Option<Vec<(u64, bool, u64, bool)>> {
        let side = |kind: u32, host: u64, device: u64| match kind {
            MEMORY_HOST => Some((host, false)),
            MEMORY_DEVICE => Some((device, true)),
            // Unified addresses: the caller tells which side by its own allocations.
            MEMORY_UNIFIED => Some((device, true)),
            _ => None,
        };
        let (src, src_dev) = side(self.src_memory_type, self.src_host as u64, self.src_device)?;
        let (dst, dst_dev) = side(self.dst_memory_type, self.dst_host as u64, self.dst_device)?;
        if self.height > 1
            && (self.width_in_bytes > self.src_pitch || self.width_in_bytes > self.dst_pitch)
        {
            return None;
        }
        Some(
            (0..self.height)
                .map(|row| {
                    let at = |base: u64, x: usize, y: usize, pitch: usize| {
                        base + (x + (y + row) * pitch) as u64
                    };
                    (
                        at(dst, self.dst_x_in_bytes, self.dst_y, self.dst_pitch),
                        dst_dev,
                        at(src, self.src_x_in_bytes, self.src_y, self.src_pitch),
                        src_dev,
                    )
                })
                .collect(),
        )
    }
}

/// `CUlaunchConfig`.
#[repr(C)]
pub struct LaunchConfig {
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
    pub shared: c_uint,
    pub stream: *mut std::ffi::c_void,
    pub attrs: *mut std::ffi::c_void,
    pub num_attrs: c_uint,
}

/// `sizeof(CUlaunchAttribute)`: an id padded to 8 bytes and a 64-byte value.
pub const LAUNCH_ATTRIBUTE_BYTES: usize = 72;

/// What `cuGetProcAddress(symbol, version, flags)` answers from a library's own exports: the
/// newest variant of `symbol` (`_v3`, `_v2`, plain) that `export` has for `version`, and with
/// the per-thread default stream flag the `_ptsz`/`_ptds` variant where one exists.
pub fn proc_address<P>(
    symbol: &str,
    version: i32,
    flags: u64,
    export: impl Fn(&str) -> Option<P>,
) -> Option<P> {
    const PER_THREAD_DEFAULT_STREAM: u64 = 2;
    let mut candidates = Vec::new();
    for suffix in ["_v3", "_v2", ""] {
        let base = format!("{symbol}{suffix}");
        if flags & PER_THREAD_DEFAULT_STREAM != 0 {
            candidates.push(format!("{base}_ptsz"));
            candidates.push(format!("{base}_ptds"));
        }
        candidates.push(base);
    }
    // Versioned names are only returned to callers built for a version that has them.
    candidates
        .iter()
        .filter(|c| version >= 3020 || !c.contains("_v"))
        .find_map(|c| export(c))
}
