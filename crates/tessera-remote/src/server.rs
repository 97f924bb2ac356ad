//! The GPU side of a remote attachment: a CUDA program like any other, started by the GPU node's
//! agent under the slice library, that runs the calls its clients forward.
//!
//! Each client process holds one connection and gets a session of its own: its handles (streams,
//! events, modules, functions, graphs) are the numbers the client chose, mapped here to the
//! driver's; what it allocated is freed when it goes, however it goes. Requests run in order on the
//! session's thread; answers leave through a sender thread, so the session never waits on the
//! network while the GPU could be working (a large copy back is read chunk by chunk while earlier
//! chunks are on the wire).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, c_int, c_uint};
use std::io::{self, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::driver::{CUresult, Driver, LaunchConfig, Ptr, call};
use crate::wire::{self, CHUNK, DeviceInfo, Fields, Frame, Op, REPLY, status};
use tessera_shm::cuda::LAUNCH_ATTRIBUTE_BYTES;

/// Module images by SHA-256, kept for the server's life: a program that loads the same module in
/// each of its processes, or again after a reconnect, sends it once.
pub type ModuleCache = Arc<Mutex<HashMap<[u8; 32], Arc<Vec<u8>>>>>;

/// Most connections served at once (handshakes included): anyone on the network can connect
/// before proving anything, and each connection holds a thread.
pub const MAX_CONNECTIONS: usize = 64;
/// Most bytes of module images kept for reuse; past it the cache starts afresh.
const MAX_CACHED_MODULE_BYTES: usize = 1 << 30;

/// Highest device attribute number asked at attach (CUDA 12.8 defines up to ~140).
const MAX_ATTRIBUTE: c_int = 160;

/// A connection's byte stream: TCP itself, or the plaintext side of TLS ([`crate::tls`]).
pub trait Duplex: Read + Write + Send + 'static {
    /// A second handle on the same stream (one thread reads while another writes).
    fn try_clone_box(&self) -> io::Result<Box<dyn Duplex>>;
    /// Bounds each read (the handshake's), or not.
    fn read_timeout(&self, limit: Option<std::time::Duration>) -> io::Result<()>;
}

impl Duplex for TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn read_timeout(&self, limit: Option<std::time::Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
}

impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn read_timeout(&self, limit: Option<std::time::Duration>) -> io::Result<()> {
        self.set_read_timeout(limit)
    }
}

/// How long either side waits for the other's part of a handshake (TLS and the secret's): a
/// peer that speaks another protocol, or none, is dropped instead of held.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves attachments on `listener` until it fails: one thread per client connection, over TLS
/// when `tls` is given.
pub fn serve(
    listener: TcpListener,
    secret: Arc<Vec<u8>>,
    driver: &'static Driver,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> io::Result<()> {
    let modules = ModuleCache::default();
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tessera-remote: accept failed: {e}");
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            eprintln!(
                "tessera-remote: {} refused: {MAX_CONNECTIONS} connections are open",
                conn.peer_addr().map(|a| a.to_string()).unwrap_or_default()
            );
            continue;
        }
        let open = open.clone();
        let (secret, modules, tls) = (secret.clone(), modules.clone(), tls.clone());
        std::thread::spawn(move || {
            let peer = conn
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            detect_dead_peers(&conn, false);
            let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
            let conn: io::Result<Box<dyn Duplex>> = match tls {
                Some(config) => crate::tls::accept(conn, config)
                    .map(|c| Box::new(c) as Box<dyn Duplex>)
                    .map_err(|e| io::Error::other(format!("TLS: {e}"))),
                None => Ok(Box::new(conn)),
            };
            match conn.and_then(|conn| session(conn, &secret, driver, modules)) {
                Ok(()) => eprintln!("tessera-remote: {peer} detached"),
                Err(e) => eprintln!("tessera-remote: {peer}: {e}"),
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
    Ok(())
}

/// Keepalive on `s` (and, with `send_timeout`, a bound on how long sent bytes may go
/// unacknowledged), so that a peer that vanished (its machine lost, its network cut) ends the
/// connection within seconds instead of never. The server sets no send bound: a client may
/// leave answers unread while it computes, and a lost client node is the controller's to
/// report.
pub fn detect_dead_peers(s: &TcpStream, send_timeout: bool) {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |level, name, value: c_int| {
        // SAFETY: setsockopt on our own socket with an int option.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const c_int as *const libc::c_void,
                size_of::<c_int>() as libc::socklen_t,
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    if send_timeout {
        set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 5_000);
    }
    let _ = s.set_nodelay(true);
}

fn session(
    mut conn: Box<dyn Duplex>,
    secret: &[u8],
    driver: &'static Driver,
    modules: ModuleCache,
) -> io::Result<()> {
    conn.read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    crate::auth::accept(&mut conn, secret)?;
    // From here a read waits as long as the client computes.
    conn.read_timeout(None)?;
    let mut s = Session::attach(driver, modules).map_err(|code| {
        io::Error::other(format!(
            "the device could not be attached: CUDA error {code}"
        ))
    });
    let info = match &mut s {
        Ok(s) => s.info.encode(),
        Err(_) => Frame::reply(status::NO_DEVICE).finish(0).to_vec(),
    };
    conn.write_all(&info)?;
    let mut s = s?;
    let (tx, rx) = mpsc::channel();
    let out = Arc::new(Out {
        writer: Mutex::new(BufWriter::with_capacity(256 << 10, conn.try_clone_box()?)),
        queued: AtomicUsize::new(0),
    });
    let sender = {
        let out = out.clone();
        std::thread::spawn(move || send_replies(&out, rx))
    };
    // The sender stops when the session (which holds the only Sender) is dropped.
    s.out = Some((out, tx));
    let mut reader = io::BufReader::with_capacity(256 << 10, conn);
    let mut body = Vec::new();
    let result = loop {
        let (len, word, flags) = match wire::read_header(&mut reader) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        };
        if let Err(e) = wire::read_body(&mut reader, len, &mut body) {
            break Err(e);
        }
        let Some(op) = Op::from_code(word as u16) else {
            break Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown operation {}", word as u16),
            ));
        };
        if let Err(e) = s.execute(op, flags, &body) {
            break Err(e);
        }
    };
    s.release();
    drop(s);
    let _ = sender.join();
    result
}

/// Where a session's answers go. A short answer is written by the session's thread itself when
/// nothing is queued before it (handing it to another thread would cost a wake-up, the largest
/// part of a round trip on a busy machine); a copy's chunks go through the sender thread, so
/// that the next chunk is read from the device while the last is on the wire.
struct Out {
    writer: Mutex<BufWriter<Box<dyn Duplex>>>,
    /// Frames handed to the sender thread and not yet written.
    queued: AtomicUsize,
}

impl Out {
    fn writer(&self) -> std::sync::MutexGuard<'_, BufWriter<Box<dyn Duplex>>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes queued answers in order; batches what is queued into as few system calls as it can.
fn send_replies(out: &Out, rx: Receiver<Vec<u8>>) {
    while let Ok(frame) = rx.recv() {
        let mut w = out.writer();
        let mut n = 1;
        let mut ok = w.write_all(&frame).is_ok();
        while ok && let Ok(more) = rx.try_recv() {
            ok = w.write_all(&more).is_ok();
            n += 1;
        }
        ok = ok && w.flush().is_ok();
        out.queued.fetch_sub(n, Ordering::AcqRel);
        if !ok {
            return;
        }
    }
}

/// One client's state on the GPU node.
pub struct Session {
    d: &'static Driver,
    pub info: DeviceInfo,
    out: Option<(Arc<Out>, Sender<Vec<u8>>)>,
    modules: ModuleCache,
    streams: HashMap<u64, Ptr>,
    events: HashMap<u64, Ptr>,
    loaded: HashMap<u64, Ptr>,
    functions: HashMap<u64, (Ptr, Vec<(usize, usize)>)>,
    graphs: HashMap<u64, Ptr>,
    execs: HashMap<u64, Ptr>,
    /// Device memory this session allocated and has not freed.
    allocations: HashSet<u64>,
    /// The first error of a call the client did not wait for, reported at its next
    /// synchronizing call.
    deferred: Option<CUresult>,
}

fn ok(code: CUresult) -> Result<(), CUresult> {
    if code == status::SUCCESS {
        Ok(())
    } else {
        Err(code)
    }
}

impl Session {
    /// Makes the device's primary context current on this thread and reads what clients cache.
    pub fn attach(d: &'static Driver, modules: ModuleCache) -> Result<Session, CUresult> {
        let (mut dev, mut ctx) = (0, std::ptr::null_mut());
        ok(call!(d, cuInit(0)))?;
        ok(call!(d, cuDeviceGet(&mut dev, 0)))?;
        ok(call!(d, cuDevicePrimaryCtxRetain(&mut ctx, dev)))?;
        ok(call!(d, cuCtxSetCurrent(ctx)))?;
        let mut name = [0 as std::ffi::c_char; 256];
        ok(call!(d, cuDeviceGetName(name.as_mut_ptr(), 256, dev)))?;
        let mut uuid = [0u8; 16];
        let _ = call!(d, cuDeviceGetUuid(&mut uuid, dev));
        let mut total = 0usize;
        ok(call!(d, cuDeviceTotalMem_v2(&mut total, dev)))?;
        let mut version = 0;
        let _ = call!(d, cuDriverGetVersion(&mut version));
        let attributes = (1..=MAX_ATTRIBUTE)
            .filter_map(|a| {
                let mut v = 0;
                (call!(d, cuDeviceGetAttribute(&mut v, a, dev)) == status::SUCCESS)
                    .then_some((a as u32, v))
            })
            .collect();
        // SAFETY: the driver wrote a NUL-terminated name into the buffer.
        let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Session {
            d,
            info: DeviceInfo {
                name,
                uuid,
                total_memory: total as u64,
                driver_version: version as u32,
                attributes,
            },
            out: None,
            modules,
            streams: HashMap::new(),
            events: HashMap::new(),
            loaded: HashMap::new(),
            functions: HashMap::new(),
            graphs: HashMap::new(),
            execs: HashMap::new(),
            allocations: HashSet::new(),
            deferred: None,
        })
    }

    /// Sends an answer: written here when nothing is queued before it and `direct`, else
    /// queued for the sender thread (which keeps the order).
    fn send_with(&self, frame: Vec<u8>, direct: bool) -> io::Result<()> {
        let Some((out, tx)) = &self.out else {
            return Ok(());
        };
        // Only this thread queues, so with nothing queued nothing can be written before this.
        if direct && out.queued.load(Ordering::Acquire) == 0 {
            let mut w = out.writer();
            w.write_all(&frame)?;
            return w.flush();
        }
        out.queued.fetch_add(1, Ordering::AcqRel);
        tx.send(frame)
            .map_err(|_| io::Error::other("the reply sender stopped"))
    }

    fn send(&self, frame: Vec<u8>) -> io::Result<()> {
        self.send_with(frame, true)
    }

    /// The driver's stream for a client's handle: the default streams (0, legacy 1, per-thread
    /// 2) are the same numbers on both sides.
    fn stream(&self, h: u64) -> Result<Ptr, CUresult> {
        if h <= 2 {
            return Ok(h as Ptr);
        }
        self.streams.get(&h).copied().ok_or(status::INVALID_HANDLE)
    }

    fn lookup(map: &HashMap<u64, Ptr>, h: u64) -> Result<Ptr, CUresult> {
        map.get(&h).copied().ok_or(status::INVALID_HANDLE)
    }

    /// A fresh handle the client chose for a new object (0-2 are the default streams).
    fn fresh(map: &HashMap<u64, Ptr>, h: u64) -> Result<(), CUresult> {
        if h <= 2 || map.contains_key(&h) {
            Err(status::INVALID_VALUE)
        } else {
            Ok(())
        }
    }

    /// Runs one request; answers it when it is answered; keeps an unanswered call's error.
    pub fn execute(&mut self, op: Op, flags: u16, body: &[u8]) -> io::Result<()> {
        let mut f = Fields::new(body);
        let answered = op.wants_reply() || flags & REPLY != 0;
        if op == Op::MemcpyDtoH {
            return self.copy_back(&mut f);
        }
        let mut payload = Frame::reply(0);
        let code = match self.run(op, &mut f, &mut payload) {
            Ok(()) => status::SUCCESS,
            Err(code) => code,
        };
        if answered {
            // A synchronizing call reports what an earlier unanswered call left.
            let code = if matches!(
                op,
                Op::StreamSynchronize
                    | Op::StreamQuery
                    | Op::CtxSynchronize
                    | Op::EventSynchronize
                    | Op::EventQuery
            ) {
                self.deferred.take().unwrap_or(code)
            } else {
                code
            };
            payload.buf[4..8].copy_from_slice(&code.to_le_bytes());
            payload.finish(0);
            self.send(payload.buf)
        } else {
            if code != status::SUCCESS && self.deferred.is_none() {
                self.deferred = Some(code);
            }
            Ok(())
        }
    }

    fn run(&mut self, op: Op, f: &mut Fields, out: &mut Frame) -> Result<(), CUresult> {
        let bad = |_| status::INVALID_VALUE;
        let d = self.d;
        match op {
            Op::MemAlloc => {
                let (kind, bytes, a, b) = (
                    f.u32().map_err(bad)?,
                    f.u64().map_err(bad)? as usize,
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)?,
                );
                let (mut ptr, mut pitch) = (0u64, 0usize);
                ok(match kind {
                    0 => call!(d, cuMemAlloc_v2(&mut ptr, bytes)),
                    1 => call!(d, cuMemAllocManaged(&mut ptr, bytes, a as c_uint)),
                    2 => call!(
                        d,
                        cuMemAllocPitch_v2(&mut ptr, &mut pitch, bytes, a as usize, b as c_uint)
                    ),
                    3 => {
                        let s = self.stream(b)?;
                        call!(d, cuMemAllocAsync(&mut ptr, bytes, s))
                    }
                    4 => {
                        // The device's default pool: the one pool a client can name.
                        let s = self.stream(b)?;
                        let mut pool = std::ptr::null_mut();
                        ok(call!(d, cuDeviceGetDefaultMemPool(&mut pool, 0)))?;
                        call!(d, cuMemAllocFromPoolAsync(&mut ptr, bytes, pool, s))
                    }
                    _ => status::INVALID_VALUE,
                })?;
                self.allocations.insert(ptr);
                out.u64(ptr).u64(pitch as u64);
            }
            Op::MemGetInfo => {
                let (mut free, mut total) = (0usize, 0usize);
                ok(call!(d, cuMemGetInfo_v2(&mut free, &mut total)))?;
                out.u64(free as u64).u64(total as u64);
            }
            Op::DeviceTotalMem => {
                let mut total = 0usize;
                ok(call!(d, cuDeviceTotalMem_v2(&mut total, 0)))?;
                out.u64(total as u64);
            }
            Op::MemFree => {
                let ptr = f.u64().map_err(bad)?;
                ok(call!(d, cuMemFree_v2(ptr)))?;
                self.allocations.remove(&ptr);
            }
            Op::MemFreeAsync => {
                let (ptr, s) = (f.u64().map_err(bad)?, f.u64().map_err(bad)?);
                let s = self.stream(s)?;
                ok(call!(d, cuMemFreeAsync(ptr, s)))?;
                self.allocations.remove(&ptr);
            }
            Op::MemcpyHtoD => {
                let (dst, s, asynchronous) = (
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)?,
                    f.u32().map_err(bad)?,
                );
                let data = f.rest();
                ok(if asynchronous != 0 {
                    let s = self.stream(s)?;
                    call!(
                        d,
                        cuMemcpyHtoDAsync_v2(dst, data.as_ptr().cast(), data.len(), s)
                    )
                } else {
                    call!(d, cuMemcpyHtoD_v2(dst, data.as_ptr().cast(), data.len()))
                })?;
            }
            Op::MemcpyDtoD => {
                let (dst, src, bytes, s, asynchronous) = (
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)? as usize,
                    f.u64().map_err(bad)?,
                    f.u32().map_err(bad)?,
                );
                ok(if asynchronous != 0 {
                    let s = self.stream(s)?;
                    call!(d, cuMemcpyDtoDAsync_v2(dst, src, bytes, s))
                } else {
                    call!(d, cuMemcpyDtoD_v2(dst, src, bytes))
                })?;
            }
            Op::Memset => {
                let (dst, width, value, count, s, asynchronous) = (
                    f.u64().map_err(bad)?,
                    f.u32().map_err(bad)?,
                    f.u32().map_err(bad)?,
                    f.u64().map_err(bad)? as usize,
                    f.u64().map_err(bad)?,
                    f.u32().map_err(bad)?,
                );
                let s = self.stream(s)?;
                ok(match (width, asynchronous != 0) {
                    (1, false) => call!(d, cuMemsetD8_v2(dst, value as u8, count)),
                    (1, true) => call!(d, cuMemsetD8Async(dst, value as u8, count, s)),
                    (4, false) => call!(d, cuMemsetD32_v2(dst, value, count)),
                    (4, true) => call!(d, cuMemsetD32Async(dst, value, count, s)),
                    _ => status::INVALID_VALUE,
                })?;
            }
            Op::ModuleHas => {
                let hash = f.bytes().map_err(bad)?;
                let known = <[u8; 32]>::try_from(hash)
                    .ok()
                    .is_some_and(|h| self.cache().contains_key(&h));
                if !known {
                    return Err(status::NOT_FOUND);
                }
            }
            Op::ModuleLoad => {
                let (h, hash, image) = (
                    f.u64().map_err(bad)?,
                    f.bytes().map_err(bad)?,
                    f.bytes().map_err(bad)?,
                );
                Self::fresh(&self.loaded, h)?;
                let hash: [u8; 32] = hash.try_into().map_err(|_| status::INVALID_VALUE)?;
                let image = if image.is_empty() {
                    self.cache().get(&hash).cloned().ok_or(status::NOT_FOUND)?
                } else {
                    // The cache is keyed by what the image is, never by what a client says it is.
                    let mut owned = image.to_vec();
                    if <[u8; 32]>::from(Sha256::digest(&owned)) != hash {
                        return Err(status::INVALID_VALUE);
                    }
                    // PTX is text the driver reads to its NUL; keep one after every image.
                    owned.push(0);
                    let owned = Arc::new(owned);
                    let mut cache = self.cache();
                    let held: usize = cache.values().map(|i| i.len()).sum();
                    if held + owned.len() > MAX_CACHED_MODULE_BYTES {
                        cache.clear();
                    }
                    cache.insert(hash, owned.clone());
                    owned
                };
                let mut m = std::ptr::null_mut();
                ok(call!(d, cuModuleLoadData(&mut m, image.as_ptr().cast())))?;
                self.loaded.insert(h, m);
            }
            Op::ModuleUnload => {
                let h = f.u64().map_err(bad)?;
                let m = Self::lookup(&self.loaded, h)?;
                ok(call!(d, cuModuleUnload(m)))?;
                self.loaded.remove(&h);
            }
            Op::ModuleGetFunction => {
                let (h, m, name) = (
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)?,
                    f.bytes().map_err(bad)?,
                );
                if h <= 2 || self.functions.contains_key(&h) {
                    return Err(status::INVALID_VALUE);
                }
                let m = Self::lookup(&self.loaded, m)?;
                let name = CString::new(name).map_err(|_| status::INVALID_VALUE)?;
                let mut func = std::ptr::null_mut();
                ok(call!(d, cuModuleGetFunction(&mut func, m, name.as_ptr())))?;
                let params = self.params(func)?;
                out.u32(params.len() as u32);
                for (o, s) in &params {
                    out.u64(*o as u64).u64(*s as u64);
                }
                self.functions.insert(h, (func, params));
            }
            Op::StreamCreate => {
                let (h, flags, priority) = (
                    f.u64().map_err(bad)?,
                    f.u32().map_err(bad)?,
                    f.u32().map_err(bad)? as c_int,
                );
                Self::fresh(&self.streams, h)?;
                let mut s = std::ptr::null_mut();
                ok(call!(
                    d,
                    cuStreamCreateWithPriority(&mut s, flags, priority)
                ))?;
                self.streams.insert(h, s);
            }
            Op::StreamDestroy => {
                let h = f.u64().map_err(bad)?;
                let s = Self::lookup(&self.streams, h)?;
                ok(call!(d, cuStreamDestroy_v2(s)))?;
                self.streams.remove(&h);
            }
            Op::StreamSynchronize => {
                let s = self.stream(f.u64().map_err(bad)?)?;
                ok(call!(d, cuStreamSynchronize(s)))?;
            }
            Op::StreamQuery => {
                let s = self.stream(f.u64().map_err(bad)?)?;
                ok(call!(d, cuStreamQuery(s)))?;
            }
            Op::CtxSynchronize => ok(call!(d, cuCtxSynchronize()))?,
            Op::Marker => {}
            Op::StreamWaitEvent => {
                let (s, e, flags) = (
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)?,
                    f.u32().map_err(bad)?,
                );
                let (s, e) = (self.stream(s)?, Self::lookup(&self.events, e)?);
                ok(call!(d, cuStreamWaitEvent(s, e, flags)))?;
            }
            Op::EventCreate => {
                let (h, flags) = (f.u64().map_err(bad)?, f.u32().map_err(bad)?);
                Self::fresh(&self.events, h)?;
                let mut e = std::ptr::null_mut();
                ok(call!(d, cuEventCreate(&mut e, flags)))?;
                self.events.insert(h, e);
            }
            Op::EventDestroy => {
                let h = f.u64().map_err(bad)?;
                let e = Self::lookup(&self.events, h)?;
                ok(call!(d, cuEventDestroy_v2(e)))?;
                self.events.remove(&h);
            }
            Op::EventRecord => {
                let (e, s) = (f.u64().map_err(bad)?, f.u64().map_err(bad)?);
                let (e, s) = (Self::lookup(&self.events, e)?, self.stream(s)?);
                ok(call!(d, cuEventRecord(e, s)))?;
            }
            Op::EventQuery => {
                let e = Self::lookup(&self.events, f.u64().map_err(bad)?)?;
                ok(call!(d, cuEventQuery(e)))?;
            }
            Op::EventSynchronize => {
                let e = Self::lookup(&self.events, f.u64().map_err(bad)?)?;
                ok(call!(d, cuEventSynchronize(e)))?;
            }
            Op::EventElapsedTime => {
                let (a, b) = (f.u64().map_err(bad)?, f.u64().map_err(bad)?);
                let (a, b) = (
                    Self::lookup(&self.events, a)?,
                    Self::lookup(&self.events, b)?,
                );
                let mut ms = 0f32;
                ok(call!(d, cuEventElapsedTime(&mut ms, a, b)))?;
                out.u32(ms.to_bits());
            }
            Op::Launch => self.launch(f)?,
            Op::StreamBeginCapture => {
                let (s, mode) = (f.u64().map_err(bad)?, f.u32().map_err(bad)?);
                let s = self.stream(s)?;
                ok(call!(d, cuStreamBeginCapture_v2(s, mode)))?;
            }
            Op::StreamEndCapture => {
                let (s, h) = (f.u64().map_err(bad)?, f.u64().map_err(bad)?);
                Self::fresh(&self.graphs, h)?;
                let s = self.stream(s)?;
                let mut g = std::ptr::null_mut();
                ok(call!(d, cuStreamEndCapture(s, &mut g)))?;
                self.graphs.insert(h, g);
            }
            Op::GraphInstantiate => {
                let (h, g, flags) = (
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)?,
                    f.u64().map_err(bad)?,
                );
                Self::fresh(&self.execs, h)?;
                let g = Self::lookup(&self.graphs, g)?;
                let mut e = std::ptr::null_mut();
                ok(call!(d, cuGraphInstantiateWithFlags(&mut e, g, flags)))?;
                self.execs.insert(h, e);
            }
            Op::GraphLaunch => {
                let (e, s) = (f.u64().map_err(bad)?, f.u64().map_err(bad)?);
                let (e, s) = (Self::lookup(&self.execs, e)?, self.stream(s)?);
                ok(call!(d, cuGraphLaunch(e, s)))?;
            }
            Op::GraphDestroy => {
                let h = f.u64().map_err(bad)?;
                let g = Self::lookup(&self.graphs, h)?;
                ok(call!(d, cuGraphDestroy(g)))?;
                self.graphs.remove(&h);
            }
            Op::GraphExecDestroy => {
                let h = f.u64().map_err(bad)?;
                let e = Self::lookup(&self.execs, h)?;
                ok(call!(d, cuGraphExecDestroy(e)))?;
                self.execs.remove(&h);
            }
            Op::MemcpyDtoH => unreachable!("answered by copy_back"),
        }
        Ok(())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Vec<u8>>>> {
        self.modules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where each of `func`'s parameters sits in its parameter buffer.
    fn params(&self, func: Ptr) -> Result<Vec<(usize, usize)>, CUresult> {
        if self.d.cuFuncGetParamInfo.is_none() {
            // Before CUDA 12.4 a driver cannot say; launches then need `extra`'s flat buffer.
            return Ok(Vec::new());
        }
        let mut params = Vec::new();
        for index in 0..4096 {
            let (mut offset, mut size) = (0usize, 0usize);
            if call!(
                self.d,
                cuFuncGetParamInfo(func, index, &mut offset, &mut size)
            ) != status::SUCCESS
            {
                break;
            }
            params.push((offset, size));
        }
        Ok(params)
    }

    fn launch(&self, f: &mut Fields) -> Result<(), CUresult> {
        let bad = |_| status::INVALID_VALUE;
        let func = f.u64().map_err(bad)?;
        let mut dims = [0 as c_uint; 6];
        for d in &mut dims {
            *d = f.u32().map_err(bad)?;
        }
        let (shared, s, kind) = (
            f.u32().map_err(bad)?,
            f.u64().map_err(bad)?,
            f.u32().map_err(bad)?,
        );
        let attrs = f.bytes().map_err(bad)?;
        let params = f.bytes().map_err(bad)?;
        let as_extra = f.u32().map_err(bad)? != 0;
        // Borrowed, not copied: this runs once per kernel launch.
        let (func, layout) = self.functions.get(&func).ok_or(status::INVALID_HANDLE)?;
        let func = *func;
        let s = self.stream(s)?;
        // The driver copies the values out during the call; they only need to live until then.
        let mut buffer: Vec<u64> = vec![0; params.len().div_ceil(8)];
        // SAFETY: the buffer holds at least params.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(params.as_ptr(), buffer.as_mut_ptr().cast(), params.len())
        };
        let base = buffer.as_mut_ptr() as *mut u8;
        let mut size = params.len();
        let mut extra: [Ptr; 5] = [
            1 as Ptr,
            base.cast(),
            2 as Ptr,
            (&mut size as *mut usize).cast(),
            std::ptr::null_mut(),
        ];
        let mut pointers: Vec<Ptr> = Vec::new();
        if !as_extra {
            for (offset, len) in layout {
                if offset + len > params.len() {
                    return Err(status::INVALID_VALUE);
                }
                // SAFETY: inside the buffer, checked above.
                pointers.push(unsafe { base.add(*offset) }.cast());
            }
        }
        let (kp, ex) = if as_extra {
            (std::ptr::null_mut(), extra.as_mut_ptr())
        } else {
            (pointers.as_mut_ptr(), std::ptr::null_mut())
        };
        let [gx, gy, gz, bx, by, bz] = dims;
        let d = self.d;
        ok(match kind {
            0 => call!(
                d,
                cuLaunchKernel(func, gx, gy, gz, bx, by, bz, shared, s, kp, ex)
            ),
            1 => call!(
                d,
                cuLaunchCooperativeKernel(func, gx, gy, gz, bx, by, bz, shared, s, kp)
            ),
            2 => {
                let mut attrs_buf: Vec<u64> = vec![0; attrs.len().div_ceil(8)];
                // SAFETY: the buffer holds at least attrs.len() bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        attrs.as_ptr(),
                        attrs_buf.as_mut_ptr().cast(),
                        attrs.len(),
                    )
                };
                let config = LaunchConfig {
                    grid: [gx, gy, gz],
                    block: [bx, by, bz],
                    shared,
                    stream: s,
                    attrs: attrs_buf.as_mut_ptr().cast(),
                    num_attrs: (attrs.len() / LAUNCH_ATTRIBUTE_BYTES) as c_uint,
                };
                call!(d, cuLaunchKernelEx(&config, func, kp, ex))
            }
            _ => status::INVALID_VALUE,
        })
    }

    /// Device to host: the bytes go back one chunk at a time, each read while the last is sent.
    fn copy_back(&mut self, f: &mut Fields) -> io::Result<()> {
        let parsed =
            (|| -> io::Result<_> { Ok((f.u64()?, f.u64()? as usize, f.u64()?, f.u32()?)) })();
        let Ok((src, bytes, s, asynchronous)) = parsed else {
            return self.send(Frame::reply(status::INVALID_VALUE).finish(0).to_vec());
        };
        if asynchronous != 0 {
            // Work queued on the stream before the copy finishes before it.
            let code = match self.stream(s) {
                Ok(s) => call!(self.d, cuStreamSynchronize(s)),
                Err(code) => code,
            };
            if code != status::SUCCESS {
                return self.send(Frame::reply(code).finish(0).to_vec());
            }
        }
        let mut offset = 0;
        loop {
            let n = (bytes - offset).min(CHUNK);
            let mut frame = Frame::reply(status::SUCCESS);
            frame.buf.resize(8 + n, 0);
            let code = if n == 0 {
                status::SUCCESS
            } else {
                call!(
                    self.d,
                    cuMemcpyDtoH_v2(frame.buf[8..].as_mut_ptr().cast(), src + offset as u64, n)
                )
            };
            if code != status::SUCCESS {
                return self.send(Frame::reply(code).finish(0).to_vec());
            }
            frame.finish(0);
            self.send_with(frame.buf, false)?;
            offset += n;
            if offset >= bytes {
                return Ok(());
            }
        }
    }

    /// Frees what the client left behind: it went away (or was cut off) without cleaning up.
    pub fn release(&mut self) {
        let d = self.d;
        let _ = call!(d, cuCtxSynchronize());
        for (_, e) in self.execs.drain() {
            let _ = call!(d, cuGraphExecDestroy(e));
        }
        for (_, g) in self.graphs.drain() {
            let _ = call!(d, cuGraphDestroy(g));
        }
        for (_, e) in self.events.drain() {
            let _ = call!(d, cuEventDestroy_v2(e));
        }
        for (_, s) in self.streams.drain() {
            let _ = call!(d, cuStreamDestroy_v2(s));
        }
        for ptr in self.allocations.drain() {
            let _ = call!(d, cuMemFree_v2(ptr));
        }
        for (_, m) in self.loaded.drain() {
            let _ = call!(d, cuModuleUnload(m));
        }
        self.functions.clear();
    }
}
