//! The read path: the lock-free fast path for data in one cached cluster, the general path
//! through the mapping, reads from the backing node, and compressed clusters.

use super::mapping::Kind;
use super::refcount::read_bytes;
use super::{compress, Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO};
use crate::driver::IoFuture;
use crate::error::Result;
use crate::io::iovec::{self, IoVec};

impl Qcow2 {
    /// Reads guest range `offset..` from the backing node (zeroes past its end or without one).
    pub(super) async fn read_backing(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let len = iovec::total_len(iov);
        let Some(b) = &self.backing else {
            iovec::zero_iov(iov, 0);
            return Ok(());
        };
        let have = b.size().saturating_sub(offset).min(len);
        if have < len {
            iovec::zero_iov(iov, have as usize);
        }
        if have > 0 {
            let part = iovec::sub_iov(iov, 0, have as usize);
            b.read(offset, &part).await?;
        }
        Ok(())
    }

    /// Decompresses the cluster of a compressed L2 entry.
    pub(super) async fn read_compressed_cluster(&self, entry: u64) -> Result<Vec<u8>> {
        let (offset, csize) = self.compressed_extent(entry);
        // The last sector may lie past the end of the file.
        let avail = self.file.size().saturating_sub(offset).min(csize);
        if avail == 0 {
            return Err(self.corrupt(format!(
                "compressed cluster at {offset:#x} lies past the end of the file"
            )));
        }
        let input = read_bytes(&self.file, offset, avail as usize, "compressed cluster").await?;
        let mut out = vec![0u8; self.cluster_size as usize];
        compress::decompress(self.header.compression_type, &input, &mut out)
            .map_err(|e| e.context(format!("cluster at {offset:#x}")))?;
        Ok(out)
    }

    /// A read of data this image holds in one cluster whose L2 slice is cached: the whole
    /// request goes to the file child with no further lookup or allocation. `None` for
    /// everything else (the general path handles it).
    #[inline]
    pub(super) fn read_fast<'a>(
        &'a self,
        offset: u64,
        iov: &'a [IoVec<'a>],
    ) -> Option<IoFuture<'a, ()>> {
        if self.ext_l2() {
            return None;
        }
        let cs = self.cluster_size;
        let intra = offset & (cs - 1);
        let len = iovec::total_len(iov);
        if len == 0 || intra + len > cs {
            return None;
        }
        // Entered before the lookup, as in `read_impl`: the host cluster cannot be freed
        // until the read finished.
        let guard = self.epoch.enter();
        let cluster = offset >> self.cluster_bits;
        let l2_off = self.l1.load().get(cluster >> self.l2_bits)? & L1E_OFFSET_MASK;
        if l2_off == 0 || l2_off & (cs - 1) != 0 {
            return None;
        }
        let in_table = cluster & ((1 << self.l2_bits) - 1);
        let slice_off = l2_off + (in_table / self.slice_entries) * self.l2.slice_bytes();
        let entry = self
            .l2
            .peek(slice_off, (in_table % self.slice_entries) as usize)?;
        let host = entry & L2E_OFFSET_MASK;
        if entry & (OFLAG_COMPRESSED | OFLAG_ZERO) != 0 || host == 0 || host & (cs - 1) != 0 {
            return None;
        }
        let file = &self.file;
        Some(Box::pin(async move {
            let _guard = guard;
            file.read(host + intra, iov).await
        }))
    }

    /// Reads guest bytes from `offset` into `iov`, range by range of the mapping.
    pub(super) async fn read_impl(&self, offset: u64, iov: &[IoVec<'_>]) -> Result<()> {
        let len = iovec::total_len(iov);
        let _guard = self.epoch.enter();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (kind, n) = self.map(pos, len - done).await?;
            let part = iovec::sub_iov(iov, done as usize, n as usize);
            match kind {
                Kind::Data { host, .. } => self.file.read(host, &part).await?,
                Kind::Zero => iovec::zero_iov(&part, 0),
                Kind::Unallocated => self.read_backing(pos, &part).await?,
                Kind::Compressed { entry } => {
                    let cluster = self.read_compressed_cluster(entry).await?;
                    let intra = (pos & (self.cluster_size - 1)) as usize;
                    iovec::copy_to_iov(&part, 0, &cluster[intra..intra + n as usize]);
                }
            }
            done += n;
        }
        Ok(())
    }
}
