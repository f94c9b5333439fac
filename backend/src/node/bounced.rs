//! The data path for requests the storage cannot take as they are (O_DIRECT with an offset,
//! length or buffer address off its alignment): reads widened to whole blocks through a bounce
//! buffer, writes of partial blocks by read-modify-write, writes from misaligned memory copied
//! into an aligned buffer, each a chunk at a time. Aligned requests never come here: they go
//! zero-copy from [`Node::read`] and [`Node::write`] in `mod.rs`.

use super::{to_usize, Node};
use crate::error::Result;
use crate::io::bounce::{BounceBuffer, BOUNCE_CHUNK};
use crate::io::iovec::{self, IoVec};

impl Node {
    /// Reads through an aligned bounce buffer, widened to the request alignment, a chunk at a
    /// time (see [`crate::io::bounce`]).
    pub(super) async fn read_bounced(
        &self,
        offset: u64,
        iov: &[IoVec<'_>],
        len: u64,
    ) -> Result<()> {
        self.stats.bounced.add(1);
        let (start, end) = self.widen(offset, len);
        let chunk = self.bounce_chunk();
        let mut at = start;
        while at < end {
            let n = chunk.min(end - at);
            let mut buf = BounceBuffer::acquire(to_usize(n)?).await?;
            self.driver.read(at, &[buf.iovec()]).await?;
            // The part of this chunk the caller asked for, and where it goes in its buffers.
            let from = offset.max(at);
            let to = (offset + len).min(at + n);
            let bytes = &buf.as_slice()[to_usize(from - at)?..to_usize(to - at)?];
            iovec::copy_to_iov(iov, to_usize(from - offset)?, bytes);
            at += n;
        }
        Ok(())
    }

    /// The most bytes a request bounces at once: [`BOUNCE_CHUNK`], in whole aligned blocks.
    fn bounce_chunk(&self) -> u64 {
        let a = u64::from(self.request_alignment());
        (BOUNCE_CHUNK as u64 / a * a).max(a)
    }

    /// A write of partial blocks: reads the blocks at its ends, merges, writes them whole, a
    /// chunk at a time. The caller holds the serialiser's exclusive range over `start..end`.
    pub(super) async fn write_rmw(
        &self,
        offset: u64,
        iov: &[IoVec<'_>],
        len: u64,
        start: u64,
        end: u64,
    ) -> Result<()> {
        self.stats.read_modify_write.add(1);
        self.stats.bounced.add(1);
        let a = u64::from(self.request_alignment());
        let block = to_usize(a)?;
        let chunk = self.bounce_chunk();
        let mut at = start;
        while at < end {
            let n = chunk.min(end - at);
            let size = to_usize(n)?;
            let mut buf = BounceBuffer::acquire(size).await?;
            // Read the partial blocks at the request's ends that lie in this chunk (once if
            // they are the same block).
            let head_partial = at == start && offset > start;
            if head_partial {
                let part = &mut buf.as_mut_slice()[..block];
                self.driver.read(at, &[IoVec::new(part)]).await?;
            }
            let tail_partial = at + n == end && (offset + len) % a != 0;
            if tail_partial && !(head_partial && n == a) {
                let part = &mut buf.as_mut_slice()[size - block..];
                self.driver.read(end - a, &[IoVec::new(part)]).await?;
            }
            let from = offset.max(at);
            let to = (offset + len).min(at + n);
            let dst = &mut buf.as_mut_slice()[to_usize(from - at)?..to_usize(to - at)?];
            iovec::copy_from_iov(iov, to_usize(from - offset)?, dst);
            self.driver.write(at, &[buf.iovec()]).await?;
            at += n;
        }
        Ok(())
    }

    /// Writes through an aligned bounce buffer (the caller's memory is misaligned), a chunk
    /// at a time.
    pub(super) async fn write_bounced(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        self.stats.bounced.add(1);
        let len = iovec::total_len(iov);
        let chunk = self.bounce_chunk();
        let mut done = 0;
        while done < len {
            let n = chunk.min(len - done);
            let mut buf = BounceBuffer::acquire(to_usize(n)?).await?;
            iovec::copy_from_iov(iov, to_usize(done)?, buf.as_mut_slice());
            self.driver.write(offset + done, &[buf.iovec()]).await?;
            done += n;
        }
        Ok(())
    }
}
