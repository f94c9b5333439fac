//! Block node options: a flat map of dotted keys, as QEMU's block layer keeps them.
//!
//! Options come from a key=value string (`driver=raw,file.filename=disk.img`, commas in
//! values doubled), from JSON (`{"driver": "raw", "file": {"filename": "disk.img"}}`,
//! flattened to dotted keys) or from a `json:{...}` filename. Drivers consume the keys they
//! understand with the `take_*` methods; whatever is left afterwards is an error that names it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{BlockError, Result};

/// A flat map of option keys (dotted for children: `file.filename`) to string values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    map: BTreeMap<String, String>,
}

impl Options {
    /// An empty option map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `key=value,key=value` (QEMU's keyval syntax; `,,` is a literal comma).
    ///
    /// A first element without `=` is the value of `implied_key` (QEMU's `--blockdev file,...`
    /// means `driver=file`), when one is given. A string starting with `{` is parsed as JSON.
    pub fn parse(text: &str, implied_key: Option<&str>) -> Result<Self> {
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') {
            return Self::from_json_str(trimmed);
        }
        let mut opts = Options::new();
        for (index, item) in split_keyval(text).into_iter().enumerate() {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => match implied_key {
                    Some(implied) if index == 0 && !item.is_empty() => (implied.to_string(), item),
                    _ => {
                        return Err(BlockError::invalid(format!(
                            "Expected '=' after parameter '{item}'"
                        )))
                    }
                },
            };
            validate_key(&key)?;
            opts.insert_new(key, value)?;
        }
        opts.check_consistent()?;
        Ok(opts)
    }

    /// Parses a JSON object and flattens it (`{"file": {"filename": "x"}}` gives `file.filename=x`).
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| BlockError::invalid(format!("Could not parse the JSON options: {e}")))?;
        Self::from_json(&value)
    }

    /// Flattens a JSON object into dotted keys. Booleans become `on`/`off`, `null` becomes `null`.
    pub fn from_json(value: &Value) -> Result<Self> {
        let Value::Object(_) = value else {
            return Err(BlockError::invalid("Invalid JSON object given"));
        };
        let mut opts = Options::new();
        flatten_json("", value, &mut opts)?;
        Ok(opts)
    }

    fn insert_new(&mut self, key: String, value: String) -> Result<()> {
        if self.map.contains_key(&key) {
            return Err(BlockError::invalid(format!(
                "Parameter '{key}' is given more than once"
            )));
        }
        self.map.insert(key, value);
        Ok(())
    }

    /// Refuses `file=node` together with `file.filename=...`: a child is either a reference or
    /// a definition.
    fn check_consistent(&self) -> Result<()> {
        for key in self.map.keys() {
            let mut prefix = key.as_str();
            while let Some((head, _)) = prefix.rsplit_once('.') {
                if self.map.contains_key(head) {
                    return Err(BlockError::invalid(format!(
                        "Parameters '{head}' and '{key}' conflict: '{head}' references an existing \
                         node and cannot take additional options"
                    )));
                }
                prefix = head;
            }
        }
        Ok(())
    }

    /// Sets a key, replacing any value it had.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.map.insert(key.into(), value.into());
    }

    /// Sets a key only if it is absent (QEMU's `qdict_set_default_str`).
    pub fn set_default(&mut self, key: &str, value: &str) {
        self.map
            .entry(key.to_string())
            .or_insert_with(|| value.to_string());
    }

    /// Copies `key` from `other` if this map lacks it (QEMU's `qdict_copy_default`).
    pub fn copy_default(&mut self, other: &Options, key: &str) {
        if let Some(v) = other.get(key) {
            self.set_default(key, v);
        }
    }

    /// Adds every key of `other` that this map lacks: explicit options win over `other`.
    pub fn join_defaults(&mut self, other: Options) {
        for (k, v) in other.map {
            self.map.entry(k).or_insert(v);
        }
    }

    /// The value of a key, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// Whether the key is present.
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Whether any key starts with `prefix.`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        let dotted = format!("{prefix}.");
        self.map.keys().any(|k| k.starts_with(&dotted))
    }

    /// Removes and returns a key's value.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }

    /// Removes a boolean option (`on`/`off`, `true`/`false`, `yes`/`no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take(key).map(|v| parse_bool(key, &v)).transpose()
    }

    /// Removes an unsigned integer option.
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>> {
        self.take(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    BlockError::invalid(format!(
                        "Parameter '{key}' expects a non-negative number, got '{v}'"
                    ))
                })
            })
            .transpose()
    }

    /// Removes a size option: bytes, or a number with a K/M/G/T/P/E suffix (powers of 1024).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        self.take(key)
            .map(|v| parse_size(&v).map_err(|e| e.context(format!("Parameter '{key}'"))))
            .transpose()
    }

    /// Removes and returns every `prefix.*` key with the prefix stripped: a child's options.
    pub fn extract_child(&mut self, prefix: &str) -> Options {
        let dotted = format!("{prefix}.");
        let keys: Vec<String> = self
            .map
            .keys()
            .filter(|k| k.starts_with(&dotted))
            .cloned()
            .collect();
        let mut child = Options::new();
        for key in keys {
            if let Some(value) = self.map.remove(&key) {
                child.map.insert(key[dotted.len()..].to_string(), value);
            }
        }
        child
    }

    /// Whether no key is left.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The first key left, in sorted order.
    pub fn first_key(&self) -> Option<&str> {
        self.map.keys().next().map(String::as_str)
    }

    /// Iterates over keys and values in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Back to JSON, nesting dotted keys (for `json:` filenames and queries).
    pub fn to_json(&self) -> Value {
        let mut root = serde_json::Map::new();
        for (key, value) in &self.map {
            let mut node = &mut root;
            let mut parts = key.split('.').peekable();
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    node.insert(part.to_string(), Value::String(value.clone()));
                } else {
                    let entry = node
                        .entry(part.to_string())
                        .or_insert_with(|| Value::Object(serde_json::Map::new()));
                    if !entry.is_object() {
                        *entry = Value::Object(serde_json::Map::new());
                    }
                    match entry {
                        Value::Object(map) => node = map,
                        _ => unreachable!("entry was just made an object"),
                    }
                }
            }
        }
        Value::Object(root)
    }
}

/// Splits keyval text at single commas; `,,` stands for a comma inside a value.
fn split_keyval(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() || !items.is_empty() {
        items.push(current);
    }
    items
}

fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(BlockError::invalid(format!(
            "Invalid parameter name '{key}'"
        )));
    }
    Ok(())
}

fn flatten_json(prefix: &str, value: &Value, out: &mut Options) -> Result<()> {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                validate_key(k)?;
                flatten_json(&join(k), v, out)?;
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten_json(&join(&i.to_string()), v, out)?;
            }
        }
        Value::String(s) => out.insert_new(prefix.to_string(), s.clone())?,
        Value::Bool(b) => {
            out.insert_new(prefix.to_string(), if *b { "on" } else { "off" }.into())?
        }
        Value::Number(n) => out.insert_new(prefix.to_string(), n.to_string())?,
        Value::Null => out.insert_new(prefix.to_string(), "null".into())?,
    }
    Ok(())
}

/// Parses QEMU's boolean spellings.
pub fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(BlockError::invalid(format!(
            "Parameter '{key}' expects 'on' or 'off', got '{value}'"
        ))),
    }
}

/// Parses a size: bytes, or a number (possibly fractional) with a B/K/M/G/T/P/E suffix.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" => 10,
        "m" | "M" | "MiB" => 20,
        "g" | "G" | "GiB" => 30,
        "t" | "T" | "TiB" => 40,
        "p" | "P" | "PiB" => 50,
        "e" | "E" | "EiB" => 60,
        _ => {
            return Err(BlockError::invalid(format!(
                "invalid size '{text}': unknown suffix '{suffix}' (use K, M, G, T, P or E)"
            )))
        }
    };
    let bad = || BlockError::invalid(format!("invalid size '{text}'"));
    let bytes = if number.contains('.') {
        let value: f64 = number.parse().map_err(|_| bad())?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
            return Err(bad());
        }
        bytes as u64
    } else {
        let value: u64 = number.parse().map_err(|_| bad())?;
        value
            .checked_shl(shift)
            .filter(|v| v >> shift == value)
            .ok_or_else(|| BlockError::new(libc::ERANGE, format!("size '{text}' is too large")))?
    };
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_with_dotted_keys_and_escaped_commas() {
        let o =
            Options::parse("driver=raw,file.filename=/a,,b.img,file.aio=io_uring", None).unwrap();
        assert_eq!(o.get("driver"), Some("raw"));
        assert_eq!(o.get("file.filename"), Some("/a,b.img"));
        assert_eq!(o.get("file.aio"), Some("io_uring"));
    }

    #[test]
    fn implied_driver_key() {
        let o = Options::parse("file,filename=x", Some("driver")).unwrap();
        assert_eq!(o.get("driver"), Some("file"));
        let e = Options::parse("driver=file,filename", Some("driver")).unwrap_err();
        assert!(e.message().contains("'filename'"), "{e}");
    }

    #[test]
    fn duplicate_and_conflicting_keys_are_refused() {
        let e = Options::parse("a=1,a=2", None).unwrap_err();
        assert!(e.message().contains("'a'"), "{e}");
        let e = Options::parse("file=f0,file.filename=x", None).unwrap_err();
        assert!(e.message().contains("'file'"), "{e}");
        assert!(Options::parse("a..b=1", None).is_err());
    }

    #[test]
    fn json_is_flattened() {
        let o = Options::parse(
            r#"{"driver":"raw","file":{"driver":"file","filename":"x","cache":{"direct":true}},"n":[1,2]}"#,
            None,
        )
        .unwrap();
        assert_eq!(o.get("file.driver"), Some("file"));
        assert_eq!(o.get("file.cache.direct"), Some("on"));
        assert_eq!(o.get("n.1"), Some("2"));
        assert_eq!(
            Options::from_json_str(&o.to_json().to_string())
                .unwrap()
                .get("file.filename"),
            Some("x")
        );
        assert!(Options::from_json_str("[1]")
            .unwrap_err()
            .message()
            .contains("JSON object"));
        assert!(Options::from_json_str("{bad").is_err());
    }

    #[test]
    fn extract_child_strips_prefix() {
        let mut o = Options::parse("file.filename=x,file.cache.direct=on,filex=1", None).unwrap();
        let child = o.extract_child("file");
        assert_eq!(child.get("filename"), Some("x"));
        assert_eq!(child.get("cache.direct"), Some("on"));
        assert_eq!(o.first_key(), Some("filex"));
    }

    #[test]
    fn typed_values() {
        let mut o = Options::parse("a=on,b=no,c=maybe,s=1.5K,n=12,m=x", None).unwrap();
        assert_eq!(o.take_bool("a").unwrap(), Some(true));
        assert_eq!(o.take_bool("b").unwrap(), Some(false));
        assert!(o.take_bool("c").unwrap_err().message().contains("'c'"));
        assert_eq!(o.take_size("s").unwrap(), Some(1536));
        assert_eq!(o.take_u64("n").unwrap(), Some(12));
        assert!(o.take_u64("m").is_err());
        assert_eq!(o.take_bool("absent").unwrap(), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999E").is_err());
    }
}
