//! The disk-space guard: the store's file system must not fill up, or the store cannot commit and
//! the whole pool stops. Below the reserve, new work (a submission, a service, a scale-up) is
//! refused with 507 Insufficient Storage; running work, its status reports and every read go on,
//! and the pool takes new work again as soon as space returns.

use axum::http::StatusCode;

use super::{ApiError, Ctl};

/// Bytes an unprivileged writer may still use on the file system holding `path`.
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Refuses `what` (e.g. "submissions") with 507 when the store's file system is below the
/// reserve.
pub fn guard(ctl: &Ctl, what: &str) -> Result<(), ApiError> {
    let reserve = ctl.config.disk_reserve;
    let free = match free_bytes(&ctl.config.data_dir) {
        Ok(free) => free,
        // A file system that cannot say how full it is is not a reason to stop the pool.
        Err(e) => {
            tracing::warn!("the free space of the data dir is unknown: {e}");
            return Ok(());
        }
    };
    if free >= reserve {
        return Ok(());
    }
    tracing::warn!("refusing new {what}: {free} bytes free, reserve {reserve}");
    Err(ApiError::new(
        StatusCode::INSUFFICIENT_STORAGE,
        format!(
            "the pool's store has {} MiB free, below its reserve of {} MiB: new {what} are \
             refused until space returns (running work goes on); an admin should free space on \
             the controller's disk (large job output, old run dirs) or lower --disk-reserve",
            free >> 20,
            reserve >> 20
        ),
    ))
}
