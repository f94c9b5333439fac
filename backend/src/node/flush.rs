//! Flushing a node, and its sticky failure: once a flush failed, the kernel may have dropped
//! the writes it was to make durable and reports that only once, so every later flush of the
//! node fails too until it is reopened, rather than telling the guest its data is safe.

use std::sync::atomic::Ordering;

use super::Node;
use crate::accounting::{clock, IoKind};
use crate::error::{BlockError, Result};

impl Node {
    /// Makes completed writes durable (a no-op with cache.no-flush). After one flush failed,
    /// every later one fails as well (see `flush_failure`).
    pub async fn flush(&self) -> Result<()> {
        let start = clock::now();
        let result = self.flush_unaccounted().await;
        self.io.done(IoKind::Flush, 0, start, result.is_ok());
        result
    }

    async fn flush_unaccounted(&self) -> Result<()> {
        if self.flags.cache_no_flush() {
            return Ok(());
        }
        self.check_no_failed_flush()?;
        let result = self.driver.flush().await;
        if let Err(e) = &result {
            let errno = if e.errno() == 0 { libc::EIO } else { e.errno() };
            if self
                .flush_failure
                .compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                log::error!(
                    "node '{}': flush failed ({e}); writes may be lost, so every later flush \
                     fails too until the node is reopened",
                    self.name
                );
            }
        }
        result
    }

    /// Whether a flush of this node failed before (then no later flush can succeed).
    pub fn flush_failed(&self) -> bool {
        self.flush_failure.load(Ordering::Acquire) != 0
    }

    fn check_no_failed_flush(&self) -> Result<()> {
        match self.flush_failure.load(Ordering::Acquire) {
            0 => Ok(()),
            errno => Err(BlockError::from_errno(
                errno,
                format!(
                    "an earlier flush of node '{}' failed, so written data may be lost; \
                     reopen the node to go on",
                    self.name
                ),
            )),
        }
    }
}
