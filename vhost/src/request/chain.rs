//! Walking a descriptor chain of a split virtqueue in guest memory.
//!
//! Every guest address is checked against the guest's memory regions before use (vm-memory's
//! checked accessors); a chain that loops, nests indirect tables or points outside guest
//! memory is refused. The device never trusts a length or an index it read from guest memory.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, VolatileMemory, VolatileSlice};

use super::ChainError;
use crate::device_config::MAX_INDIRECT_DESCS;
use crate::regions::RegionCache;

/// One descriptor of a chain, as the guest gave it (not yet checked against guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A virtqueue's descriptor table: its guest address and number of entries (the queue size).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DescTable {
    pub addr: GuestAddress,
    pub size: u16,
}

impl DescTable {
    /// The table with its guest memory looked up, for the chains of one batch.
    pub(crate) fn view<'m>(self, regions: &mut RegionCache<'m>) -> TableView<'m> {
        TableView {
            table: self,
            slice: regions.slice(self.addr, usize::from(self.size) * 16),
        }
    }
}

/// A descriptor table and, when it lies in one region of guest memory (it nearly always
/// does), that memory as one checked slice: found once per batch instead of once per chain.
#[derive(Clone, Copy)]
pub(crate) struct TableView<'m> {
    pub table: DescTable,
    slice: Option<VolatileSlice<'m, ()>>,
}

/// Starts loading, for every chain in `heads`, the head descriptor and then the first buffer it
/// points to (the request header, or an indirect table), so that parsing the batch does not
/// wait for each cache line in turn: the driver's CPU has just written them.
///
/// Only a hint: it reads nothing it relies on and skips whatever is out of range.
pub(crate) fn prefetch_chains(regions: &mut RegionCache<'_>, view: &TableView<'_>, heads: &[u16]) {
    let (Some(descs), size) = (view.slice, view.table.size) else {
        return;
    };
    let base = descs.ptr_guard().as_ptr();
    for &head in heads.iter().filter(|&&h| h < size) {
        prefetch(base.wrapping_add(usize::from(head) * 16));
    }
    for &head in heads.iter().filter(|&&h| h < size) {
        // A descriptor starts with its buffer's guest address (little-endian u64).
        let Ok(addr) = descs.get_ref::<u64>(usize::from(head) * 16) else {
            continue;
        };
        if let Some(buf) = regions.slice(GuestAddress(u64::from_le(addr.load())), 1) {
            prefetch(buf.ptr_guard().as_ptr());
        }
    }
}

/// Asks the CPU to start loading the cache line at `ptr`.
fn prefetch(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, whatever the address; SSE, which
    // provides it, is part of every x86_64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Reads the chain starting at descriptor `head` of `view`'s table into `out`.
///
/// Follows NEXT links and one indirect table (as the first descriptor, when `indirect_ok`);
/// refuses indices outside the table, tables outside guest memory, nested or empty indirect
/// tables, and chains longer than their table (which is how a loop shows).
pub(crate) fn walk_chain<'m>(
    regions: &mut RegionCache<'m>,
    view: &TableView<'m>,
    head: u16,
    indirect_ok: bool,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = view.table.addr;
    let mut table_len = u32::from(view.table.size);
    let mut index = u32::from(head);
    let mut indirect = false;
    let mut seen = 0u32;
    // The table as one slice of guest memory when it lies in one region: reading a
    // descriptor from it is a bounds check and a copy, where a read through the whole memory
    // map looks the region up again each time.
    let mut slice = view.slice;
    loop {
        if index >= table_len {
            return Err(ChainError::IndexOutsideTable);
        }
        let offset = u64::from(index) * 16;
        let desc: Descriptor = match &slice {
            // index < table_len, so the 16 bytes lie inside the slice.
            // A volatile load of the 16 bytes (two moves); `read_obj` copies byte-generically.
            Some(s) => s
                .get_ref::<Descriptor>(offset as usize)
                .map(|d| d.load())
                .map_err(|_| ChainError::TableOutsideMemory)?,
            None => {
                let addr = table
                    .checked_add(offset)
                    .ok_or(ChainError::AddressOverflow)?;
                regions
                    .mem()
                    .read_obj(addr)
                    .map_err(|_| ChainError::TableOutsideMemory)?
            }
        };
        seen += 1;
        if seen > table_len {
            return Err(ChainError::Loop);
        }
        if desc.refers_to_indirect_table() {
            if !indirect_ok {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if indirect || !out.is_empty() {
                return Err(ChainError::NestedIndirect);
            }
            if desc.has_next() {
                return Err(ChainError::IndirectWithNext);
            }
            let len = desc.len();
            if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT_DESCS {
                return Err(ChainError::BadIndirectSize);
            }
            table = desc.addr();
            table_len = len / 16;
            slice = regions.slice(table, table_len as usize * 16);
            index = 0;
            seen = 0;
            indirect = true;
            continue;
        }
        out.push(Desc {
            addr: desc.addr().0,
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(());
        }
        index = u32::from(desc.next());
    }
}
