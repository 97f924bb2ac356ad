//! The workload's side of a remote GPU: a `libcuda.so.1` that forwards the driver API to a slice
//! of a GPU on another node (the server of `tessera-remote`), so that an unmodified CUDA program
//! runs where there is no GPU.
//!
//! What makes it fast enough to use: calls that only return a status (launches, copies to the
//! device, memsets, frees, event records, stream waits, graph launches) are sent without waiting
//! for an answer, their errors surfacing at the next synchronizing call as CUDA reports errors of
//! asynchronous work; streams, events, modules, functions and graphs are numbered here and mapped
//! on the server, so creating one costs no round trip; the device's name, memory and attributes
//! come from a cache filled at attach; large copies travel in pipelined chunks; a module image
//! crosses once and is cached on the server by its hash. What must wait: allocations (a program
//! acts on their failure, and their addresses go into kernel parameters, so they are the device's
//! real addresses), copies back to the host, synchronizations and queries.
//!
//! Configuration (set by the agent): `TESSERA_REMOTE_GPU` (the server's `ADDR:PORT`),
//! `TESSERA_REMOTE_SECRET_FILE` (the attachment's secret); over TLS, `TESSERA_REMOTE_TLS_CA`
//! (the certificates to trust, PEM) and, when the certificate names the server otherwise than
//! the address does, `TESSERA_REMOTE_TLS_NAME`. `TESSERA_REMOTE_WAIT_EVERY_CALL=1`
//! waits for every call's answer: the naive per-call RPC that benchmarks compare against.
//! Once the server cannot be reached, every call fails with `CUDA_ERROR_DEVICE_UNAVAILABLE`
//! (within seconds: the connection uses keepalive and a send timeout), never hangs.
//! `TESSERA_REMOTE_TRACE=1` says on stderr which entry points a program (or the CUDA runtime)
//! asked for that this library does not forward, and which export tables it asked for: what a
//! new runtime needs, found on a real driver.

#![allow(non_snake_case, clippy::missing_safety_doc, clippy::too_many_arguments)]

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::io::{self, BufReader, Read};
use std::net::TcpStream;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use tessera_remote::server::Duplex;
use tessera_shm::cuda::{
    LAUNCH_ATTRIBUTE_BYTES, LaunchConfig, MEMORY_UNIFIED, Memcpy2d, NvmlMemory, NvmlMemoryV2,
};

use tessera_remote::wire::{self, CHUNK, DeviceInfo, Fields, Frame, Op, REPLY, status};

pub type CUresult = c_uint;
type Ptr = *mut c_void;

const SUCCESS: CUresult = status::SUCCESS;
/// Replies to asynchronous copies into pinned memory may wait in the socket up to this much
/// before the next call reads them.
const MAX_PENDING_BYTES: usize = 64 << 20;
/// A marker goes after this many unanswered calls, or this many bytes of them...
const WINDOW_CALLS: u32 = 256;
const WINDOW_BYTES: usize = 8 << 20;
/// ...and the client waits once this many markers are unanswered: it runs at most ~750 calls
/// ahead of the device, as a driver's queue lets a program run ahead of a local GPU.
const WINDOW_MARKERS: usize = 3;
/// In a burst of calls (one within [`FLUSH_AFTER`] of the last send), calls that are not waited
/// for gather and leave together (a system call per launch costs as much as a short kernel): at
/// a synchronizing call, once this many bytes wait, or [`FLUSH_AFTER`] after the burst's last
/// call, so the device never idles long behind a buffer. A call after a pause leaves at once.
const FLUSH_BYTES: usize = 16 << 10;
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_micros(50);
/// A copy's data larger than this leaves from the program's own buffer, not through the batch.
const INLINE_BYTES: usize = 64 << 10;
/// The one context of an attachment (a remote slice is one device, its primary context).
const CONTEXT: usize = 0x7e55_c000_0000;

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

/// A reply the client did not wait for, read when a later call reads the stream.
enum Pending {
    /// An asynchronous copy into pinned host memory.
    Copy { dst: usize, len: usize },
    /// A window marker.
    Marker,
}

struct Conn {
    stream: Box<dyn Duplex>,
    reader: BufReader<Box<dyn Duplex>>,
    buf: Vec<u8>,
    /// Calls not yet sent (see [`FLUSH_BYTES`]), and when anything was last sent.
    out: Vec<u8>,
    last_sent: std::time::Instant,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    /// Unanswered calls and their bytes since the last marker; markers unanswered.
    since_marker: (u32, usize),
    markers: usize,
    /// An error of a pending copy, reported at the next synchronizing call.
    deferred: Option<CUresult>,
    /// Why the server cannot be reached, once it cannot.
    lost: Option<String>,
}

struct Remote {
    conn: Mutex<Conn>,
    /// Set while calls gather; the flusher thread, unparked when it is set.
    gathering: AtomicBool,
    flusher: OnceLock<std::thread::Thread>,
    info: DeviceInfo,
    addr: String,
    naive: bool,
    next_handle: AtomicU64,
    /// Each function's parameter layout: (offset, size).
    functions: Mutex<HashMap<u64, Vec<(usize, usize)>>>,
    /// Device allocations (start → bytes), to tell device from host pointers in `cuMemcpy`.
    device: Mutex<BTreeMap<u64, u64>>,
    /// Pinned host memory (start → bytes): copies back into it may complete later.
    pinned: Mutex<BTreeMap<u64, u64>>,
}

static REMOTE: OnceLock<Result<Remote, CUresult>> = OnceLock::new();

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

fn say(msg: &str) {
    eprintln!("tessera-remote-cuda: {msg}");
}

/// How long a refused connection is tried again: the two halves of an attachment start on
/// their nodes at about the same time, and the server may not listen yet.
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to `addr`, again while it is refused (a server starting), for [`CONNECT_WAIT`].
fn connect_patiently(addr: &str) -> io::Result<TcpStream> {
    let until = std::time::Instant::now() + CONNECT_WAIT;
    let mut pause = std::time::Duration::from_millis(20);
    loop {
        match TcpStream::connect(addr) {
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < until =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

fn attach() -> Result<Remote, CUresult> {
    let Ok(addr) = std::env::var("TESSERA_REMOTE_GPU") else {
        say(
            "TESSERA_REMOTE_GPU is not set: this program was given a remote GPU library without an attachment",
        );
        return Err(status::NO_DEVICE);
    };
    let secret = match std::env::var_os("TESSERA_REMOTE_SECRET_FILE") {
        Some(path) => tessera_remote::read_secret(std::path::Path::new(&path)),
        None => Err("TESSERA_REMOTE_SECRET_FILE is not set".into()),
    };
    let secret = secret.map_err(|e| {
        say(&e);
        status::NO_DEVICE
    })?;
    let tls = match std::env::var_os("TESSERA_REMOTE_TLS_CA") {
        None => None,
        Some(ca) => {
            let name = std::env::var("TESSERA_REMOTE_TLS_NAME").ok();
            let config = tessera_remote::tls::client_config(std::path::Path::new(&ca))
                .and_then(|c| Ok((c, tessera_remote::tls::server_name(&addr, name.as_deref())?)));
            match config {
                Ok(c) => Some(c),
                Err(e) => {
                    say(&format!("TESSERA_REMOTE_TLS_CA: {e}"));
                    return Err(status::NO_DEVICE);
                }
            }
        }
    };
    let connect = || -> io::Result<(Box<dyn Duplex>, DeviceInfo)> {
        let tcp = connect_patiently(&addr)?;
        tessera_remote::server::detect_dead_peers(&tcp, true);
        let mut s: Box<dyn Duplex> = match &tls {
            Some((config, name)) => Box::new(
                tessera_remote::tls::connect(tcp, config.clone(), name.clone())
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))?,
            ),
            None => Box::new(tcp),
        };
        s.read_timeout(Some(tessera_remote::server::HANDSHAKE_TIMEOUT))?;
        tessera_remote::auth::connect(&mut s, &secret).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                io::Error::other(format!(
                    "{e}: no greeting from the server (if it serves TLS, set TESSERA_REMOTE_TLS_CA)"
                ))
            } else {
                e
            }
        })?;
        // From here a read waits as long as the device works (opening it, a long synchronize).
        s.read_timeout(None)?;
        let (len, code, _) = wire::read_header(&mut s)?;
        let mut body = Vec::new();
        wire::read_body(&mut s, len, &mut body)?;
        if code != SUCCESS {
            return Err(io::Error::other(format!(
                "the GPU server could not open its device (CUDA error {code})"
            )));
        }
        Ok((s, DeviceInfo::decode(&body)?))
    };
    let (stream, info) = connect().map_err(|e| {
        say(&format!("cannot attach the GPU at {addr}: {e}"));
        status::NO_DEVICE
    })?;
    let reader = BufReader::with_capacity(
        256 << 10,
        stream.try_clone_box().map_err(|_| status::NO_DEVICE)?,
    );
    Ok(Remote {
        gathering: AtomicBool::new(false),
        flusher: OnceLock::new(),
        conn: Mutex::new(Conn {
            stream,
            reader,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(FLUSH_BYTES + INLINE_BYTES),
            last_sent: std::time::Instant::now(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            since_marker: (0, 0),
            markers: 0,
            deferred: None,
            lost: None,
        }),
        info,
        addr,
        naive: std::env::var("TESSERA_REMOTE_WAIT_EVERY_CALL").is_ok_and(|v| v == "1"),
        next_handle: AtomicU64::new(0x7e55_0000_1000),
        functions: Mutex::default(),
        device: Mutex::default(),
        pinned: Mutex::default(),
    })
}

fn remote() -> Result<&'static Remote, CUresult> {
    match REMOTE.get() {
        Some(Ok(r)) => Ok(r),
        Some(Err(e)) => Err(*e),
        None => Err(status::NOT_INITIALIZED),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Remote {
    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn conn(&self) -> Result<MutexGuard<'_, Conn>, CUresult> {
        let c = lock(&self.conn);
        if c.lost.is_some() {
            return Err(status::DEVICE_UNAVAILABLE);
        }
        Ok(c)
    }

    /// Sends a call that is not waited for (unless in naive mode), with `trailing` bytes after it.
    fn send(&self, op: Op, fill: impl FnOnce(&mut Frame), trailing: &[u8]) -> CUresult {
        let mut c = tri!(self.conn());
        if self.naive {
            return match c.exchange(self, op, REPLY, fill, trailing) {
                Ok(_) => SUCCESS,
                Err(code) => code,
            };
        }
        let was_empty = c.out.is_empty();
        match c
            .write(op, 0, fill, trailing)
            .and_then(|()| c.window(trailing.len()))
        {
            Ok(()) => {
                if was_empty
                    && !c.out.is_empty()
                    && !self.gathering.swap(true, Ordering::AcqRel)
                    && let Some(t) = self.flusher.get()
                {
                    t.unpark();
                }
                SUCCESS
            }
            Err(e) => c.lose(self, e),
        }
    }

    /// Sends what gathered once the program has made no call for [`FLUSH_AFTER`]. It never
    /// waits on the connection: while a call holds it (and will send what gathered itself), the
    /// flusher only looks again later, so a synchronizing program never wakes it twice.
    fn flusher(&self) {
        loop {
            std::thread::park();
            while self.gathering.load(Ordering::Acquire) {
                std::thread::sleep(FLUSH_AFTER);
                let Ok(mut c) = self.conn.try_lock() else {
                    continue;
                };
                if c.lost.is_some() {
                    return;
                }
                if let Err(e) = c.flush() {
                    c.lose(self, e);
                    return;
                }
                // Under the lock: nothing gathers until it is released.
                self.gathering.store(false, Ordering::Release);
            }
        }
    }

    /// Sends a call and waits for its answer's fields.
    fn call(&self, op: Op, fill: impl FnOnce(&mut Frame)) -> Result<Vec<u8>, CUresult> {
        let mut c = self.conn()?;
        c.exchange(self, op, 0, fill, &[])
    }
}

impl Conn {
    fn write(
        &mut self,
        op: Op,
        flags: u16,
        fill: impl FnOnce(&mut Frame),
        trailing: &[u8],
    ) -> io::Result<()> {
        let mut f = Frame::request(std::mem::take(&mut self.buf), op, flags);
        fill(&mut f);
        f.finish(trailing.len());
        let now = std::time::Instant::now();
        let r = if trailing.len() > INLINE_BYTES
            || (self.out.is_empty() && now.duration_since(self.last_sent) >= FLUSH_AFTER)
        {
            self.last_sent = now;
            self.flush()
                .and_then(|()| wire::write_frame(&mut self.stream, &f.buf, trailing))
        } else {
            self.out.extend_from_slice(&f.buf);
            self.out.extend_from_slice(trailing);
            if self.out.len() >= FLUSH_BYTES {
                self.flush()
            } else {
                Ok(())
            }
        };
        self.buf = f.buf;
        r
    }

    /// Sends the calls that gathered.
    fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let r = std::io::Write::write_all(&mut self.stream, &self.out);
        self.out.clear();
        self.last_sent = std::time::Instant::now();
        r
    }

    /// Marks the server lost (once, saying why) and answers what every call now answers.
    fn lose(&mut self, r: &Remote, e: io::Error) -> CUresult {
        if self.lost.is_none() {
            say(&format!(
                "lost the GPU server at {}: {e}; every CUDA call now fails",
                r.addr
            ));
            // Tells the agent that the program ends (if it does) for want of its device, not of
            // its own fault: its job is queued again rather than failed.
            if let Some(f) = std::env::var_os("TESSERA_REMOTE_LOST_FILE") {
                let _ = std::fs::write(f, format!("the GPU server at {} was lost: {e}", r.addr));
            }
            self.lost = Some(e.to_string());
        }
        status::DEVICE_UNAVAILABLE
    }

    /// Reads one reply's header: (length, status).
    fn header(&mut self) -> io::Result<(usize, u32)> {
        let (len, code, _) = wire::read_header(&mut self.reader)?;
        Ok((len, code))
    }

    /// Counts an unanswered call; sends a marker when the window's share is used, and waits
    /// for the oldest marker when too many are out.
    fn window(&mut self, bytes: usize) -> io::Result<()> {
        self.since_marker.0 += 1;
        self.since_marker.1 += bytes;
        if self.since_marker.0 < WINDOW_CALLS && self.since_marker.1 < WINDOW_BYTES {
            return Ok(());
        }
        self.since_marker = (0, 0);
        self.write(Op::Marker, 0, |_| {}, &[])?;
        self.pending.push_back(Pending::Marker);
        self.markers += 1;
        while self.markers > WINDOW_MARKERS {
            self.read_pending()?;
        }
        Ok(())
    }

    /// Reads the oldest reply the client did not wait for.
    fn read_pending(&mut self) -> io::Result<()> {
        self.flush()?;
        match self.pending.pop_front() {
            None => Ok(()),
            Some(Pending::Marker) => {
                self.markers -= 1;
                let (len, code) = self.header()?;
                let mut skip = Vec::new();
                wire::read_body(&mut self.reader, len, &mut skip)?;
                if code != SUCCESS {
                    self.deferred.get_or_insert(code);
                }
                Ok(())
            }
            Some(Pending::Copy { dst, len }) => {
                self.pending_bytes -= len;
                // SAFETY: the program gave this pinned range to an asynchronous copy and may not
                // touch it until it synchronizes, which is what is happening.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len) };
                if let Err(code) = self.copy_in(dst)? {
                    self.deferred.get_or_insert(code);
                }
                Ok(())
            }
        }
    }

    /// Reads every reply sent before the one about to be read.
    fn drain(&mut self) -> io::Result<()> {
        self.flush()?;
        while !self.pending.is_empty() {
            self.read_pending()?;
        }
        Ok(())
    }

    /// Reads a copy's chunks into `dst`; `Ok(Err(code))` when the server reported an error.
    fn copy_in(&mut self, dst: &mut [u8]) -> io::Result<Result<(), CUresult>> {
        let mut at = 0;
        loop {
            let (len, code) = self.header()?;
            if code != SUCCESS {
                let mut skip = Vec::new();
                wire::read_body(&mut self.reader, len, &mut skip)?;
                return Ok(Err(code));
            }
            if at + len > dst.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server sent more than was asked for",
                ));
            }
            self.reader.read_exact(&mut dst[at..at + len])?;
            at += len;
            if at >= dst.len() {
                return Ok(Ok(()));
            }
        }
    }

    /// Sends a call and reads its answer (after any earlier replies still in the stream).
    fn exchange(
        &mut self,
        r: &Remote,
        op: Op,
        flags: u16,
        fill: impl FnOnce(&mut Frame),
        trailing: &[u8],
    ) -> Result<Vec<u8>, CUresult> {
        let result = (|| -> io::Result<(u32, Vec<u8>)> {
            self.write(op, flags, fill, trailing)?;
            self.flush()?;
            self.since_marker = (0, 0);
            self.drain()?;
            let (len, code) = self.header()?;
            let mut body = Vec::new();
            wire::read_body(&mut self.reader, len, &mut body)?;
            Ok((code, body))
        })();
        match result {
            Err(e) => Err(self.lose(r, e)),
            Ok((code, body)) => {
                let synchronizing = matches!(
                    op,
                    Op::StreamSynchronize
                        | Op::StreamQuery
                        | Op::CtxSynchronize
                        | Op::EventSynchronize
                        | Op::EventQuery
                );
                match (synchronizing.then(|| self.deferred.take()).flatten(), code) {
                    (Some(deferred), _) => Err(deferred),
                    (None, SUCCESS) => Ok(body),
                    (None, code) => Err(code),
                }
            }
        }
    }
}

/// The number of a stream as the server knows it; `per_thread` for the `_ptsz` entry points,
/// whose null stream is the per-thread default stream.
fn stream_id(s: Ptr, per_thread: bool) -> u64 {
    match s as u64 {
        0 if per_thread => 2,
        h => h,
    }
}

/// [`out`] for `tri!`: the first of several outputs.
fn put<T>(p: *mut T, v: T) -> Result<(), CUresult> {
    match out(p, v) {
        SUCCESS => Ok(()),
        e => Err(e),
    }
}

fn out<T>(p: *mut T, v: T) -> CUresult {
    if p.is_null() {
        return status::INVALID_VALUE;
    }
    // SAFETY: checked non-null; the caller passes a writable output, as the API requires.
    unsafe { *p = v };
    SUCCESS
}

/// Sends a call that carries no data and is not waited for.
fn post(op: Op, fill: impl FnOnce(&mut Frame)) -> CUresult {
    match remote() {
        Ok(r) => r.send(op, fill, &[]),
        Err(code) => code,
    }
}

// ---- initialisation, devices, contexts -------------------------------------------------------

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return status::INVALID_VALUE;
    }
    match REMOTE.get_or_init(attach) {
        Ok(r) => {
            static FLUSHER: Once = Once::new();
            if !r.naive {
                FLUSHER.call_once(|| {
                    let t = std::thread::spawn(|| {
                        if let Ok(r) = remote() {
                            r.flusher();
                        }
                    });
                    let _ = r.flusher.set(t.thread().clone());
                });
            }
            SUCCESS
        }
        Err(e) => *e,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    // Before cuInit as well, like the real driver: the version this library speaks.
    let v = remote().map_or(12080, |r| r.info.driver_version as c_int);
    out(version, v)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    tri!(remote());
    out(count, 1)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut c_int, ordinal: c_int) -> CUresult {
    tri!(remote());
    if ordinal != 0 {
        return status::INVALID_VALUE;
    }
    out(dev, 0)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    let r = tri!(remote());
    if dev != 0 {
        return 101;
    }
    if name.is_null() || len <= 0 {
        return status::INVALID_VALUE;
    }
    let bytes = r.info.name.as_bytes();
    let n = bytes.len().min(len as usize - 1);
    // SAFETY: the caller's buffer holds len bytes; we write n + 1 <= len.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast(), n);
        *name.add(n) = 0;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: c_int) -> CUresult {
    let r = tri!(remote());
    if dev != 0 {
        return 101;
    }
    out(uuid, r.info.uuid)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: c_int) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuDeviceGetUuid(uuid, dev) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attr: c_int,
    dev: c_int,
) -> CUresult {
    let r = tri!(remote());
    if dev != 0 {
        return 101;
    }
    match r.info.attributes.iter().find(|(a, _)| *a as c_int == attr) {
        Some((_, v)) => out(value, *v),
        None => status::INVALID_VALUE,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    dev: c_int,
) -> CUresult {
    // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR.
    // SAFETY: forwarded contract.
    unsafe {
        tri!(match cuDeviceGetAttribute(major, 75, dev) {
            SUCCESS => Ok(()),
            e => Err(e),
        });
        cuDeviceGetAttribute(minor, 76, dev)
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    let r = tri!(remote());
    if dev != 0 {
        return 101;
    }
    out(bytes, r.info.total_memory as usize)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut Ptr, dev: c_int) -> CUresult {
    tri!(remote());
    if dev != 0 {
        return 101;
    }
    out(ctx, CONTEXT as Ptr)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_dev: c_int) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(_dev: c_int) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxSetFlags_v2(_dev: c_int, _flags: c_uint) -> CUresult {
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: c_int,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    tri!(remote());
    if dev != 0 {
        return 101;
    }
    tri!(put(flags, 0));
    out(active, 1)
}

/// A created context is the attachment's one context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(ctx: *mut Ptr, _flags: c_uint, dev: c_int) -> CUresult {
    tri!(remote());
    if dev != 0 {
        return 101;
    }
    CURRENT.with(|c| c.set(CONTEXT));
    out(ctx, CONTEXT as Ptr)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxDestroy_v2(_ctx: Ptr) -> CUresult {
    CURRENT.with(|c| c.set(0));
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSetCurrent(ctx: Ptr) -> CUresult {
    CURRENT.with(|c| c.set(ctx as usize));
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut Ptr) -> CUresult {
    out(ctx, CURRENT.with(|c| c.get()) as Ptr)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxPushCurrent_v2(ctx: Ptr) -> CUresult {
    cuCtxSetCurrent(ctx)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(ctx: *mut Ptr) -> CUresult {
    let was = CURRENT.with(|c| c.replace(0));
    if ctx.is_null() {
        SUCCESS
    } else {
        out(ctx, was as Ptr)
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    if CURRENT.with(|c| c.get()) == 0 {
        return status::INVALID_CONTEXT;
    }
    out(dev, 0)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    let r = tri!(remote());
    r.call(Op::CtxSynchronize, |_| {}).err().unwrap_or(SUCCESS)
}

// ---- memory ----------------------------------------------------------------------------------

fn alloc(kind: u32, bytes: u64, a: u64, b: u64) -> Result<(u64, u64), CUresult> {
    let r = remote()?;
    let body = r.call(Op::MemAlloc, |f| {
        f.u32(kind).u64(bytes).u64(a).u64(b);
    })?;
    let mut f = Fields::new(&body);
    let (ptr, pitch) = (
        f.u64().map_err(|_| status::INVALID_VALUE)?,
        f.u64().map_err(|_| status::INVALID_VALUE)?,
    );
    let span = if kind == 2 { pitch * a } else { bytes };
    lock(&r.device).insert(ptr, span);
    Ok((ptr, pitch))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> CUresult {
    let (ptr, _) = tri!(alloc(0, bytes as u64, 0, 0));
    out(dptr, ptr)
}

/// Managed memory is host-accessible by definition, which a remote device's is not.
#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocManaged(_dptr: *mut u64, _bytes: usize, _flags: c_uint) -> CUresult {
    status::NOT_SUPPORTED
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element: c_uint,
) -> CUresult {
    let (ptr, p) = tri!(alloc(2, width as u64, height as u64, element as u64));
    tri!(put(pitch, p as usize));
    out(dptr, ptr)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(dptr: *mut u64, bytes: usize, s: Ptr) -> CUresult {
    let (ptr, _) = tri!(alloc(3, bytes as u64, 0, stream_id(s, false)));
    out(dptr, ptr)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(dptr: *mut u64, bytes: usize, s: Ptr) -> CUresult {
    let (ptr, _) = tri!(alloc(3, bytes as u64, 0, stream_id(s, true)));
    out(dptr, ptr)
}

/// The device's default memory pool: the only pool a remote client allocates from.
const DEFAULT_POOL: usize = 0x7e55_e000_0000;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut Ptr, dev: c_int) -> CUresult {
    tri!(remote());
    if dev != 0 {
        return 101;
    }
    out(pool, DEFAULT_POOL as Ptr)
}

fn alloc_from_pool(dptr: *mut u64, bytes: usize, pool: Ptr, s: u64) -> CUresult {
    // Pools a program creates are not forwarded (yet); the default pool is.
    if pool as usize != DEFAULT_POOL {
        return status::NOT_SUPPORTED;
    }
    let (ptr, _) = tri!(alloc(4, bytes as u64, 0, s));
    out(dptr, ptr)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut u64,
    bytes: usize,
    pool: Ptr,
    s: Ptr,
) -> CUresult {
    alloc_from_pool(dptr, bytes, pool, stream_id(s, false))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut u64,
    bytes: usize,
    pool: Ptr,
    s: Ptr,
) -> CUresult {
    alloc_from_pool(dptr, bytes, pool, stream_id(s, true))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFree_v2(dptr: u64) -> CUresult {
    let r = tri!(remote());
    lock(&r.device).remove(&dptr);
    r.send(
        Op::MemFree,
        |f| {
            f.u64(dptr);
        },
        &[],
    )
}

fn free_async(dptr: u64, s: u64) -> CUresult {
    let r = tri!(remote());
    lock(&r.device).remove(&dptr);
    r.send(
        Op::MemFreeAsync,
        |f| {
            f.u64(dptr).u64(s);
        },
        &[],
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeAsync(dptr: u64, s: Ptr) -> CUresult {
    free_async(dptr, stream_id(s, false))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeAsync_ptsz(dptr: u64, s: Ptr) -> CUresult {
    free_async(dptr, stream_id(s, true))
}

/// The slice's memory, as the GPU node's slice library reports it.
fn mem_info() -> Result<(u64, u64), CUresult> {
    let r = remote()?;
    let body = r.call(Op::MemGetInfo, |_| {})?;
    let mut f = Fields::new(&body);
    Ok((
        f.u64().map_err(|_| status::INVALID_VALUE)?,
        f.u64().map_err(|_| status::INVALID_VALUE)?,
    ))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let (f, t) = tri!(mem_info());
    tri!(put(free, f as usize));
    out(total, t as usize)
}

/// Host memory the program pins: page-locked here, and recorded so that copies back into it can
/// complete after the call returns, as they do on a local GPU.
fn pin(bytes: usize) -> Result<Ptr, CUresult> {
    let r = remote()?;
    let len = bytes.max(1);
    // SAFETY: an anonymous private mapping of our own.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(status::OUT_OF_MEMORY);
    }
    // SAFETY: our own mapping; failing to lock it (a low RLIMIT_MEMLOCK) leaves it pageable,
    // which changes speed, not meaning.
    unsafe { libc::mlock(p, len) };
    lock(&r.pinned).insert(p as u64, len as u64);
    Ok(p)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut Ptr, bytes: usize) -> CUresult {
    let p = tri!(pin(bytes));
    out(pp, p)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(pp: *mut Ptr, bytes: usize, flags: c_uint) -> CUresult {
    // CU_MEMHOSTALLOC_DEVICEMAP: the device would read host memory across the network.
    if flags & 0x02 != 0 {
        return status::NOT_SUPPORTED;
    }
    let p = tri!(pin(bytes));
    out(pp, p)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(p: Ptr) -> CUresult {
    let r = tri!(remote());
    let Some(len) = lock(&r.pinned).remove(&(p as u64)) else {
        return status::INVALID_VALUE;
    };
    // SAFETY: a mapping pin() made, of that length.
    unsafe { libc::munmap(p, len as usize) };
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemHostRegister_v2(p: Ptr, bytes: usize, flags: c_uint) -> CUresult {
    let r = tri!(remote());
    if p.is_null() || bytes == 0 {
        return status::INVALID_VALUE;
    }
    if flags & 0x02 != 0 {
        return status::NOT_SUPPORTED;
    }
    lock(&r.pinned).insert(p as u64, bytes as u64);
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemHostUnregister(p: Ptr) -> CUresult {
    let r = tri!(remote());
    match lock(&r.pinned).remove(&(p as u64)) {
        Some(_) => SUCCESS,
        None => status::INVALID_VALUE,
    }
}

/// Mapped host memory would have the device read across the network; not offered.
#[unsafe(no_mangle)]
pub extern "C" fn cuMemHostGetDevicePointer_v2(_d: *mut u64, _p: Ptr, _flags: c_uint) -> CUresult {
    status::NOT_SUPPORTED
}

fn within(map: &Mutex<BTreeMap<u64, u64>>, ptr: u64, len: usize) -> bool {
    lock(map)
        .range(..=ptr)
        .next_back()
        .is_some_and(|(start, bytes)| ptr + len as u64 <= start + bytes)
}

// ---- copies ----------------------------------------------------------------------------------

fn htod(dst: u64, src: *const c_void, bytes: usize, s: Option<u64>) -> CUresult {
    let r = tri!(remote());
    if bytes == 0 {
        return SUCCESS;
    }
    if src.is_null() || dst == 0 {
        return status::INVALID_VALUE;
    }
    // SAFETY: the caller's source holds `bytes` bytes, as the API requires.
    let data = unsafe { std::slice::from_raw_parts(src as *const u8, bytes) };
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        let at = dst + (i * CHUNK) as u64;
        let code = r.send(
            Op::MemcpyHtoD,
            |f| {
                f.u64(at).u64(s.unwrap_or(0)).u32(s.is_some() as u32);
            },
            chunk,
        );
        if code != SUCCESS {
            return code;
        }
    }
    SUCCESS
}

fn dtoh(dst: Ptr, src: u64, bytes: usize, s: Option<u64>) -> CUresult {
    let r = tri!(remote());
    if bytes == 0 {
        return SUCCESS;
    }
    if dst.is_null() || src == 0 {
        return status::INVALID_VALUE;
    }
    let mut c = tri!(r.conn());
    let fill = |f: &mut Frame| {
        f.u64(src)
            .u64(bytes as u64)
            .u64(s.unwrap_or(0))
            .u32(s.is_some() as u32);
    };
    // Into pinned memory, an asynchronous copy completes later, as on a local GPU: its bytes are
    // written when the program's next call reads the stream (it must synchronize before it
    // reads them).
    if s.is_some() && !r.naive && within(&r.pinned, dst as u64, bytes) {
        // Sent at once: the copy can start while the program goes on.
        if let Err(e) = c
            .write(Op::MemcpyDtoH, 0, fill, &[])
            .and_then(|()| c.flush())
        {
            return c.lose(r, e);
        }
        c.pending.push_back(Pending::Copy {
            dst: dst as usize,
            len: bytes,
        });
        c.pending_bytes += bytes;
        if c.pending_bytes > MAX_PENDING_BYTES
            && let Err(e) = c.drain()
        {
            return c.lose(r, e);
        }
        return SUCCESS;
    }
    let result = (|| -> io::Result<Result<(), CUresult>> {
        c.write(Op::MemcpyDtoH, 0, fill, &[])?;
        c.drain()?;
        // SAFETY: the caller's destination holds `bytes` bytes, as the API requires.
        let out = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, bytes) };
        c.copy_in(out)
    })();
    match result {
        Ok(Ok(())) => SUCCESS,
        Ok(Err(code)) => code,
        Err(e) => c.lose(r, e),
    }
}

fn dtod(dst: u64, src: u64, bytes: usize, s: Option<u64>) -> CUresult {
    post(Op::MemcpyDtoD, |f| {
        f.u64(dst)
            .u64(src)
            .u64(bytes as u64)
            .u64(s.unwrap_or(0))
            .u32(s.is_some() as u32);
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, bytes: usize) -> CUresult {
    htod(dst, src, bytes, None)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: u64,
    src: *const c_void,
    bytes: usize,
    s: Ptr,
) -> CUresult {
    htod(dst, src, bytes, Some(stream_id(s, false)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyHtoDAsync_v2_ptsz(
    dst: u64,
    src: *const c_void,
    bytes: usize,
    s: Ptr,
) -> CUresult {
    htod(dst, src, bytes, Some(stream_id(s, true)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoH_v2(dst: Ptr, src: u64, bytes: usize) -> CUresult {
    dtoh(dst, src, bytes, None)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoHAsync_v2(dst: Ptr, src: u64, bytes: usize, s: Ptr) -> CUresult {
    dtoh(dst, src, bytes, Some(stream_id(s, false)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoHAsync_v2_ptsz(dst: Ptr, src: u64, bytes: usize, s: Ptr) -> CUresult {
    dtoh(dst, src, bytes, Some(stream_id(s, true)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoD_v2(dst: u64, src: u64, bytes: usize) -> CUresult {
    dtod(dst, src, bytes, None)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoDAsync_v2(dst: u64, src: u64, bytes: usize, s: Ptr) -> CUresult {
    dtod(dst, src, bytes, Some(stream_id(s, false)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyDtoDAsync_v2_ptsz(dst: u64, src: u64, bytes: usize, s: Ptr) -> CUresult {
    dtod(dst, src, bytes, Some(stream_id(s, true)))
}

/// `cuMemcpy` with unified addressing: which side each pointer is on, from the allocations this
/// client made.
fn memcpy(dst: u64, src: u64, bytes: usize, s: Option<u64>) -> CUresult {
    let r = tri!(remote());
    let (d, sd) = (within(&r.device, dst, bytes), within(&r.device, src, bytes));
    match (d, sd) {
        (true, true) => dtod(dst, src, bytes, s),
        (true, false) => htod(dst, src as *const c_void, bytes, s),
        (false, true) => dtoh(dst as Ptr, src, bytes, s),
        (false, false) => {
            // Host to host, as the driver does it.
            if bytes > 0 && (dst == 0 || src == 0) {
                return status::INVALID_VALUE;
            }
            // SAFETY: both are the caller's host ranges of `bytes` bytes.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
            SUCCESS
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpy(dst: u64, src: u64, bytes: usize) -> CUresult {
    memcpy(dst, src, bytes, None)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyAsync(dst: u64, src: u64, bytes: usize, s: Ptr) -> CUresult {
    memcpy(dst, src, bytes, Some(stream_id(s, false)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemcpyAsync_ptsz(dst: u64, src: u64, bytes: usize, s: Ptr) -> CUresult {
    memcpy(dst, src, bytes, Some(stream_id(s, true)))
}

/// A 2D copy as its rows, each through the copy of its direction: rows to the device gather in
/// one burst, rows back each wait for their bytes.
unsafe fn memcpy_2d(p: *const Memcpy2d, s: Option<u64>) -> CUresult {
    if p.is_null() {
        return status::INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid CUDA_MEMCPY2D.
    let c = unsafe { *p };
    let Some(rows) = c.rows() else {
        // Arrays are not forwarded; a row wider than its pitch is the caller's error.
        return if c.src_memory_type == 3 || c.dst_memory_type == 3 {
            status::NOT_SUPPORTED
        } else {
            status::INVALID_VALUE
        };
    };
    let unified = c.src_memory_type == MEMORY_UNIFIED || c.dst_memory_type == MEMORY_UNIFIED;
    for (dst, dst_dev, src, src_dev) in rows {
        let code = match (dst_dev, src_dev) {
            // A unified address is on whichever side this client's allocations say.
            _ if unified => memcpy(dst, src, c.width_in_bytes, s),
            (true, true) => dtod(dst, src, c.width_in_bytes, s),
            (true, false) => htod(dst, src as *const c_void, c.width_in_bytes, s),
            (false, true) => dtoh(dst as Ptr, src, c.width_in_bytes, s),
            (false, false) => memcpy(dst, src, c.width_in_bytes, s),
        };
        if code != SUCCESS {
            return code;
        }
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpy2D_v2(p: *const Memcpy2d) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { memcpy_2d(p, None) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpy2DUnaligned_v2(p: *const Memcpy2d) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { memcpy_2d(p, None) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpy2DAsync_v2(p: *const Memcpy2d, s: Ptr) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { memcpy_2d(p, Some(stream_id(s, false))) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemcpy2DAsync_v2_ptsz(p: *const Memcpy2d, s: Ptr) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { memcpy_2d(p, Some(stream_id(s, true))) }
}

fn memset(dst: u64, width: u32, value: u32, count: usize, s: Option<u64>) -> CUresult {
    post(Op::Memset, |f| {
        f.u64(dst)
            .u32(width)
            .u32(value)
            .u64(count as u64)
            .u64(s.unwrap_or(0))
            .u32(s.is_some() as u32);
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD8_v2(dst: u64, value: u8, count: usize) -> CUresult {
    memset(dst, 1, value as u32, count, None)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD32_v2(dst: u64, value: c_uint, count: usize) -> CUresult {
    memset(dst, 4, value, count, None)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD8Async(dst: u64, value: u8, count: usize, s: Ptr) -> CUresult {
    memset(dst, 1, value as u32, count, Some(stream_id(s, false)))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemsetD32Async(dst: u64, value: c_uint, count: usize, s: Ptr) -> CUresult {
    memset(dst, 4, value, count, Some(stream_id(s, false)))
}

// ---- modules and functions -------------------------------------------------------------------

/// Loads an image: asks whether the server holds it by hash, sends it only if not.
fn load(module: *mut Ptr, image: &[u8]) -> CUresult {
    let r = tri!(remote());
    if module.is_null() {
        return status::INVALID_VALUE;
    }
    let hash = wire::image_hash(image);
    let known = match r.call(Op::ModuleHas, |f| {
        f.bytes(&hash);
    }) {
        Ok(_) => true,
        Err(status::NOT_FOUND) => false,
        Err(code) => return code,
    };
    let h = r.handle();
    let sent: &[u8] = if known { &[] } else { image };
    tri!(r.call(Op::ModuleLoad, |f| {
        f.u64(h).bytes(&hash).bytes(sent);
    }));
    out(module, h as Ptr)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut Ptr, image: *const c_void) -> CUresult {
    if image.is_null() {
        return status::INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid image, whose own header gives its extent.
    let image = unsafe {
        let len = wire::image_len(image.cast());
        std::slice::from_raw_parts(image as *const u8, len)
    };
    load(module, image)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut Ptr,
    image: *const c_void,
    _n: c_uint,
    _options: Ptr,
    _values: *mut Ptr,
) -> CUresult {
    // JIT options tune compilation on the GPU node; its defaults are used.
    // SAFETY: forwarded contract.
    unsafe { cuModuleLoadData(module, image) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadFatBinary(module: *mut Ptr, image: *const c_void) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuModuleLoadData(module, image) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoad(module: *mut Ptr, path: *const c_char) -> CUresult {
    if path.is_null() {
        return status::INVALID_VALUE;
    }
    // SAFETY: a NUL-terminated path.
    let path = unsafe { CStr::from_ptr(path) }
        .to_string_lossy()
        .into_owned();
    match std::fs::read(&path) {
        Ok(image) => load(module, &image),
        Err(_) => status::NOT_FOUND,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuModuleUnload(module: Ptr) -> CUresult {
    post(Op::ModuleUnload, |f| {
        f.u64(module as u64);
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut Ptr,
    module: Ptr,
    name: *const c_char,
) -> CUresult {
    let r = tri!(remote());
    if function.is_null() || name.is_null() {
        return status::INVALID_VALUE;
    }
    // SAFETY: a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(name) }.to_bytes();
    let h = r.handle();
    let body = tri!(r.call(Op::ModuleGetFunction, |f| {
        f.u64(h).u64(module as u64).bytes(name);
    }));
    let mut f = Fields::new(&body);
    let parsed = (|| -> io::Result<Vec<(usize, usize)>> {
        let n = f.u32()? as usize;
        (0..n)
            .map(|_| Ok((f.u64()? as usize, f.u64()? as usize)))
            .collect()
    })();
    let Ok(layout) = parsed else {
        return status::INVALID_VALUE;
    };
    lock(&r.functions).insert(h, layout);
    out(function, h as Ptr)
}

// ---- streams and events ----------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut Ptr,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    let r = tri!(remote());
    if s.is_null() {
        return status::INVALID_VALUE;
    }
    let h = r.handle();
    let code = r.send(
        Op::StreamCreate,
        |f| {
            f.u64(h).u32(flags).u32(priority as u32);
        },
        &[],
    );
    if code != SUCCESS {
        return code;
    }
    out(s, h as Ptr)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(s: *mut Ptr, flags: c_uint) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuStreamCreateWithPriority(s, flags, 0) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamDestroy_v2(s: Ptr) -> CUresult {
    post(Op::StreamDestroy, |f| {
        f.u64(s as u64);
    })
}

fn stream_call(op: Op, s: u64) -> CUresult {
    let r = tri!(remote());
    r.call(op, |f| {
        f.u64(s);
    })
    .err()
    .unwrap_or(SUCCESS)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(s: Ptr) -> CUresult {
    stream_call(Op::StreamSynchronize, stream_id(s, false))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize_ptsz(s: Ptr) -> CUresult {
    stream_call(Op::StreamSynchronize, stream_id(s, true))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamQuery(s: Ptr) -> CUresult {
    stream_call(Op::StreamQuery, stream_id(s, false))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamQuery_ptsz(s: Ptr) -> CUresult {
    stream_call(Op::StreamQuery, stream_id(s, true))
}

fn wait_event(s: u64, e: Ptr, flags: c_uint) -> CUresult {
    post(Op::StreamWaitEvent, |f| {
        f.u64(s).u64(e as u64).u32(flags);
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamWaitEvent(s: Ptr, e: Ptr, flags: c_uint) -> CUresult {
    wait_event(stream_id(s, false), e, flags)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamWaitEvent_ptsz(s: Ptr, e: Ptr, flags: c_uint) -> CUresult {
    wait_event(stream_id(s, true), e, flags)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(e: *mut Ptr, flags: c_uint) -> CUresult {
    let r = tri!(remote());
    if e.is_null() {
        return status::INVALID_VALUE;
    }
    let h = r.handle();
    let code = r.send(
        Op::EventCreate,
        |f| {
            f.u64(h).u32(flags);
        },
        &[],
    );
    if code != SUCCESS {
        return code;
    }
    out(e, h as Ptr)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventDestroy_v2(e: Ptr) -> CUresult {
    post(Op::EventDestroy, |f| {
        f.u64(e as u64);
    })
}

fn record(e: Ptr, s: u64) -> CUresult {
    post(Op::EventRecord, |f| {
        f.u64(e as u64).u64(s);
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventRecord(e: Ptr, s: Ptr) -> CUresult {
    record(e, stream_id(s, false))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventRecord_ptsz(e: Ptr, s: Ptr) -> CUresult {
    record(e, stream_id(s, true))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventQuery(e: Ptr) -> CUresult {
    stream_call(Op::EventQuery, e as u64)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(e: Ptr) -> CUresult {
    stream_call(Op::EventSynchronize, e as u64)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Ptr, end: Ptr) -> CUresult {
    let r = tri!(remote());
    let body = tri!(r.call(Op::EventElapsedTime, |f| {
        f.u64(start as u64).u64(end as u64);
    }));
    let bits = tri!(Fields::new(&body).u32().map_err(|_| status::INVALID_VALUE));
    out(ms, f32::from_bits(bits))
}

// ---- launches --------------------------------------------------------------------------------

/// `extra`'s markers: the parameters as one buffer, and its size.
const LAUNCH_PARAM_END: usize = 0;
const LAUNCH_PARAM_BUFFER_POINTER: usize = 1;
const LAUNCH_PARAM_BUFFER_SIZE: usize = 2;

/// A launch's parameters as one buffer laid out as the kernel takes them, and whether they came
/// as `extra`'s buffer.
unsafe fn parameters(
    r: &Remote,
    f: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> Result<(Vec<u8>, bool), CUresult> {
    if !extra.is_null() {
        let (mut buffer, mut size): (*const u8, usize) = (std::ptr::null(), 0);
        // SAFETY: `extra` is a list of (marker, value) pairs ending with END, as the API requires.
        unsafe {
            let mut at = extra;
            loop {
                match *at as usize {
                    LAUNCH_PARAM_END => break,
                    LAUNCH_PARAM_BUFFER_POINTER => buffer = *at.add(1) as *const u8,
                    LAUNCH_PARAM_BUFFER_SIZE => size = *(*at.add(1) as *const usize),
                    _ => return Err(status::INVALID_VALUE),
                }
                at = at.add(2);
            }
            if buffer.is_null() && size > 0 {
                return Err(status::INVALID_VALUE);
            }
            return Ok((std::slice::from_raw_parts(buffer, size).to_vec(), true));
        }
    }
    let functions = lock(&r.functions);
    let layout = functions.get(&(f as u64)).ok_or(status::INVALID_HANDLE)?;
    let size = layout.iter().map(|(o, s)| o + s).max().unwrap_or(0);
    let mut buffer = vec![0u8; size];
    if size > 0 && params.is_null() {
        return Err(status::INVALID_VALUE);
    }
    for (i, (offset, len)) in layout.iter().enumerate() {
        // SAFETY: kernelParams holds one pointer per parameter, each to a value of its size.
        unsafe {
            let value = *params.add(i) as *const u8;
            if value.is_null() {
                return Err(status::INVALID_VALUE);
            }
            std::ptr::copy_nonoverlapping(value, buffer[*offset..].as_mut_ptr(), *len);
        }
    }
    Ok((buffer, false))
}

unsafe fn launch(
    f: Ptr,
    dims: [c_uint; 6],
    shared: c_uint,
    s: u64,
    kind: u32,
    attrs: &[u8],
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    let r = tri!(remote());
    // SAFETY: forwarded contract.
    let (buffer, as_extra) = tri!(unsafe { parameters(r, f, params, extra) });
    r.send(
        Op::Launch,
        |m| {
            m.u64(f as u64);
            for d in dims {
                m.u32(d);
            }
            m.u32(shared)
                .u64(s)
                .u32(kind)
                .bytes(attrs)
                .bytes(&buffer)
                .u32(as_extra as u32);
        },
        &[],
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: Ptr,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    s: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe {
        launch(
            f,
            [gx, gy, gz, bx, by, bz],
            shared,
            stream_id(s, false),
            0,
            &[],
            params,
            extra,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernel_ptsz(
    f: Ptr,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    s: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe {
        launch(
            f,
            [gx, gy, gz, bx, by, bz],
            shared,
            stream_id(s, true),
            0,
            &[],
            params,
            extra,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: Ptr,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    s: Ptr,
    params: *mut Ptr,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe {
        launch(
            f,
            [gx, gy, gz, bx, by, bz],
            shared,
            stream_id(s, false),
            1,
            &[],
            params,
            std::ptr::null_mut(),
        )
    }
}

unsafe fn launch_ex(
    config: *const LaunchConfig,
    f: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
    per_thread: bool,
) -> CUresult {
    if config.is_null() {
        return status::INVALID_VALUE;
    }
    // SAFETY: the caller passes a valid CUlaunchConfig whose attributes array has num_attrs
    // entries of CUlaunchAttribute.
    unsafe {
        let c = &*config;
        let attrs = if c.attrs.is_null() || c.num_attrs == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(
                c.attrs as *const u8,
                c.num_attrs as usize * LAUNCH_ATTRIBUTE_BYTES,
            )
        };
        let [gx, gy, gz] = c.grid;
        let [bx, by, bz] = c.block;
        launch(
            f,
            [gx, gy, gz, bx, by, bz],
            c.shared,
            stream_id(c.stream, per_thread),
            2,
            attrs,
            params,
            extra,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const LaunchConfig,
    f: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { launch_ex(config, f, params, extra, false) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const LaunchConfig,
    f: Ptr,
    params: *mut Ptr,
    extra: *mut Ptr,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { launch_ex(config, f, params, extra, true) }
}

// ---- graphs ----------------------------------------------------------------------------------

fn begin_capture(s: u64, mode: c_uint) -> CUresult {
    post(Op::StreamBeginCapture, |f| {
        f.u64(s).u32(mode);
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamBeginCapture_v2(s: Ptr, mode: c_uint) -> CUresult {
    begin_capture(stream_id(s, false), mode)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamBeginCapture_v2_ptsz(s: Ptr, mode: c_uint) -> CUresult {
    begin_capture(stream_id(s, true), mode)
}

fn end_capture(s: u64, graph: *mut Ptr) -> CUresult {
    let r = tri!(remote());
    let h = r.handle();
    tri!(r.call(Op::StreamEndCapture, |f| {
        f.u64(s).u64(h);
    }));
    out(graph, h as Ptr)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture(s: Ptr, graph: *mut Ptr) -> CUresult {
    end_capture(stream_id(s, false), graph)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamEndCapture_ptsz(s: Ptr, graph: *mut Ptr) -> CUresult {
    end_capture(stream_id(s, true), graph)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut Ptr,
    graph: Ptr,
    flags: u64,
) -> CUresult {
    let r = tri!(remote());
    let h = r.handle();
    tri!(r.call(Op::GraphInstantiate, |f| {
        f.u64(h).u64(graph as u64).u64(flags);
    }));
    out(exec, h as Ptr)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiate_v2(
    exec: *mut Ptr,
    graph: Ptr,
    _error_node: *mut Ptr,
    _log: *mut c_char,
    _log_size: usize,
) -> CUresult {
    // SAFETY: forwarded contract.
    unsafe { cuGraphInstantiateWithFlags(exec, graph, 0) }
}

fn graph_launch(exec: Ptr, s: u64) -> CUresult {
    post(Op::GraphLaunch, |f| {
        f.u64(exec as u64).u64(s);
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphLaunch(exec: Ptr, s: Ptr) -> CUresult {
    graph_launch(exec, stream_id(s, false))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphLaunch_ptsz(exec: Ptr, s: Ptr) -> CUresult {
    graph_launch(exec, stream_id(s, true))
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphDestroy(g: Ptr) -> CUresult {
    post(Op::GraphDestroy, |f| {
        f.u64(g as u64);
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphExecDestroy(e: Ptr) -> CUresult {
    post(Op::GraphExecDestroy, |f| {
        f.u64(e as u64);
    })
}

// ---- errors, entry points, NVML ---------------------------------------------------------------

fn error_text(code: CUresult) -> Option<(&'static CStr, &'static CStr)> {
    Some(match code {
        0 => (c"CUDA_SUCCESS", c"no error"),
        1 => (c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
        2 => (c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
        3 => (c"CUDA_ERROR_NOT_INITIALIZED", c"initialization error"),
        46 => (
            c"CUDA_ERROR_DEVICE_UNAVAILABLE",
            c"CUDA-capable device(s) is/are busy or unavailable (the remote GPU cannot be reached)",
        ),
        100 => (
            c"CUDA_ERROR_NO_DEVICE",
            c"no CUDA-capable device is detected",
        ),
        101 => (c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
        200 => (
            c"CUDA_ERROR_INVALID_IMAGE",
            c"device kernel image is invalid",
        ),
        201 => (c"CUDA_ERROR_INVALID_CONTEXT", c"invalid device context"),
        400 => (c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
        500 => (c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
        600 => (c"CUDA_ERROR_NOT_READY", c"device not ready"),
        801 => (c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
        _ => return None,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, s: *mut *const c_char) -> CUresult {
    match error_text(code) {
        Some((_, text)) => out(s, text.as_ptr()),
        None => status::INVALID_VALUE,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, s: *mut *const c_char) -> CUresult {
    match error_text(code) {
        Some((name, _)) => out(s, name.as_ptr()),
        None => status::INVALID_VALUE,
    }
}

const NVML_SUCCESS: c_uint = 0;
const NVML_ERROR_INVALID_ARGUMENT: c_uint = 2;
const NVML_ERROR_UNINITIALIZED: c_uint = 1;
const NVML_ERROR_GPU_IS_LOST: c_uint = 15;
/// The one device's NVML handle.
const NVML_DEVICE: usize = 0x7e55_d000_0000;

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> c_uint {
    match REMOTE.get_or_init(attach) {
        Ok(_) => NVML_SUCCESS,
        Err(_) => NVML_ERROR_UNINITIALIZED,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> c_uint {
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> c_uint {
    if remote().is_err() {
        return NVML_ERROR_UNINITIALIZED;
    }
    if out(count, 1) == SUCCESS {
        NVML_SUCCESS
    } else {
        NVML_ERROR_INVALID_ARGUMENT
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, handle: *mut Ptr) -> c_uint {
    if remote().is_err() {
        return NVML_ERROR_UNINITIALIZED;
    }
    if index != 0 || out(handle, NVML_DEVICE as Ptr) != SUCCESS {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    NVML_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(handle: Ptr, index: *mut c_uint) -> c_uint {
    if handle as usize != NVML_DEVICE || out(index, 0) != SUCCESS {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    NVML_SUCCESS
}

fn nvml_memory(handle: Ptr) -> Result<(u64, u64), c_uint> {
    if handle as usize != NVML_DEVICE {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    mem_info().map_err(|code| match code {
        status::NOT_INITIALIZED => NVML_ERROR_UNINITIALIZED,
        _ => NVML_ERROR_GPU_IS_LOST,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(handle: Ptr, memory: *mut NvmlMemory) -> c_uint {
    let (free, total) = match nvml_memory(handle) {
        Ok(m) => m,
        Err(e) => return e,
    };
    let m = NvmlMemory {
        total,
        free,
        used: total - free.min(total),
    };
    if out(memory, m) == SUCCESS {
        NVML_SUCCESS
    } else {
        NVML_ERROR_INVALID_ARGUMENT
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    handle: Ptr,
    memory: *mut NvmlMemoryV2,
) -> c_uint {
    let (free, total) = match nvml_memory(handle) {
        Ok(m) => m,
        Err(e) => return e,
    };
    if memory.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; the caller set `version` and passes a writable struct.
    unsafe {
        (*memory).total = total;
        (*memory).reserved = 0;
        (*memory).free = free;
        (*memory).used = total - free.min(total);
    }
    NVML_SUCCESS
}

/// Whether `TESSERA_REMOTE_TRACE=1`.
fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TESSERA_REMOTE_TRACE").is_ok_and(|v| v == "1"))
}

/// `cuGetExportTable`: the CUDA runtime's private entry points into the driver, named by UUID and
/// undocumented. None is forwarded; the UUID asked for is said under `TESSERA_REMOTE_TRACE=1`, so
/// that a run on a real driver shows what the runtime needs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetExportTable(
    table: *mut *const c_void,
    id: *const [u8; 16],
) -> CUresult {
    if table.is_null() || id.is_null() {
        return status::INVALID_VALUE;
    }
    if tracing() {
        // SAFETY: checked non-null; a UUID is 16 bytes.
        let id = unsafe { *id };
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        say(&format!(
            "trace: export table {hex} asked for; none is forwarded"
        ));
    }
    // SAFETY: checked non-null.
    unsafe { *table = std::ptr::null() };
    status::NOT_SUPPORTED
}

macro_rules! exports {
    ($($name:ident),* $(,)?) => {
        /// The address of the exported function `name`.
        fn export(name: &str) -> Option<Ptr> {
            match name {
                $(stringify!($name) => Some($name as Ptr),)*
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
    cuDeviceComputeCapability,
    cuDeviceTotalMem_v2,
    cuDevicePrimaryCtxRetain,
    cuDevicePrimaryCtxRelease_v2,
    cuDevicePrimaryCtxReset_v2,
    cuDevicePrimaryCtxSetFlags_v2,
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
    cuDeviceGetDefaultMemPool,
    cuMemAllocFromPoolAsync,
    cuMemAllocFromPoolAsync_ptsz,
    cuMemFree_v2,
    cuMemFreeAsync,
    cuMemFreeAsync_ptsz,
    cuMemGetInfo_v2,
    cuMemAllocHost_v2,
    cuMemHostAlloc,
    cuMemFreeHost,
    cuMemHostRegister_v2,
    cuMemHostUnregister,
    cuMemHostGetDevicePointer_v2,
    cuMemcpyHtoD_v2,
    cuMemcpyHtoDAsync_v2,
    cuMemcpyHtoDAsync_v2_ptsz,
    cuMemcpyDtoH_v2,
    cuMemcpyDtoHAsync_v2,
    cuMemcpyDtoHAsync_v2_ptsz,
    cuMemcpyDtoD_v2,
    cuMemcpyDtoDAsync_v2,
    cuMemcpyDtoDAsync_v2_ptsz,
    cuMemcpy,
    cuMemcpyAsync,
    cuMemcpyAsync_ptsz,
    cuMemcpy2D_v2,
    cuMemcpy2DUnaligned_v2,
    cuMemcpy2DAsync_v2,
    cuMemcpy2DAsync_v2_ptsz,
    cuMemsetD8_v2,
    cuMemsetD32_v2,
    cuMemsetD8Async,
    cuMemsetD32Async,
    cuModuleLoadData,
    cuModuleLoadDataEx,
    cuModuleLoadFatBinary,
    cuModuleLoad,
    cuModuleUnload,
    cuModuleGetFunction,
    cuStreamCreate,
    cuStreamCreateWithPriority,
    cuStreamDestroy_v2,
    cuStreamSynchronize,
    cuStreamSynchronize_ptsz,
    cuStreamQuery,
    cuStreamQuery_ptsz,
    cuStreamWaitEvent,
    cuStreamWaitEvent_ptsz,
    cuEventCreate,
    cuEventDestroy_v2,
    cuEventRecord,
    cuEventRecord_ptsz,
    cuEventQuery,
    cuEventSynchronize,
    cuEventElapsedTime,
    cuLaunchKernel,
    cuLaunchKernel_ptsz,
    cuLaunchCooperativeKernel,
    cuLaunchKernelEx,
    cuLaunchKernelEx_ptsz,
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
    cuGetExportTable,
    nvmlInit_v2,
    nvmlShutdown,
    nvmlDeviceGetCount_v2,
    nvmlDeviceGetHandleByIndex_v2,
    nvmlDeviceGetIndex,
    nvmlDeviceGetMemoryInfo,
    nvmlDeviceGetMemoryInfo_v2,
);

/// `cuGetProcAddress`: the newest variant of `symbol` this library has for `version`; with the
/// per-thread default stream flag, the `_ptsz` variant where one exists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut Ptr,
    version: c_int,
    flags: u64,
) -> CUresult {
    if symbol.is_null() || pfn.is_null() {
        return status::INVALID_VALUE;
    }
    // SAFETY: symbol is NUL-terminated.
    let name = unsafe { CStr::from_ptr(symbol) }.to_string_lossy();
    let found = tessera_shm::cuda::proc_address(&name, version, flags, export);
    if found.is_none() && tracing() {
        say(&format!(
            "trace: no {name} (version {version}, flags {flags}) is forwarded"
        ));
    }
    // SAFETY: checked non-null.
    unsafe { *pfn = found.unwrap_or(std::ptr::null_mut()) };
    if found.is_some() {
        SUCCESS
    } else {
        status::NOT_FOUND
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut Ptr,
    version: c_int,
    flags: u64,
    found: *mut c_int,
) -> CUresult {
    // SAFETY: forwarded contract.
    let r = unsafe { cuGetProcAddress(symbol, pfn, version, flags) };
    if !found.is_null() {
        // SAFETY: checked non-null.
        unsafe { *found = if r == SUCCESS { 0 } else { 1 } };
    }
    r
}
