//! One file's writes that are not yet durable: pages over the backing file, as a disk's
//! volatile cache holds them. An fsync writes them to the backing file; a power loss drops
//! them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The overlay's unit: a write makes its whole page volatile.
pub const PAGE: u64 = 4096;

static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// A page of the overlay.
struct Page {
    /// Its bytes; `None` reads as zeroes (punched holes, zeroed ranges).
    bytes: Option<Box<[u8]>>,
    /// Written since the last fsync. A page whose fsync failed stays readable but is no
    /// longer dirty: like the kernel after a failed write-back, a later fsync does not
    /// write it, and a power loss drops it.
    dirty: bool,
}

/// A backing file and its volatile state.
pub struct Overlay {
    backing: File,
    pages: BTreeMap<u64, Page>,
    /// The file's size as its users see it.
    size: u64,
    /// The backing file's size.
    backing_size: u64,
    /// Backing bytes at or past this offset read as zeroes (the file was truncated below them
    /// since the last fsync).
    zero_from: u64,
}

impl Overlay {
    /// An overlay with nothing volatile over `backing`.
    pub fn new(backing: File) -> io::Result<Overlay> {
        let size = backing.metadata()?.len();
        Ok(Overlay {
            backing,
            pages: BTreeMap::new(),
            size,
            backing_size: size,
            zero_from: size,
        })
    }

    /// The size users see.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The pages written since the last fsync.
    pub fn dirty_pages(&self) -> usize {
        self.pages.values().filter(|p| p.dirty).count()
    }

    /// The bytes of page `index` as they read now (overlay, else backing file, else zeroes).
    fn page_view(&self, index: u64) -> io::Result<Vec<u8>> {
        if let Some(p) = self.pages.get(&index) {
            return Ok(p.bytes.as_deref().unwrap_or(&ZERO_PAGE).to_vec());
        }
        let mut buf = vec![0u8; PAGE as usize];
        let start = index * PAGE;
        let end = (start + PAGE).min(self.backing_size).min(self.zero_from);
        if end > start {
            self.backing
                .read_exact_at(&mut buf[..(end - start) as usize], start)?;
        }
        Ok(buf)
    }

    /// Reads up to `len` bytes at `offset` (short at the end of the file).
    pub fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let end = (offset + len as u64).min(self.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let index = at / PAGE;
            let page = self.page_view(index)?;
            let from = (at - index * PAGE) as usize;
            let to = (end - index * PAGE).min(PAGE) as usize;
            out.extend_from_slice(&page[from..to]);
            at = index * PAGE + to as u64;
        }
        Ok(out)
    }

    /// Applies `f` to the bytes `[offset, offset + len)` of each page they touch, making the
    /// pages dirty; `f` gets the page, the range within it and the range's offset in the
    /// request.
    fn modify(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut [u8], usize),
    ) -> io::Result<()> {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let index = at / PAGE;
            let from = (at - index * PAGE) as usize;
            let to = (end - index * PAGE).min(PAGE) as usize;
            let mut bytes = match self.pages.remove(&index) {
                Some(Page {
                    bytes: Some(b),
                    dirty: _,
                }) => b,
                Some(Page { bytes: None, .. }) => vec![0; PAGE as usize].into_boxed_slice(),
                None => self.page_view(index)?.into_boxed_slice(),
            };
            f(&mut bytes[from..to], (at - offset) as usize);
            self.pages.insert(
                index,
                Page {
                    bytes: Some(bytes),
                    dirty: true,
                },
            );
            at = index * PAGE + to as u64;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, growing the file if it ends past its end.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.modify(offset, data.len() as u64, |page, at| {
            page.copy_from_slice(&data[at..at + page.len()])
        })?;
        self.size = self.size.max(offset + data.len() as u64);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes (whole pages become zero pages).
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let first_whole = offset.div_ceil(PAGE);
        let last_whole = end / PAGE;
        if first_whole >= last_whole {
            return self.modify(offset, len, |page, _| page.fill(0));
        }
        self.modify(offset, first_whole * PAGE - offset, |page, _| page.fill(0))?;
        for index in first_whole..last_whole {
            self.pages.insert(
                index,
                Page {
                    bytes: None,
                    dirty: true,
                },
            );
        }
        self.modify(last_whole * PAGE, end - last_whole * PAGE, |page, _| {
            page.fill(0)
        })
    }

    /// Sets the size (ftruncate, or fallocate growing the file).
    pub fn set_size(&mut self, size: u64) -> io::Result<()> {
        if size < self.size {
            // Bytes past the new end must read as zeroes if the file grows again.
            let tail = size % PAGE;
            if tail != 0 && self.pages.contains_key(&(size / PAGE)) {
                self.modify(size, PAGE - tail, |page, _| page.fill(0))?;
            }
            self.pages.split_off(&size.div_ceil(PAGE));
            self.zero_from = self.zero_from.min(size);
        }
        self.size = size;
        Ok(())
    }

    /// Writes every dirty page and the size to the backing file and syncs it (fsync, or
    /// fdatasync for `datasync`). The pages then leave the overlay.
    pub fn sync(&mut self, datasync: bool) -> io::Result<()> {
        if self.zero_from < self.backing_size {
            self.backing.set_len(self.zero_from)?;
            self.backing_size = self.zero_from;
        }
        for (&index, page) in &self.pages {
            if !page.dirty {
                continue;
            }
            self.write_back(index, page)?;
        }
        if self.size != self.backing.metadata()?.len() {
            self.backing.set_len(self.size)?;
        }
        if datasync {
            self.backing.sync_data()?;
        } else {
            self.backing.sync_all()?;
        }
        self.pages.retain(|_, p| !p.dirty);
        self.backing_size = self.size;
        self.zero_from = self.size;
        Ok(())
    }

    /// Writes page `index` to the backing file, but for what lies past the overlay's size.
    fn write_back(&self, index: u64, page: &Page) -> io::Result<()> {
        let start = index * PAGE;
        let end = (start + PAGE).min(self.size);
        if end > start {
            let bytes = page.bytes.as_deref().unwrap_or(&ZERO_PAGE);
            self.backing
                .write_all_at(&bytes[..(end - start) as usize], start)?;
        }
        Ok(())
    }

    /// A failed fsync: the dirty pages stay readable but will never be written (as the
    /// kernel marks pages clean when their write-back fails).
    pub fn lose_dirty_state(&mut self) {
        for p in self.pages.values_mut() {
            p.dirty = false;
        }
    }

    /// A power loss: the pages `keep` chooses reach the backing file (a disk's cache may
    /// have written any of them), the rest are gone, and the size is what the backing file
    /// has.
    pub fn power_loss(&mut self, mut keep: impl FnMut() -> bool) -> io::Result<()> {
        for (&index, page) in &self.pages {
            if !page.dirty || !keep() {
                continue;
            }
            self.write_back(index, page)?;
        }
        self.pages.clear();
        self.size = self.backing.metadata()?.len();
        self.backing_size = self.size;
        self.zero_from = self.size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(content: &[u8]) -> (tempfile::TempDir, Overlay) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, content).unwrap();
        let f = File::options().read(true).write(true).open(&path).unwrap();
        (dir, Overlay::new(f).unwrap())
    }

    fn backing(dir: &tempfile::TempDir) -> Vec<u8> {
        std::fs::read(dir.path().join("f")).unwrap()
    }

    #[test]
    fn writes_reach_the_backing_file_only_on_sync() {
        let (dir, mut o) = overlay(&[1; 10000]);
        o.write(5000, &[2; 100]).unwrap();
        o.write(9990, &[3; 20]).unwrap();
        assert_eq!(o.size(), 10010);
        assert_eq!(
            o.read(4990, 20).unwrap()[..],
            [[1; 10], [2; 10]].concat()[..]
        );
        assert_eq!(backing(&dir), vec![1; 10000]);
        o.sync(true).unwrap();
        let b = backing(&dir);
        assert_eq!(b.len(), 10010);
        assert_eq!(b[5000..5100], [2; 100]);
        assert_eq!(b[4999], 1);
        assert_eq!(b[9990..], [3; 20]);
        assert_eq!(o.dirty_pages(), 0);
    }

    #[test]
    fn power_loss_drops_unsynced_writes_and_sizes() {
        let (dir, mut o) = overlay(&[1; 8192]);
        o.write(0, &[2; 512]).unwrap();
        o.sync(false).unwrap();
        o.write(512, &[3; 512]).unwrap();
        o.set_size(100).unwrap();
        o.set_size(20000).unwrap();
        assert_eq!(
            o.read(50, 100).unwrap()[..],
            [[2; 50], [0; 50]].concat()[..]
        );
        assert_eq!(o.read(8000, 10).unwrap(), vec![0; 10]);
        o.power_loss(|| false).unwrap();
        assert_eq!(o.size(), 8192);
        let b = backing(&dir);
        assert_eq!(b[..512], [2; 512]);
        assert_eq!(b[512..], [1; 8192 - 512][..]);
        assert_eq!(o.read(0, 8192).unwrap(), b);
    }

    #[test]
    fn zeroes_and_truncation_sync_as_they_read() {
        let (dir, mut o) = overlay(&[7; 5 * PAGE as usize]);
        o.zero(100, 3 * PAGE).unwrap();
        o.set_size(4 * PAGE + 10).unwrap();
        let want = o.read(0, 5 * PAGE as usize).unwrap();
        assert_eq!(want.len(), 4 * PAGE as usize + 10);
        assert!(want[100..100 + 3 * PAGE as usize].iter().all(|&b| b == 0));
        o.sync(true).unwrap();
        assert_eq!(backing(&dir), want);
    }

    #[test]
    fn a_failed_sync_loses_the_pages_for_good() {
        let (dir, mut o) = overlay(&[1; 4096]);
        o.write(0, &[2; 10]).unwrap();
        o.lose_dirty_state();
        assert_eq!(o.read(0, 1).unwrap(), [2]);
        o.sync(true).unwrap();
        assert_eq!(backing(&dir)[0], 1);
        o.power_loss(|| true).unwrap();
        assert_eq!(o.read(0, 1).unwrap(), [1]);
    }
}
