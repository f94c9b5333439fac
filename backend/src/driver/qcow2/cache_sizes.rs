//! Cache sizes from QEMU's options (`cache-size`, `l2-cache-size`, `refcount-cache-size`,
//! `l2-cache-entry-size`), resolved as QEMU's `read_cache_sizes` does.

use super::header::Header;
use crate::driver::OpenContext;
use crate::error::{BlockError, Result};

/// QEMU's default upper bound of the L2 cache (32 MiB).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Minimum refcount cache, in clusters.
const MIN_REFCOUNT_CACHE_CLUSTERS: u64 = 4;

/// Cache sizes from QEMU's options (`read_cache_sizes`).
pub(super) struct CacheSizes {
    /// L2 cache, in bytes.
    pub(super) l2_bytes: u64,
    /// Size of one L2 cache entry (a slice of an L2 table), in bytes.
    pub(super) l2_entry_bytes: u64,
    /// Refcount block cache, in bytes.
    pub(super) refcount_bytes: u64,
}

/// Takes the cache options from `ctx` and resolves them for an image with header `h`.
pub(super) fn cache_sizes(ctx: &mut OpenContext<'_>, h: &Header) -> Result<CacheSizes> {
    let cs = h.cluster_size();
    let combined = ctx.options.take_size("cache-size")?;
    let l2_set = ctx.options.take_size("l2-cache-size")?;
    let rc_set = ctx.options.take_size("refcount-cache-size")?;
    let entry_set = ctx.options.take_size("l2-cache-entry-size")?;
    let max_l2_cache = (h.size.div_ceil(cs) * h.l2_entry_size()).div_ceil(cs) * cs;
    let mut l2 = max_l2_cache.min(l2_set.unwrap_or(DEFAULT_L2_CACHE_MAX));
    let mut rc = rc_set.unwrap_or(0);
    let min_rc = MIN_REFCOUNT_CACHE_CLUSTERS * cs;
    if let Some(combined) = combined {
        if l2_set.is_some() && rc_set.is_some() {
            return Err(BlockError::invalid(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            ));
        }
        if l2_set.is_some_and(|l| l > combined) {
            return Err(BlockError::invalid(
                "l2-cache-size may not exceed cache-size",
            ));
        }
        if rc > combined {
            return Err(BlockError::invalid(
                "refcount-cache-size may not exceed cache-size",
            ));
        }
        if l2_set.is_some() {
            rc = combined - l2;
        } else if rc_set.is_some() {
            l2 = combined - rc;
        } else if combined >= max_l2_cache + min_rc {
            l2 = max_l2_cache;
            rc = combined - l2;
        } else {
            rc = combined.min(min_rc);
            l2 = combined - rc;
        }
    }
    let mut entry = entry_set.unwrap_or(cs);
    if l2 < max_l2_cache && entry_set.is_none() {
        entry = cs.min(4096);
    }
    if entry < 512 || entry > cs || !entry.is_power_of_two() {
        return Err(BlockError::invalid(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        )));
    }
    Ok(CacheSizes {
        l2_bytes: l2,
        l2_entry_bytes: entry,
        refcount_bytes: rc,
    })
}
