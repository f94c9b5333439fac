//! What a run does: the I/O pattern, request size, queue depth and number of queues, and the
//! workload names (`randread-4k-qd32-2q`) that describe them on the command line and in results.

use std::fmt;

use crate::error::Result;

/// The I/O pattern of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Reads at random offsets (`randread`).
    RandRead,
    /// Writes at random offsets (`randwrite`).
    RandWrite,
    /// Sequential reads (`read`).
    SeqRead,
    /// Sequential writes (`write`).
    SeqWrite,
}

impl Pattern {
    /// Whether the requests are writes.
    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }
    /// Whether the offsets are random rather than sequential.
    pub fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
    fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::SeqRead => "read",
            Pattern::SeqWrite => "write",
        }
    }
}

/// A workload, named like `randread-4k-qd32`, `randread-4k-qd32-2q`, at a fixed rate
/// `randread-4k-qd4-r10k`, or with a polling client `randread-4k-qd1-poll`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// What the requests do and where they go.
    pub pattern: Pattern,
    /// Bytes per request.
    pub block_size: usize,
    /// Requests in flight per queue.
    pub queue_depth: usize,
    /// Queues, one client thread each.
    pub queues: usize,
    /// Requests per second over all queues, issued at even intervals (each queue its share,
    /// at most `queue_depth` in flight); None: as fast as the target completes them.
    pub rate: Option<u64>,
    /// The client spins on its completion queue (`do_io` with `min_completions` 0) instead of
    /// sleeping in it (suffix `-poll`), so a latency holds no wake-up of the client: the same
    /// for every target, whose own completion path then shows alone.
    pub poll: bool,
}

impl Workload {
    /// Parses a workload name: `PATTERN-BS-qdN[-Mq][-rIOPS][-poll]`.
    pub fn parse(s: &str) -> Result<Workload> {
        let err = || {
            format!(
                "bad workload {s:?}: expected PATTERN-BS-qdN[-Mq][-rIOPS][-poll], PATTERN one \
                 of randread, randwrite, read, write (e.g. randread-4k-qd32-2q, \
                 randread-4k-qd1-r10k: 10000 requests per second, randread-4k-qd1-poll: the \
                 client polls for completions instead of sleeping)"
            )
        };
        let mut parts: Vec<&str> = s.split('-').collect();
        let poll = parts.len() > 3 && parts.last() == Some(&"poll");
        if poll {
            parts.pop();
        }
        let rate = match parts.last().and_then(|p| p.strip_prefix('r')) {
            Some(r) if parts.len() > 3 => {
                parts.pop();
                Some(parse_count(r).filter(|&n| n > 0).ok_or_else(err)?)
            }
            _ => None,
        };
        if parts.len() < 3 || parts.len() > 4 {
            return Err(err());
        }
        let pattern = match parts[0] {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::SeqRead,
            "write" => Pattern::SeqWrite,
            _ => return Err(err()),
        };
        let block_size = parse_size(parts[1]).ok_or_else(err)?;
        let queue_depth: usize = parts[2]
            .strip_prefix("qd")
            .and_then(|n| n.parse().ok())
            .ok_or_else(err)?;
        let queues: usize = match parts.get(3) {
            None => 1,
            Some(q) => q
                .strip_suffix('q')
                .and_then(|n| n.parse().ok())
                .ok_or_else(err)?,
        };
        if block_size == 0 || block_size % 512 != 0 || queue_depth == 0 || queues == 0 {
            return Err(err());
        }
        Ok(Workload {
            pattern,
            block_size,
            queue_depth,
            queues,
            rate,
            poll,
        })
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bs = if self.block_size % (1024 * 1024) == 0 {
            format!("{}m", self.block_size / (1024 * 1024))
        } else if self.block_size % 1024 == 0 {
            format!("{}k", self.block_size / 1024)
        } else {
            self.block_size.to_string()
        };
        write!(f, "{}-{}-qd{}", self.pattern.name(), bs, self.queue_depth)?;
        if self.queues != 1 {
            write!(f, "-{}q", self.queues)?;
        }
        match self.rate {
            Some(r) if r % 1000 == 0 => write!(f, "-r{}k", r / 1000)?,
            Some(r) => write!(f, "-r{r}")?,
            None => {}
        }
        if self.poll {
            write!(f, "-poll")?;
        }
        Ok(())
    }
}

/// A count like `500`, `10k` or `10000`.
fn parse_count(s: &str) -> Option<u64> {
    match s.strip_suffix(['k', 'K']) {
        Some(n) => n.parse::<u64>().ok()?.checked_mul(1000),
        None => s.parse().ok(),
    }
}

/// A size like `4k`, `128k`, `1m` or `512`, in bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (num, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024),
        b'm' | b'M' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_names_round_trip() {
        for s in [
            "randread-4k-qd1",
            "randwrite-4k-qd32",
            "read-128k-qd8",
            "write-128k-qd8",
            "randread-4k-qd32-2q",
            "randread-4k-qd1-r1k",
            "randread-4k-qd4-r50k",
            "randread-4k-qd4-2q-r1500",
        ] {
            assert_eq!(Workload::parse(s).unwrap().to_string(), s);
        }
        let w = Workload::parse("randread-4k-qd32-2q").unwrap();
        assert_eq!(w.block_size, 4096);
        assert_eq!(w.queue_depth, 32);
        assert_eq!(w.queues, 2);
        assert!(Workload::parse("randread-4k").is_err());
        assert!(Workload::parse("trim-4k-qd1").is_err());
        assert!(Workload::parse("randread-100-qd1").is_err());
        let r = Workload::parse("randread-4k-qd4-r10000").unwrap();
        assert_eq!((r.queue_depth, r.queues, r.rate), (4, 1, Some(10_000)));
        assert_eq!(r.to_string(), "randread-4k-qd4-r10k");
        assert_eq!(Workload::parse("randread-4k-qd1").unwrap().rate, None);
        assert!(Workload::parse("randread-4k-qd1-r0").is_err());
        assert!(Workload::parse("randread-4k-qd1-rfast").is_err());
        assert!(Workload::parse("randread-4k-r10k").is_err());
    }

    #[test]
    fn poll_suffix_parses_and_round_trips() {
        for s in [
            "randread-4k-qd1-poll",
            "randwrite-4k-qd32-2q-poll",
            "randread-4k-qd4-r10k-poll",
            "randread-4k-qd4-2q-r1500-poll",
        ] {
            let w = Workload::parse(s).unwrap();
            assert!(w.poll, "{s}");
            assert_eq!(w.to_string(), s);
        }
        let w = Workload::parse("randwrite-4k-qd32-2q-poll").unwrap();
        assert_eq!(
            (w.pattern, w.queue_depth, w.queues, w.rate),
            (Pattern::RandWrite, 32, 2, None)
        );
        let r = Workload::parse("randread-4k-qd4-r10k-poll").unwrap();
        assert_eq!((r.queues, r.rate), (1, Some(10_000)));
        assert!(!Workload::parse("randread-4k-qd1").unwrap().poll);
        assert!(!Workload::parse("randread-4k-qd1-2q").unwrap().poll);
        // Only as the last part, after a complete name.
        assert!(Workload::parse("randread-4k-poll").is_err());
        assert!(Workload::parse("randread-4k-qd1-poll-2q").is_err());
        assert!(Workload::parse("randread-4k-qd1-poll-r1k").is_err());
        assert!(Workload::parse("randread-4k-qd1-poll-poll").is_err());
        assert!(Workload::parse("randread-4k-qd1-polling").is_err());
    }
}
