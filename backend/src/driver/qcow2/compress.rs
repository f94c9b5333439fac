//! Compressed clusters: raw deflate (window bits 12, QEMU's zlib type) and zstd.
//!
//! The compressed bytes of a cluster are followed by whatever fills their last 512-byte
//! sector, so decompression stops once the cluster is full and ignores the rest.

use flate2::{Decompress, FlushDecompress, Status};

use super::header::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};
use crate::error::{BlockError, Result};

fn corrupt(what: &str, detail: impl std::fmt::Display) -> BlockError {
    BlockError::new(
        libc::EIO,
        format!("qcow2: compressed cluster is corrupt ({what}: {detail})"),
    )
}

/// Decompresses `input` into all of `out` (one cluster).
pub fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        COMPRESSION_ZLIB => inflate(input, out),
        COMPRESSION_ZSTD => unzstd(input, out),
        other => Err(BlockError::new(
            libc::ENOTSUP,
            format!("qcow2: unknown compression type {other}"),
        )),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut d = Decompress::new(false);
    let status = d.decompress(input, out, FlushDecompress::Finish);
    let full = d.total_out() == out.len() as u64;
    match status {
        Ok(Status::StreamEnd) if full => Ok(()),
        // QEMU accepts a stream that filled the cluster without its end marker.
        Ok(_) if full => Ok(()),
        Err(_) if full => Ok(()),
        Ok(s) => Err(corrupt(
            "deflate",
            format!("{s:?} after {} of {} bytes", d.total_out(), out.len()),
        )),
        Err(e) => Err(corrupt("deflate", e)),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| corrupt("zstd", e))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = d.run(&mut inb, &mut outb).map_err(|e| corrupt("zstd", e))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if hint == 0 {
            return Err(corrupt(
                "zstd",
                format!(
                    "frame ended after {} of {} bytes",
                    outb.pos(),
                    outb.capacity()
                ),
            ));
        }
        if (inb.pos(), outb.pos()) == before {
            return Err(corrupt(
                "zstd",
                format!(
                    "input ended after {} of {} bytes",
                    outb.pos(),
                    outb.capacity()
                ),
            ));
        }
    }
}

/// Compresses a cluster (for tests); `None` if it does not shrink.
#[cfg(test)]
pub fn compress(kind: u8, input: &[u8]) -> Result<Option<Vec<u8>>> {
    let out = match kind {
        COMPRESSION_ZLIB => {
            use flate2::{Compress, Compression, FlushCompress};
            let mut c = Compress::new(Compression::default(), false);
            let mut out = Vec::with_capacity(input.len());
            match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => out,
                _ => return Ok(None),
            }
        }
        COMPRESSION_ZSTD => zstd::bulk::compress(input, 0).map_err(|e| corrupt("zstd", e))?,
        other => {
            return Err(BlockError::new(
                libc::ENOTSUP,
                format!("qcow2: unknown compression type {other}"),
            ))
        }
    };
    Ok((out.len() < input.len()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 7 % 251) as u8).collect();
        for kind in [COMPRESSION_ZLIB, COMPRESSION_ZSTD] {
            let mut c = compress(kind, &data).unwrap().unwrap();
            c.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
            let e = decompress(kind, &c[..c.len() / 3], &mut out).unwrap_err();
            assert!(e.message().contains("corrupt"), "{e}");
        }
    }
}
