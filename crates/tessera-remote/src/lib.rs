//! Remote GPUs: an unmodified CUDA program on one node uses a slice of a GPU on another.
//!
//! The workload's side is `tessera-remote-cuda`, a `libcuda.so.1` that forwards the driver API
//! over one TCP stream; this crate holds what both sides share ([`wire`], [`auth`]), the GPU
//! node's server ([`server`], over the node's own driver: [`driver`]), TLS for untrusted networks
//! ([`tls`]) and a relay that adds latency for tests and benchmarks ([`relay`]). docs/remote-gpu.md says how it fits together.

pub mod auth;
pub mod cli;
pub mod driver;
pub mod relay;
pub mod server;
pub mod tls;
pub mod wire;

/// Reads an attachment's secret from a file the agent wrote (surrounding whitespace dropped).
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let s = raw.trim_ascii().to_vec();
    if s.len() < 16 {
        return Err(format!(
            "{}: a secret of {} bytes is too short (at least 16: the agent writes 32 random bytes)",
            path.display(),
            s.len()
        ));
    }
    Ok(s)
}
