//! The control language: what a test tells the file system, and the faults it injects.
//!
//! One command per line:
//! - `power-loss [keep PERCENT] [seed N]`: every write not covered by an fsync is lost
//!   (with `keep`, each unsynced page reaches the file with that chance, as a disk's cache
//!   may write any of them before power fails); from then on every I/O fails with EIO.
//! - `fail OP ERRNO [once|always] [after N] [range START LEN]`: the matching operation
//!   (`read`, `write`, `fsync`, `fallocate`) fails with `EIO` or `ENOSPC` without effect,
//!   once (the default) or every time, after letting N matching ones pass, only where it
//!   touches bytes `[START, START + LEN)` (fsync always matches a range).
//! - `clear`: removes every `fail` rule.

use std::fmt;

/// An operation a fault can hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Fsync,
    Fallocate,
}

/// One `fail` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub op: Op,
    pub errno: i32,
    /// Removed after it fired once.
    pub once: bool,
    /// Matching operations still to let pass.
    pub after: u64,
    /// Only operations touching `[start, end)`.
    pub range: Option<(u64, u64)>,
}

impl Fault {
    /// Whether an operation `op` on bytes `[offset, offset + len)` matches (fsync has no
    /// range: it covers the whole file).
    fn matches(&self, op: Op, offset: u64, len: u64) -> bool {
        if self.op != op {
            return false;
        }
        match (self.range, op) {
            (None, _) | (_, Op::Fsync) => true,
            (Some((start, end)), _) => offset < end && start < offset + len.max(1),
        }
    }
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    PowerLoss { keep_percent: u8, seed: u64 },
    Fail(Fault),
    Clear,
}

/// A command that cannot be parsed.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn number(word: Option<&str>, what: &str) -> Result<u64, ParseError> {
    word.and_then(|w| w.parse().ok())
        .ok_or_else(|| ParseError(format!("{what} needs a number")))
}

impl Command {
    /// Parses one command line.
    pub fn parse(line: &str) -> Result<Command, ParseError> {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("power-loss") => {
                let (mut keep_percent, mut seed) = (0, 0);
                while let Some(w) = words.next() {
                    match w {
                        "keep" => {
                            keep_percent = u8::try_from(number(words.next(), "keep")?)
                                .ok()
                                .filter(|&p| p <= 100)
                                .ok_or_else(|| ParseError("keep is a percentage".into()))?
                        }
                        "seed" => seed = number(words.next(), "seed")?,
                        _ => return Err(ParseError(format!("power-loss: unknown '{w}'"))),
                    }
                }
                Ok(Command::PowerLoss { keep_percent, seed })
            }
            Some("fail") => {
                let op = match words.next() {
                    Some("read") => Op::Read,
                    Some("write") => Op::Write,
                    Some("fsync") => Op::Fsync,
                    Some("fallocate") => Op::Fallocate,
                    w => return Err(ParseError(format!("fail: unknown operation {w:?}"))),
                };
                let errno = match words.next() {
                    Some("EIO") => libc::EIO,
                    Some("ENOSPC") => libc::ENOSPC,
                    w => return Err(ParseError(format!("fail: unknown errno {w:?}"))),
                };
                let mut fault = Fault {
                    op,
                    errno,
                    once: true,
                    after: 0,
                    range: None,
                };
                while let Some(w) = words.next() {
                    match w {
                        "once" => fault.once = true,
                        "always" => fault.once = false,
                        "after" => fault.after = number(words.next(), "after")?,
                        "range" => {
                            let start = number(words.next(), "range")?;
                            let len = number(words.next(), "range")?;
                            fault.range = Some((start, start.saturating_add(len)));
                        }
                        _ => return Err(ParseError(format!("fail: unknown '{w}'"))),
                    }
                }
                Ok(Command::Fail(fault))
            }
            Some("clear") if words.next().is_none() => Ok(Command::Clear),
            _ => Err(ParseError(format!("unknown command '{line}'"))),
        }
    }
}

/// The fault rules in force.
#[derive(Default)]
pub struct Faults {
    rules: Vec<Fault>,
    /// How many operations the rules failed.
    pub fired: u64,
}

impl Faults {
    pub fn add(&mut self, fault: Fault) {
        self.rules.push(fault);
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    /// The errno an operation must fail with, if a rule says so (first matching rule).
    pub fn check(&mut self, op: Op, offset: u64, len: u64) -> Option<i32> {
        let i = self.rules.iter().position(|f| f.matches(op, offset, len))?;
        let rule = &mut self.rules[i];
        if rule.after > 0 {
            rule.after -= 1;
            return None;
        }
        let errno = rule.errno;
        if rule.once {
            self.rules.remove(i);
        }
        self.fired += 1;
        Some(errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_commands() {
        assert_eq!(
            Command::parse("power-loss"),
            Ok(Command::PowerLoss {
                keep_percent: 0,
                seed: 0
            })
        );
        assert_eq!(
            Command::parse("power-loss keep 30 seed 7"),
            Ok(Command::PowerLoss {
                keep_percent: 30,
                seed: 7
            })
        );
        assert_eq!(
            Command::parse("fail write ENOSPC always after 2 range 4096 512"),
            Ok(Command::Fail(Fault {
                op: Op::Write,
                errno: libc::ENOSPC,
                once: false,
                after: 2,
                range: Some((4096, 4608)),
            }))
        );
        assert_eq!(Command::parse(" clear "), Ok(Command::Clear));
        for bad in [
            "",
            "fail",
            "fail write",
            "fail write EPERM",
            "fail sync EIO",
            "fail read EIO after",
            "power-loss keep 101",
            "clear all",
        ] {
            assert!(Command::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rules_fire_after_n_in_their_range_once_or_always() {
        let mut f = Faults::default();
        let Ok(Command::Fail(rule)) = Command::parse("fail write EIO after 1 range 1000 10") else {
            panic!("parse")
        };
        f.add(rule);
        assert_eq!(f.check(Op::Write, 0, 1000), None, "before the range");
        assert_eq!(f.check(Op::Read, 1000, 10), None, "another op");
        assert_eq!(f.check(Op::Write, 1009, 1), None, "the one let pass");
        assert_eq!(f.check(Op::Write, 990, 11), Some(libc::EIO));
        assert_eq!(f.check(Op::Write, 990, 11), None, "once");
        let Ok(Command::Fail(rule)) = Command::parse("fail fsync ENOSPC always range 0 1") else {
            panic!("parse")
        };
        f.add(rule);
        assert_eq!(f.check(Op::Fsync, 0, 0), Some(libc::ENOSPC));
        assert_eq!(f.check(Op::Fsync, 0, 0), Some(libc::ENOSPC));
        assert_eq!(f.fired, 3);
        f.clear();
        assert_eq!(f.check(Op::Fsync, 0, 0), None);
    }
}
