//! `--object iothread,...`: qemu-storage-daemon's I/O threads, as far as strata needs them.
//!
//! strata runs its own worker per queue, so an iothread object creates no thread. What it
//! carries over is the polling setting: an export with `iothread=ID` busy-polls for the
//! iothread's `poll-max-ns` (unless the export sets its own), so a command line written for
//! QSD with `poll-max-ns=0` does not start burning a CPU when the binary is swapped.

use std::collections::HashMap;

use strata_backend::Options;

/// Properties of QEMU's iothread that are accepted but have no effect here: strata's workers
/// adapt their window with QEMU's default factors (`poll-grow`, `poll-shrink`) and submit
/// whole batches (`aio-max-batch`); it has no thread pool for blocking calls (`thread-pool-*`).
const IGNORED: [&str; 5] = [
    "poll-grow",
    "poll-shrink",
    "aio-max-batch",
    "thread-pool-min",
    "thread-pool-max",
];

/// The iothread objects of the command line, by id.
#[derive(Debug, Default)]
pub struct IoThreads {
    /// Each one's `poll-max-ns`, when it sets one.
    poll_max_ns: HashMap<String, Option<u64>>,
}

impl IoThreads {
    /// Adds the object `text` (`qom-type=iothread,id=...` or `iothread,id=...`); a `secret`
    /// object goes to the block layer's secrets instead.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let mut o = Options::parse(text, Some("qom-type")).map_err(|e| e.to_string())?;
        match o.take("qom-type").as_deref() {
            Some("iothread") => {}
            Some("secret") => return strata_backend::secret::add(o).map_err(|e| e.to_string()),
            other => {
                return Err(format!(
                    "object type '{}' is not supported (strata takes iothread and secret \
                     objects)",
                    other.unwrap_or("")
                ))
            }
        }
        let id = o.take("id").ok_or("iothread objects need an 'id'")?;
        let poll_max_ns = o
            .take_u64("poll-max-ns")
            .map_err(|e| format!("iothread '{id}': {e}"))?;
        for key in IGNORED {
            o.take_u64(key)
                .map_err(|e| format!("iothread '{id}': {e}"))?;
        }
        if let Some(key) = o.first_key() {
            return Err(format!("iothread '{id}': Invalid parameter '{key}'"));
        }
        if self.poll_max_ns.insert(id.clone(), poll_max_ns).is_some() {
            return Err(format!("attempt to add duplicate property '{id}'"));
        }
        Ok(())
    }

    /// The `poll-max-ns` of iothread `id`: None when it sets none, an error when there is no
    /// such iothread.
    pub fn poll_max_ns(&self, id: &str) -> Result<Option<u64>, String> {
        self.poll_max_ns
            .get(id)
            .copied()
            .ok_or_else(|| format!("iothread \"{id}\" not found"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_max_ns_is_looked_up_by_id() {
        let mut t = IoThreads::default();
        t.add("iothread,id=a,poll-max-ns=0,poll-grow=2,poll-shrink=0")
            .expect("valid");
        t.add("qom-type=iothread,id=b").expect("valid");
        assert_eq!(t.poll_max_ns("a"), Ok(Some(0)));
        assert_eq!(t.poll_max_ns("b"), Ok(None));
        assert!(t
            .poll_max_ns("c")
            .is_err_and(|e| e.contains("\"c\" not found")));
    }

    #[test]
    fn bad_objects_are_refused_by_name() {
        for (text, expected) in [
            ("tls-creds-x509,id=t0", "object type 'tls-creds-x509'"),
            ("secret,id=s0", "exactly one of 'data' and 'file'"),
            ("iothread", "need an 'id'"),
            ("iothread,id=a,poll-max-ns=fast", "'poll-max-ns'"),
            ("iothread,id=a,poll-grow=-1", "'poll-grow'"),
            ("iothread,id=a,colour=red", "'colour'"),
        ] {
            let mut t = IoThreads::default();
            let e = t.add(text).expect_err(text);
            assert!(e.contains(expected), "{text}: {e}");
        }
        let mut t = IoThreads::default();
        t.add("iothread,id=a").expect("valid");
        assert!(t
            .add("iothread,id=a")
            .is_err_and(|e| e.contains("duplicate")));
    }
}
