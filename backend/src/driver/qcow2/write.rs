//! The write path: in-place writes into clusters this image owns, and allocating writes
//! with copy-on-write of the partial clusters at both ends.

use super::mapping::Kind;
use super::{Qcow2, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::Result;
use crate::io::iovec::{self, IoVec};

/// Longest run of clusters one allocating write takes at once.
const MAX_ALLOC_RUN: u64 = 1024;

impl Qcow2 {
    /// The logical content of `len` bytes at guest `offset` inside the cluster whose old L2
    /// entry is `entry` (for copy-on-write).
    async fn cow_data(&self, entry: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        if len == 0 {
            return Ok(buf);
        }
        let intra = offset & (self.cluster_size - 1);
        match self.classify(entry, 0, intra, (0, 0))?.0 {
            Kind::Zero => {}
            Kind::Unallocated => self.read_backing(offset, &[IoVec::new(&mut buf)]).await?,
            Kind::Data { host, .. } => {
                self.file.read(host, &[IoVec::new(&mut buf)]).await?;
            }
            Kind::Compressed { entry } => {
                let cluster = self.read_compressed_cluster(entry).await?;
                buf.copy_from_slice(&cluster[intra as usize..(intra + len) as usize]);
            }
        }
        Ok(buf)
    }

    /// Whether writing into the cluster of this entry needs a new cluster.
    fn needs_alloc(entry: u64) -> bool {
        entry & OFLAG_COMPRESSED != 0
            || entry & OFLAG_ZERO != 0
            || entry & OFLAG_COPIED == 0
            || entry & L2E_OFFSET_MASK == 0
    }

    /// Writes data at `pos` (the `done..` part of `iov`) into newly allocated clusters, with
    /// copy-on-write of the partial clusters at both ends. Returns the bytes written, or 0
    /// if the first cluster needs no allocation any more (the caller writes it in place).
    async fn write_alloc(&self, pos: u64, iov: &[IoVec<'_>], done: u64, len: u64) -> Result<u64> {
        let cs = self.cluster_size;
        let c0 = pos >> self.cluster_bits;
        let req_end = pos + (len - done);
        let slice_end = (c0 / self.slice_entries + 1) * self.slice_entries;
        let c_max = req_end.div_ceil(cs).min(slice_end).min(c0 + MAX_ALLOC_RUN);
        let mut meta = loop {
            let meta = self.meta.lock().await;
            if !self.inflight.overlaps(c0, c_max) {
                break meta;
            }
            drop(meta);
            self.inflight.wait_clear(c0, c_max).await;
        };
        let (slice, index) = self.slice_for_update(&mut meta, c0).await?;
        let mut old = Vec::new();
        for i in 0..(c_max - c0) {
            let (entry, _) = self.entry_at(&slice, index + i);
            if !Self::needs_alloc(entry) {
                break;
            }
            old.push(entry);
        }
        if old.is_empty() {
            return Ok(0);
        }
        let n = old.len() as u64;
        let host = meta.rc()?.alloc(n).await?;
        // Free by the refcounts, but a corrupt image may still keep metadata there.
        self.guard_write(host, n * cs, 0).await?;
        let guard = self.inflight.register(c0, c0 + n);
        drop(meta);

        let start = c0 * cs;
        let end = (c0 + n) * cs;
        let wend = req_end.min(end);
        let written = wend - pos;
        let data = async {
            let mut head = self.cow_data(old[0], start, pos - start).await?;
            let mut tail = self.cow_data(old[n as usize - 1], wend, end - wend).await?;
            let mut v = Vec::with_capacity(iov.len() + 2);
            if !head.is_empty() {
                v.push(IoVec::new(&mut head));
            }
            v.extend(iovec::sub_iov(iov, done as usize, written as usize));
            if !tail.is_empty() {
                v.push(IoVec::new(&mut tail));
            }
            self.file.write_growing(host, &v).await
        }
        .await;
        let mut meta = self.meta.lock().await;
        if let Err(e) = data {
            // Nothing references the new clusters: give them back at once.
            let rc = meta.rc()?;
            for i in 0..n {
                rc.update((host >> self.cluster_bits) + i, -1).await?;
            }
            return Err(e);
        }
        let mut frees = Vec::new();
        for (i, &entry) in old.iter().enumerate() {
            let new = (host + i as u64 * cs) | OFLAG_COPIED;
            self.freed_by(entry, new, &mut frees);
            slice.set((index as usize + i) * self.words(), new);
        }
        self.l2.mark_dirty(&slice);
        meta.pending_frees.extend(frees);
        drop(guard);
        self.after_change(&mut meta).await?;
        Ok(written)
    }

    /// Writes `iov` at guest `offset`: in place where this image owns the clusters,
    /// through allocating writes elsewhere.
    pub(super) async fn write_impl(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        self.check_writable()?;
        let len = iovec::total_len(iov);
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let in_place = {
                let _guard = self.epoch.enter();
                match self.map(pos, len - done).await? {
                    (Kind::Data { host, copied: true }, n) => {
                        self.guard_write(host, n, 0).await?;
                        let part = iovec::sub_iov(iov, done as usize, n as usize);
                        self.file.write_growing(host, &part).await?;
                        n
                    }
                    _ => 0,
                }
            };
            done += if in_place > 0 {
                in_place
            } else {
                self.write_alloc(pos, iov, done, len).await?
            };
        }
        Ok(())
    }
}
