//! Guest memory lookups that remember the regions they found.
//!
//! A request touches guest memory four or five times (descriptor table, header, data, status
//! byte), nearly always in the same one or two regions (the driver's ring memory and its
//! buffers). vm-memory finds the region again for every access, a binary search that cost
//! about as much as the rest of a small copy; this cache checks the two regions it saw last
//! first. Everything still goes through vm-memory's checked slices.

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, VolatileSlice,
};

/// A view of one guest memory map that remembers the last two regions it found.
pub(crate) struct RegionCache<'m> {
    mem: &'m GuestMemoryMmap,
    /// Most recently used first.
    recent: [Option<&'m GuestRegionMmap>; 2],
}

impl<'m> RegionCache<'m> {
    pub(crate) fn new(mem: &'m GuestMemoryMmap) -> Self {
        RegionCache {
            mem,
            recent: [None; 2],
        }
    }

    /// The memory map itself, for accesses that may span regions.
    pub(crate) fn mem(&self) -> &'m GuestMemoryMmap {
        self.mem
    }

    /// The `len` bytes at `addr` as one slice, or None when they do not lie in one region.
    #[inline]
    pub(crate) fn slice(
        &mut self,
        addr: GuestAddress,
        len: usize,
    ) -> Option<VolatileSlice<'m, ()>> {
        if let Some(s) = self.recent[0].and_then(|r| slice_in(r, addr, len)) {
            return Some(s);
        }
        if let Some(r) = self.recent[1] {
            if let Some(s) = slice_in(r, addr, len) {
                self.recent.swap(0, 1);
                return Some(s);
            }
        }
        let region = self.mem.find_region(addr)?;
        self.recent = [Some(region), self.recent[0]];
        slice_in(region, addr, len)
    }
}

/// The `len` bytes at `addr` inside `region`, if they lie wholly in it.
#[inline]
fn slice_in(
    region: &GuestRegionMmap,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_, ()>> {
    let offset = addr.checked_offset_from(region.start_addr())?;
    region.get_slice(MemoryRegionAddress(offset), len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x2000),
        ])
        .expect("anonymous test mappings")
    }

    #[test]
    fn slices_match_the_memory_map() {
        let mem = two_regions();
        let mut cache = RegionCache::new(&mem);
        for (addr, len) in [
            (0x1000, 16),
            (0x4000, 0x2000),
            (0x1ff0, 16),
            (0x4100, 1),
            (0x1000, 1),
        ] {
            let ours = cache
                .slice(GuestAddress(addr), len)
                .expect("inside a region");
            let theirs = mem
                .get_slice(GuestAddress(addr), len)
                .expect("inside a region");
            assert_eq!(ours.ptr_guard().as_ptr(), theirs.ptr_guard().as_ptr());
            assert_eq!(ours.len(), len);
        }
    }

    #[test]
    fn ranges_outside_one_region_are_refused() {
        let mem = two_regions();
        let mut cache = RegionCache::new(&mem);
        // Warm the cache with both regions, then ask for what neither holds wholly.
        assert!(cache.slice(GuestAddress(0x1000), 1).is_some());
        assert!(cache.slice(GuestAddress(0x4000), 1).is_some());
        for (addr, len) in [
            (0x1ff0, 17),
            (0x2000, 1),
            (0xfff, 2),
            (0x5fff, 2),
            (0x6000, 1),
            (0, 1),
        ] {
            assert!(
                cache.slice(GuestAddress(addr), len).is_none(),
                "{addr:#x}+{len}"
            );
        }
        assert!(cache.slice(GuestAddress(u64::MAX), 1).is_none());
    }
}
