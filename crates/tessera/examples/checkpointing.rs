//! A training loop that Tessera can preempt and move without losing its progress: it resumes
//! from `$TESSERA_RESUME_FROM`, saves into `$TESSERA_CHECKPOINT_DIR` every
//! `$TESSERA_CHECKPOINT_INTERVAL` seconds, and when Tessera sends `$TESSERA_CHECKPOINT_SIGNAL`
//! it saves and exits. Submit it with, e.g.:
//!
//! ```sh
//! tessera submit --gpu 1 --checkpoint-interval 1m --checkpoint-grace 30s -- \
//!     target/release/examples/checkpointing
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> std::io::Result<()> {
    let dir = std::env::var_os("TESSERA_CHECKPOINT_DIR").map(PathBuf::from);
    let resume = std::env::var_os("TESSERA_RESUME_FROM").map(PathBuf::from);
    let every = std::env::var("TESSERA_CHECKPOINT_INTERVAL")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    if let Some(sig) = std::env::var("TESSERA_CHECKPOINT_SIGNAL")
        .ok()
        .and_then(|s| format!("SIG{s}").parse::<nix::sys::signal::Signal>().ok())
    {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::Handler(on_signal))
                .map_err(std::io::Error::other)?;
        }
    }
    // The last complete checkpoint, if this is a restart.
    let mut step: u64 = match &resume {
        Some(r) if r.join("COMPLETE").exists() => std::fs::read_to_string(r.join("step"))?
            .trim()
            .parse()
            .unwrap_or(0),
        _ => 0,
    };
    println!("starting at step {step}");
    let save = |step: u64| -> std::io::Result<()> {
        let Some(d) = &dir else { return Ok(()) };
        let _ = std::fs::remove_file(d.join("COMPLETE")); // replacing the last one
        std::fs::write(d.join("step"), step.to_string())?;
        std::fs::File::open(d.join("step"))?.sync_all()?;
        std::fs::write(d.join("COMPLETE"), b"")?; // complete: written last
        Ok(())
    };
    let mut last = Instant::now();
    while step < 1000 {
        std::thread::sleep(Duration::from_millis(10)); // one "training step"
        step += 1;
        let stop = STOP.load(Ordering::SeqCst);
        if stop || every.is_some_and(|e| last.elapsed() >= e) {
            save(step)?;
            last = Instant::now();
            if stop {
                println!("checkpointed at step {step}; stopping");
                return Ok(());
            }
        }
    }
    println!("done at step {step}");
    Ok(())
}
