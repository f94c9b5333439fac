//! QEMU's `secret` objects: named secrets given once (`--object secret,id=ID,data=...` or
//! `file=PATH`) that block drivers then name instead of holding the value in their options
//! (rbd's `key-secret`), so the value never shows in a node's options or queries.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::error::{BlockError, Result};
use crate::options::Options;

fn secrets() -> MutexGuard<'static, HashMap<String, String>> {
    static SECRETS: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    SECRETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Adds the secret object whose properties (after `qom-type=secret`) are in `props`: `id`,
/// and the value in `data` or read from `file` (a trailing newline is not part of it, as with
/// QEMU's `format=raw` files written by `echo`). QEMU's `format` may say `raw` only.
pub fn add(mut props: Options) -> Result<()> {
    let id = props
        .take("id")
        .ok_or_else(|| BlockError::invalid("secret objects need an 'id'"))?;
    if let Some(format) = props.take("format") {
        if format != "raw" {
            return Err(BlockError::invalid(format!(
                "secret '{id}': format '{format}' is not supported (strata takes raw secrets)"
            )));
        }
    }
    let value = match (props.take("data"), props.take("file")) {
        (Some(data), None) => data,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| BlockError::io(&e, format!("secret '{id}': cannot read '{path}'")))?;
            text.trim_end_matches('\n').to_string()
        }
        _ => {
            return Err(BlockError::invalid(format!(
                "secret '{id}': give exactly one of 'data' and 'file'"
            )))
        }
    };
    if let Some(key) = props.first_key() {
        return Err(BlockError::invalid(format!(
            "secret '{id}': Invalid parameter '{key}'"
        )));
    }
    let mut all = secrets();
    if all.contains_key(&id) {
        return Err(BlockError::invalid(format!(
            "attempt to add duplicate property '{id}'"
        )));
    }
    all.insert(id, value);
    Ok(())
}

/// The value of secret `id`.
pub fn lookup(id: &str) -> Result<String> {
    secrets()
        .get(id)
        .cloned()
        .ok_or_else(|| BlockError::invalid(format!("No secret with id '{id}'")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_data_or_a_file_and_are_found_by_id() {
        add(Options::parse("id=unit-a,data=AQBk", None).expect("options")).expect("data");
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), "from-file\n").expect("write");
        let text = format!("id=unit-b,file={}", file.path().display());
        add(Options::parse(&text, None).expect("options")).expect("file");
        assert_eq!(lookup("unit-a").expect("a"), "AQBk");
        assert_eq!(lookup("unit-b").expect("b"), "from-file");
        assert!(lookup("unit-c").is_err());
        assert!(add(Options::parse("id=unit-a,data=x", None).expect("o")).is_err());
        assert!(add(Options::parse("id=unit-d", None).expect("o")).is_err());
    }
}
