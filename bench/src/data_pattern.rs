//! The data that verification writes and expects: the seeded pattern (different for every
//! seed, keyed by offset) and the source pattern (fixed, positional: the content of the qcow2
//! benchmark image); filling buffers and files with them and checking buffers against them.

use crate::error::Result;
use crate::rng::Rng;

/// The seeded pattern: the bytes a verify run writes at disk offset `offset`, different for
/// every `seed` so stale data from an earlier run never matches.
pub fn fill_pattern(buf: &mut [u8], seed: u64, offset: u64) {
    let mut rng = Rng::new(seed ^ offset.rotate_left(17));
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        // Every 8 bytes carry their own disk offset in the low half, so misplaced data is
        // recognisable; the high half is pseudo-random.
        let v = (rng.next() & 0xFFFF_FFFF_0000_0000) | ((offset + i as u64 * 8) & 0xFFFF_FFFF);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

/// Checks that `buf` holds, request after request, the seeded pattern of `seed` at each of
/// `offsets` (`bs` bytes each); the error says `how` the data was read and the first wrong byte.
pub fn check_pattern(buf: &[u8], offsets: &[u64], bs: usize, seed: u64, how: &str) -> Result<()> {
    let mut want = vec![0u8; bs];
    for (i, &off) in offsets.iter().enumerate() {
        fill_pattern(&mut want, seed, off);
        let got = &buf[i * bs..(i + 1) * bs];
        if got != want.as_slice() {
            let first = got
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "data mismatch ({how}): request of {bs} bytes at offset {off}, first wrong byte \
                 at +{first}: got {:#04x}, expected {:#04x}",
                got[first], want[first]
            ));
        }
    }
    Ok(())
}

/// Constant mixed into the source pattern (ASCII "STRATA" in the high bytes): keeps every word
/// non-zero, so a zero cluster or an unwritten range never matches.
const SOURCE_MAGIC: u64 = 0x5354_5241_5441_0000;

/// The source pattern: the bytes at disk offset `offset`. Every 8-byte word holds its own disk
/// offset XOR [`SOURCE_MAGIC`]: non-zero, different at every offset (misplaced data shows), and
/// cheap enough to generate per request, so write workloads can write exactly what is already
/// there (`RunSpec::write_source`). `offset` and `buf.len()` must be multiples of 8.
pub fn fill_source(buf: &mut [u8], offset: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let v = (offset + i as u64 * 8) ^ SOURCE_MAGIC;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// Like [`check_pattern`], against the source pattern.
pub fn check_source(buf: &[u8], offsets: &[u64], bs: usize, how: &str) -> Result<()> {
    let mut want = vec![0u8; bs];
    for (i, &off) in offsets.iter().enumerate() {
        fill_source(&mut want, off);
        let got = &buf[i * bs..(i + 1) * bs];
        if let Some(first) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
            let word = first & !7;
            // The (little-endian) word holding the first wrong byte.
            let got_word = got[word..]
                .iter()
                .take(8)
                .rev()
                .fold(0u64, |w, &b| w << 8 | u64::from(b));
            let hint = if got_word == 0 {
                "zeroes".to_string()
            } else {
                let tag = got_word ^ SOURCE_MAGIC;
                if tag < 1 << 48 {
                    format!("source data of offset {}", tag)
                } else {
                    format!("{got_word:#018x}")
                }
            };
            return Err(format!(
                "data mismatch ({how}): request of {bs} bytes at offset {off}, first wrong byte \
                 at +{first} (disk offset {}): got {hint}",
                off + first as u64
            ));
        }
    }
    Ok(())
}

/// Writes `size` bytes of the source pattern to a new file `path` (and syncs it): the raw
/// source of the qcow2 benchmark image.
pub fn fill_file(path: &str, size: u64) -> Result<()> {
    use std::io::Write as _;
    const CHUNK: usize = 4 << 20;
    if size % 512 != 0 {
        return Err(format!("size {size} is not a multiple of 512"));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("create {path}: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        fill_source(&mut buf[..n], off);
        f.write_all(&buf[..n])
            .map_err(|e| format!("write {path} at {off}: {e}"))?;
        off += n as u64;
    }
    f.sync_all().map_err(|e| format!("fsync {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_dependent() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_pattern(&mut a, 1, 0);
        fill_pattern(&mut b, 1, 4096);
        assert_ne!(a, b);
        fill_pattern(&mut b, 1, 0);
        assert_eq!(a, b);
    }

    #[test]
    fn source_pattern_is_positional() {
        // A 12 KiB run equals three 4 KiB pieces generated at their own offsets.
        let mut whole = vec![0u8; 3 * 4096];
        fill_source(&mut whole, 65536);
        let mut piece = vec![0u8; 4096];
        for i in 0..3u64 {
            fill_source(&mut piece, 65536 + i * 4096);
            assert_eq!(
                &whole[i as usize * 4096..(i as usize + 1) * 4096],
                &piece[..]
            );
        }
        assert!(whole.chunks_exact(8).all(|w| w != [0u8; 8]));
        assert!(check_source(&whole, &[65536], 3 * 4096, "t").is_ok());
        let err = check_source(&whole, &[69632], 4096, "t").unwrap_err();
        assert!(err.contains("source data of offset 65536"), "{err}");
        assert!(check_source(&[0u8; 4096], &[0], 4096, "t")
            .unwrap_err()
            .contains("zeroes"));
    }

    #[test]
    fn fill_file_writes_the_pattern() {
        let path = std::env::temp_dir().join(format!("strata-bench-fill-{}", std::process::id()));
        let p = path.to_str().unwrap();
        let _ = std::fs::remove_file(p);
        fill_file(p, 3 << 20).unwrap();
        let data = std::fs::read(p).unwrap();
        assert_eq!(data.len(), 3 << 20);
        let mut want = vec![0u8; 3 << 20];
        fill_source(&mut want, 0);
        assert_eq!(data, want);
        assert!(
            fill_file(p, 4096).is_err(),
            "must not overwrite an existing file"
        );
        std::fs::remove_file(p).unwrap();
    }
}
