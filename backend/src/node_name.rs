//! Node names: validated like QEMU's, generated ones in a namespace users cannot type.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{BlockError, Result};

/// Longest node name, as QEMU's 32-byte buffer allows.
pub const MAX_NODE_NAME_LEN: usize = 31;

/// Checks a user-given node name: a letter first, then letters, digits, `-`, `.`, `_`.
pub fn validate(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !well_formed {
        return Err(BlockError::invalid(format!(
            "Invalid node-name '{name}': it must start with a letter and contain only letters, \
             digits, '-', '.' and '_'"
        )));
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(BlockError::invalid(format!(
            "Invalid node-name '{name}': longer than {MAX_NODE_NAME_LEN} characters"
        )));
    }
    Ok(())
}

/// A fresh name for a node the user did not name (`#block0`, `#block1`, ...).
pub fn generate() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("#block{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_rules() {
        for ok in ["a", "disk0", "d-0.x_y", "A234567890123456789012345678901"] {
            validate(ok).unwrap();
        }
        for bad in [
            "",
            "0disk",
            "-a",
            "a b",
            "a,b",
            "#block1",
            "é",
            "A2345678901234567890123456789012",
        ] {
            assert!(validate(bad).is_err(), "{bad:?} accepted");
        }
        let generated = generate();
        assert!(
            validate(&generated).is_err(),
            "generated names must not be typeable"
        );
        assert_ne!(generated, generate());
    }
}
