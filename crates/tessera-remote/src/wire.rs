//! The wire protocol between a remote GPU's client (the workload's `libcuda.so.1`) and its server.
//!
//! One ordered TCP stream per client process. A request is `len: u32, op: u16, flags: u16`
//! followed by `len` bytes of fields (little-endian); a reply is `len: u32, status: u32` followed
//! by `len` bytes. Only requests that need an answer get one ([`Op::wants_reply`], or any request
//! with [`REPLY`] set), in the order they were sent, so a client can send calls that only return a
//! status without waiting, and match replies to requests by order alone.

use std::io::{self, Read, Write};

/// Opens the stream in both directions (and names the protocol's version).
pub const MAGIC: &[u8; 8] = b"TSRGPU01";
/// A request flag: answer this request even if its op is one that is not answered.
pub const REPLY: u16 = 1;
/// Large copies travel in pieces of this size, each copied on the GPU node as it arrives (and
/// sent back as it is read), so the network and the device work at once.
pub const CHUNK: usize = 1 << 20;
/// No frame may be larger (a chunk, a module image, a kernel's parameters).
pub const MAX_FRAME: usize = 256 << 20;

/// CUDA driver status codes the protocol itself produces.
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const INVALID_VALUE: u32 = 1;
    pub const OUT_OF_MEMORY: u32 = 2;
    pub const NOT_INITIALIZED: u32 = 3;
    /// What every call returns once the GPU node cannot be reached: "the device is unavailable".
    pub const DEVICE_UNAVAILABLE: u32 = 46;
    pub const NO_DEVICE: u32 = 100;
    pub const INVALID_IMAGE: u32 = 200;
    pub const INVALID_CONTEXT: u32 = 201;
    pub const INVALID_HANDLE: u32 = 400;
    pub const NOT_FOUND: u32 = 500;
    pub const NOT_READY: u32 = 600;
    pub const NOT_SUPPORTED: u32 = 801;
}

macro_rules! ops {
    ($($(#[$doc:meta])* $name:ident = $code:literal, $reply:literal;)*) => {
        /// A request's operation.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u16)]
        pub enum Op { $($(#[$doc])* $name = $code,)* }

        impl Op {
            pub fn from_code(code: u16) -> Option<Op> {
                match code { $($code => Some(Op::$name),)* _ => None }
            }

            /// Whether the client waits for this op's answer. The rest (launches, copies to the
            /// device, frees, records) only return a status, which the server keeps and reports at
            /// the next synchronizing call, as CUDA reports errors of asynchronous work.
            pub fn wants_reply(self) -> bool {
                match self { $(Op::$name => $reply,)* }
            }
        }
    };
}

ops! {
    /// kind (0 plain, 1 managed, 2 pitch, 3 async, 4 default pool), bytes, a, b → ptr, pitch.
    MemAlloc = 10, true;
    /// → free, total (of the slice, as the GPU node's slice library reports them).
    MemGetInfo = 11, true;
    /// src, bytes, stream, asynchronous → the bytes, one reply per [`CHUNK`].
    MemcpyDtoH = 12, true;
    /// hash → SUCCESS when the server holds that image, NOT_FOUND when it must be sent.
    ModuleHas = 13, true;
    /// handle, hash, image (empty: the one the server holds by that hash).
    ModuleLoad = 14, true;
    /// handle, module, name → count, (offset, size) of each parameter.
    ModuleGetFunction = 15, true;
    StreamSynchronize = 16, true;
    StreamQuery = 17, true;
    CtxSynchronize = 18, true;
    EventSynchronize = 19, true;
    EventQuery = 20, true;
    /// start, end → milliseconds as f32 bits.
    EventElapsedTime = 21, true;
    /// stream, graph handle.
    StreamEndCapture = 22, true;
    /// exec handle, graph, flags.
    GraphInstantiate = 23, true;
    /// → bytes.
    DeviceTotalMem = 24, true;
    /// Answered once every request before it has been run: the client's window, which keeps it
    /// from running further ahead of the device than a driver's queue would let it.
    Marker = 25, true;
    MemFree = 40, false;
    MemFreeAsync = 41, false;
    /// dst, stream, asynchronous, bytes.
    MemcpyHtoD = 42, false;
    /// dst, src, bytes, stream, asynchronous.
    MemcpyDtoD = 43, false;
    /// dst, width (1 or 4), value, count, stream, asynchronous.
    Memset = 44, false;
    /// handle, flags, priority.
    StreamCreate = 45, false;
    StreamDestroy = 46, false;
    /// handle, flags.
    EventCreate = 47, false;
    EventDestroy = 48, false;
    /// event, stream.
    EventRecord = 49, false;
    /// stream, event, flags.
    StreamWaitEvent = 50, false;
    /// function, grid[3], block[3], shared, stream, kind, attributes, parameters, as extra.
    Launch = 51, false;
    /// stream, mode.
    StreamBeginCapture = 52, false;
    /// exec, stream.
    GraphLaunch = 53, false;
    GraphDestroy = 54, false;
    GraphExecDestroy = 55, false;
    ModuleUnload = 56, false;
}

/// A request or reply being built: fields appended after a header that [`Frame::finish`] fills.
pub struct Frame {
    pub buf: Vec<u8>,
}

impl Frame {
    /// A request for `op`.
    pub fn request(buf: Vec<u8>, op: Op, flags: u16) -> Frame {
        let mut f = Frame { buf };
        f.buf.clear();
        f.buf.extend_from_slice(&[0; 4]);
        f.buf.extend_from_slice(&(op as u16).to_le_bytes());
        f.buf.extend_from_slice(&flags.to_le_bytes());
        f
    }

    /// A reply with `status`.
    pub fn reply(status: u32) -> Frame {
        let mut f = Frame {
            buf: Vec::with_capacity(64),
        };
        f.buf.extend_from_slice(&[0; 4]);
        f.buf.extend_from_slice(&status.to_le_bytes());
        f
    }

    pub fn u32(&mut self, v: u32) -> &mut Frame {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Frame {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Frame {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }

    /// Fills in the length, counting `trailing` bytes the caller writes after the frame itself
    /// (a copy's data, sent from the program's own buffer without copying it here first).
    pub fn finish(&mut self, trailing: usize) -> &[u8] {
        let len = (self.buf.len() - 8 + trailing) as u32;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        &self.buf
    }
}

/// A frame's fields, read in order; a short or malformed frame is an error, never a panic.
pub struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Fields<'a> {
        Fields { data }
    }

    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.data.len() < n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame ended before its fields did",
            ));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    pub fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }

    pub fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }

    pub fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// Whatever is left (a copy's data).
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Reads one frame's header: (length of what follows, op or status, flags).
pub fn read_header(r: &mut impl Read) -> io::Result<(usize, u32, u16)> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {MAX_FRAME}"),
        ));
    }
    let word = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    Ok((len, word, (word >> 16) as u16))
}

/// Reads `len` bytes into `buf` (reused between frames).
pub fn read_body(r: &mut impl Read, len: usize, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)
}

/// Writes a finished frame and, after it, `trailing` bytes from the caller's buffer.
pub fn write_frame(w: &mut impl Write, frame: &[u8], trailing: &[u8]) -> io::Result<()> {
    if trailing.is_empty() {
        return w.write_all(frame);
    }
    // One system call for both where the kernel takes them (a launch is one segment, not two).
    let mut bufs = [io::IoSlice::new(frame), io::IoSlice::new(trailing)];
    let mut slices: &mut [io::IoSlice] = &mut bufs;
    while !slices.is_empty() {
        let n = w.write_vectored(slices)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// What the server tells a client when it attaches: the device, answered from a cache after.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub uuid: [u8; 16],
    /// The slice's memory, as the slice library on the GPU node reports it.
    pub total_memory: u64,
    pub driver_version: u32,
    /// Every attribute the device answered: (attribute, value).
    pub attributes: Vec<(u32, i32)>,
}

impl DeviceInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut f = Frame::reply(status::SUCCESS);
        f.bytes(self.name.as_bytes())
            .bytes(&self.uuid)
            .u64(self.total_memory)
            .u32(self.driver_version)
            .u32(self.attributes.len() as u32);
        for (a, v) in &self.attributes {
            f.u32(*a).u32(*v as u32);
        }
        f.finish(0);
        f.buf
    }

    pub fn decode(body: &[u8]) -> io::Result<DeviceInfo> {
        let mut f = Fields::new(body);
        let name = String::from_utf8_lossy(f.bytes()?).into_owned();
        let uuid = f.bytes()?.try_into().unwrap_or([0; 16]);
        let total_memory = f.u64()?;
        let driver_version = f.u32()?;
        let n = f.u32()? as usize;
        let mut attributes = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            attributes.push((f.u32()?, f.u32()? as i32));
        }
        Ok(DeviceInfo {
            name,
            uuid,
            total_memory,
            driver_version,
            attributes,
        })
    }
}

/// How a module image is known on the server: SHA-256 of its bytes.
pub fn image_hash(image: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(image).into()
}

/// The length of a module image given only its address, as `cuModuleLoadData` receives it: an
/// ELF cubin's extent from its headers, a fatbin's from its header, PTX text up to its NUL.
///
/// # Safety
/// `image` points to a valid image of one of those kinds, as the driver API requires.
pub unsafe fn image_len(image: *const u8) -> usize {
    // SAFETY: every image is at least a few bytes long; each read below stays inside the extent
    // the image's own header declares.
    unsafe {
        let head = std::slice::from_raw_parts(image, 4);
        if head == b"\x7fELF" {
            let h = std::slice::from_raw_parts(image, 64);
            let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]) as usize;
            let u64_at =
                |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8])) as usize;
            let (phoff, shoff) = (u64_at(0x20), u64_at(0x28));
            let (phsize, phnum, shsize, shnum) =
                (u16_at(0x36), u16_at(0x38), u16_at(0x3a), u16_at(0x3c));
            let mut end = (phoff + phsize * phnum).max(shoff + shsize * shnum).max(64);
            for i in 0..shnum {
                let sh = std::slice::from_raw_parts(image.add(shoff + i * shsize), shsize.min(64));
                let kind = u32::from_le_bytes(sh[4..8].try_into().unwrap_or([0; 4]));
                let offset =
                    u64::from_le_bytes(sh[0x18..0x20].try_into().unwrap_or([0; 8])) as usize;
                let size = u64::from_le_bytes(sh[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
                const SHT_NOBITS: u32 = 8;
                if kind != SHT_NOBITS {
                    end = end.max(offset + size);
                }
            }
            return end;
        }
        if u32::from_le_bytes([head[0], head[1], head[2], head[3]]) == 0xBA55_ED50 {
            let h = std::slice::from_raw_parts(image, 16);
            let header = u16::from_le_bytes([h[6], h[7]]) as usize;
            let body = u64::from_le_bytes(h[8..16].try_into().unwrap_or([0; 8])) as usize;
            return header + body;
        }
        std::ffi::CStr::from_ptr(image.cast()).to_bytes().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_field_by_field() {
        let mut f = Frame::request(Vec::new(), Op::Launch, REPLY);
        f.u64(7).u32(3).bytes(b"abc");
        let data = f.finish(0).to_vec();
        let (len, word, flags) = read_header(&mut &data[..]).unwrap();
        assert_eq!(len, data.len() - 8);
        assert_eq!(Op::from_code(word as u16), Some(Op::Launch));
        assert_eq!(flags, REPLY);
        let mut r = Fields::new(&data[8..]);
        assert_eq!((r.u64().unwrap(), r.u32().unwrap()), (7, 3));
        assert_eq!(r.bytes().unwrap(), b"abc");
        assert!(r.u32().is_err(), "a field past the end is an error");
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_it_is_read() {
        let mut h = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        let e = read_header(&mut &h[..]).unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
    }

    #[test]
    fn device_info_round_trips() {
        let info = DeviceInfo {
            name: "H100".into(),
            uuid: [9; 16],
            total_memory: 1 << 34,
            driver_version: 12080,
            attributes: vec![(1, 1024), (16, 132)],
        };
        let data = info.encode();
        assert_eq!(DeviceInfo::decode(&data[8..]).unwrap(), info);
    }

    #[test]
    fn image_lengths_come_from_each_kind_of_header() {
        let ptx = b".version 7.0\n.target sm_70\0garbage";
        // SAFETY: a NUL-terminated text.
        assert_eq!(unsafe { image_len(ptx.as_ptr()) }, 26);
        let mut fatbin = [0u8; 16 + 100 + 50];
        fatbin[..4].copy_from_slice(&0xBA55_ED50u32.to_le_bytes());
        fatbin[6..8].copy_from_slice(&16u16.to_le_bytes());
        fatbin[8..16].copy_from_slice(&100u64.to_le_bytes());
        // SAFETY: a fatbin header declaring 16 + 100 bytes, inside the buffer.
        assert_eq!(unsafe { image_len(fatbin.as_ptr()) }, 116);
    }
}
