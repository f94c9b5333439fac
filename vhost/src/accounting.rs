//! What an export counts of each request (QMP's `query-blockstats`), as QEMU's virtio-blk
//! device counts it: reads and writes with their bytes, flushes, write-zeroes as writes (their
//! bytes those zeroed), and discards as unmap operations (which QEMU's virtio-blk leaves out).
//! A request refused before any I/O (out of range, misaligned, malformed) is invalid; one whose
//! I/O failed is failed, as is a write to a read-only export, which QEMU's device does not
//! check and its block layer fails. GET_ID and request types the export does not offer are
//! not counted.

use strata_backend::accounting::IoKind;

use crate::request::{Op, Refusal, RequestType};

/// The kind and bytes a request counts as; None for GET_ID.
#[inline]
pub(crate) fn counted_as(op: &Op) -> Option<(IoKind, u64)> {
    let segments = |segs: &[crate::request::Segment]| segs.iter().map(|s| s.len).sum();
    match op {
        Op::Read { len, .. } => Some((IoKind::Read, *len)),
        Op::Write { len, .. } => Some((IoKind::Write, *len)),
        Op::Flush => Some((IoKind::Flush, 0)),
        Op::GetId { .. } => None,
        Op::Discard(segs) => Some((IoKind::Unmap, segments(segs))),
        Op::WriteZeroes(segs) => Some((IoKind::Write, segments(segs))),
    }
}

/// How a refused request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalCount {
    /// Refused before any I/O.
    Invalid(IoKind),
    /// Failed as QEMU's block layer fails it.
    Failed(IoKind),
}

/// How a request of type `kind` (None: its header was unreadable) refused for `why` counts;
/// None when it does not.
pub(crate) fn refusal_counts(kind: Option<RequestType>, why: &Refusal) -> Option<RefusalCount> {
    let kind = match kind? {
        RequestType::In => IoKind::Read,
        RequestType::Out | RequestType::WriteZeroes => IoKind::Write,
        RequestType::Flush => IoKind::Flush,
        RequestType::Discard => IoKind::Unmap,
        RequestType::GetId | RequestType::Unsupported(_) => return None,
    };
    match why {
        Refusal::NotOffered(_) | Refusal::Unsupported(_) | Refusal::GetIdOutsideMemory => None,
        Refusal::ReadOnly => Some(RefusalCount::Failed(kind)),
        _ => Some(RefusalCount::Invalid(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_as_qemu_counts_them() {
        let beyond = Refusal::BeyondEnd {
            len: 512,
            sector: 8,
            capacity: 4096,
        };
        let c = |t, why| refusal_counts(Some(t), &why);
        assert_eq!(
            c(RequestType::In, beyond),
            Some(RefusalCount::Invalid(IoKind::Read))
        );
        assert_eq!(
            c(RequestType::Out, beyond),
            Some(RefusalCount::Invalid(IoKind::Write))
        );
        assert_eq!(
            c(RequestType::Out, Refusal::ReadOnly),
            Some(RefusalCount::Failed(IoKind::Write))
        );
        assert_eq!(
            c(
                RequestType::Discard,
                Refusal::NotOffered(RequestType::Discard)
            ),
            None
        );
        assert_eq!(c(RequestType::GetId, Refusal::GetIdOutsideMemory), None);
        assert_eq!(
            c(RequestType::Unsupported(99), Refusal::Unsupported(99)),
            None
        );
        assert_eq!(refusal_counts(None, &Refusal::HeaderUnreadable), None);
    }
}
