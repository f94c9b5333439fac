//! The L2 table cache, shared by every queue thread of an image.
//!
//! The unit is a slice of an L2 table (`l2-cache-entry-size`, a whole table by default).
//! Lookups take a shard's std mutex just long enough to find or insert a slice; the entries
//! are atomics, so reading them needs no lock at all. A missing slice is inserted in the
//! *loading* state by the first task that wants it, which reads it from the file while the
//! others wait for that slice only. Entries change only under the image's metadata lock,
//! which also writes dirty slices back; a slice someone holds, or a dirty one, is never
//! evicted (the cache may then grow past its size until the metadata code writes back).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::sync::WaitList;
use crate::error::{BlockError, Result};
use crate::node::Node;

const LOADING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

/// One cached slice of an L2 table: its 64-bit words in host byte order.
pub struct Slice {
    /// File offset of the slice.
    pub offset: u64,
    state: AtomicU8,
    words: Box<[AtomicU64]>,
    dirty: AtomicBool,
    last_use: AtomicU64,
    loaded: WaitList,
}

impl Slice {
    fn new(offset: u64, words: usize, state: u8) -> Self {
        Self {
            offset,
            state: AtomicU8::new(state),
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            dirty: AtomicBool::new(false),
            last_use: AtomicU64::new(0),
            loaded: WaitList::default(),
        }
    }

    /// Word `i` (an L2 entry, or for extended L2 entries, entry and bitmap at 2i and 2i+1).
    pub fn get(&self, i: usize) -> u64 {
        self.words[i].load(Ordering::Acquire)
    }

    /// Sets word `i`. Only under the metadata lock; the caller marks the slice dirty.
    pub fn set(&self, i: usize, v: u64) {
        self.words[i].store(v, Ordering::Release);
    }

    /// Whether the slice has changes not yet written.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// The slice as it is stored in the image (big-endian words).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_be_bytes());
        }
        out
    }

    fn fill(&self, bytes: &[u8]) {
        for (w, b) in self.words.iter().zip(bytes.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            w.store(u64::from_be_bytes(a), Ordering::Relaxed);
        }
    }
}

/// Hashes the slice offsets (distinct u64 keys, no adversary) with one multiply instead of
/// SipHash: lookups are on every request's path.
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

struct Shard {
    map: HashMap<u64, Arc<Slice>, BuildHasherDefault<OffsetHasher>>,
}

/// The cache.
pub struct L2Cache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    slice_bytes: u64,
    tick: AtomicU64,
    dirty: AtomicUsize,
}

/// Removes a slice whose load did not finish (error or cancelled request) and wakes its
/// waiters, who then try themselves.
struct LoadGuard<'a> {
    cache: &'a L2Cache,
    slice: &'a Arc<Slice>,
    armed: bool,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.slice.state.store(FAILED, Ordering::Release);
            let mut shard = self.cache.shard(self.slice.offset);
            if shard
                .map
                .get(&self.slice.offset)
                .is_some_and(|s| Arc::ptr_eq(s, self.slice))
            {
                shard.map.remove(&self.slice.offset);
            }
            drop(shard);
            self.slice.loaded.wake_all();
        }
    }
}

impl L2Cache {
    /// A cache of `capacity` slices of `slice_bytes` bytes each.
    pub fn new(capacity: usize, slice_bytes: u64) -> Self {
        let capacity = capacity.max(2);
        let nshards = (capacity / 8).clamp(1, 16);
        Self {
            shards: (0..nshards)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::default(),
                    })
                })
                .collect(),
            per_shard: capacity.div_ceil(nshards),
            slice_bytes,
            tick: AtomicU64::new(0),
            dirty: AtomicUsize::new(0),
        }
    }

    /// Bytes per slice.
    pub fn slice_bytes(&self) -> u64 {
        self.slice_bytes
    }

    /// Total capacity in slices.
    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    fn shard(&self, offset: u64) -> MutexGuard<'_, Shard> {
        let i = ((offset / self.slice_bytes) as usize) % self.shards.len();
        // A shard's map is changed by single inserts and removes: poisoning cannot leave it
        // inconsistent.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self, s: &Slice) {
        s.last_use
            .store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Evicts the least recently used slice that is clean, loaded and held by no one.
    fn make_room(&self, shard: &mut Shard) {
        if shard.map.len() < self.per_shard {
            return;
        }
        let victim = shard
            .map
            .iter()
            .filter(|(_, s)| {
                Arc::strong_count(s) == 1
                    && !s.is_dirty()
                    && s.state.load(Ordering::Acquire) != LOADING
            })
            .min_by_key(|(_, s)| s.last_use.load(Ordering::Relaxed))
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            shard.map.remove(&k);
        }
    }

    /// Word `i` of the slice at `offset` if that slice is cached and loaded, without
    /// waiting or taking a reference to the slice (the fast path of reads).
    pub fn peek(&self, offset: u64, i: usize) -> Option<u64> {
        let shard = self.shard(offset);
        let s = shard.map.get(&offset)?;
        if s.state.load(Ordering::Acquire) != READY {
            return None;
        }
        self.touch(s);
        s.words.get(i).map(|w| w.load(Ordering::Acquire))
    }

    /// The slice at `offset`, read from `file` if it is not cached.
    pub async fn get(&self, file: &Node, offset: u64) -> Result<Arc<Slice>> {
        loop {
            let (slice, load) = {
                let mut shard = self.shard(offset);
                match shard.map.get(&offset) {
                    Some(s) => (s.clone(), false),
                    None => {
                        self.make_room(&mut shard);
                        let s =
                            Arc::new(Slice::new(offset, (self.slice_bytes / 8) as usize, LOADING));
                        shard.map.insert(offset, s.clone());
                        (s, true)
                    }
                }
            };
            self.touch(&slice);
            if load {
                let mut guard = LoadGuard {
                    cache: self,
                    slice: &slice,
                    armed: true,
                };
                let mut buf = vec![0u8; self.slice_bytes as usize];
                super::refcount::read_into(file, offset, &mut buf, "L2 table").await?;
                slice.fill(&buf);
                slice.state.store(READY, Ordering::Release);
                guard.armed = false;
                drop(guard);
                slice.loaded.wake_all();
                return Ok(slice);
            }
            match slice.state.load(Ordering::Acquire) {
                READY => return Ok(slice),
                FAILED => continue,
                _ => {}
            }
            slice
                .loaded
                .wait_until(|| slice.state.load(Ordering::Acquire) != LOADING)
                .await;
            if slice.state.load(Ordering::Acquire) == READY {
                return Ok(slice);
            }
        }
    }

    /// Puts a new, all-zero slice (of a newly allocated L2 table, already zeroed on disk)
    /// into the cache.
    pub fn insert_zeroed(&self, offset: u64) -> Arc<Slice> {
        let s = Arc::new(Slice::new(offset, (self.slice_bytes / 8) as usize, READY));
        self.touch(&s);
        let mut shard = self.shard(offset);
        self.make_room(&mut shard);
        if let Some(old) = shard.map.insert(offset, s.clone()) {
            if old.dirty.swap(false, Ordering::AcqRel) {
                self.dirty.fetch_sub(1, Ordering::AcqRel);
            }
        }
        s
    }

    /// Marks a slice changed (metadata lock held).
    pub fn mark_dirty(&self, s: &Slice) {
        if !s.dirty.swap(true, Ordering::AcqRel) {
            self.dirty.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Number of dirty slices.
    pub fn dirty_count(&self) -> usize {
        self.dirty.load(Ordering::Acquire)
    }

    /// Every dirty slice, sorted by offset; their dirty flags are cleared (the caller writes
    /// them, and puts a flag back with [`mark_dirty`](Self::mark_dirty) if that fails).
    pub fn take_dirty(&self) -> Vec<Arc<Slice>> {
        if self.dirty_count() == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for s in shard.map.values() {
                if s.dirty.swap(false, Ordering::AcqRel) {
                    self.dirty.fetch_sub(1, Ordering::AcqRel);
                    out.push(s.clone());
                }
            }
        }
        out.sort_by_key(|s| s.offset);
        out
    }
}

/// An error for an L2 slice offset that cannot be right.
pub fn bad_l2_offset(l1_index: u64, entry: u64) -> BlockError {
    BlockError::new(
        libc::EIO,
        format!(
            "qcow2: L2 table offset {:#x} of L1 entry {l1_index} is not cluster aligned; the \
             image is corrupt",
            entry & super::L1E_OFFSET_MASK
        ),
    )
}
