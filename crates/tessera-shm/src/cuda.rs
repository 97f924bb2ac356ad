//! The CUDA and NVML structures accounting reads and reports: how many bytes arrays and
//! mipmapped arrays take, from the descriptors the driver API receives, and NVML's memory info,
//! which both the slice library and the simulated driver fill.

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
