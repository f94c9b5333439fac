//! QMP's wire format: requests (`execute`, `arguments`, `id`), replies (`return` / `error` with
//! QEMU's error classes), events with a `timestamp`, and the greeting. Texts of protocol errors
//! are QEMU's, so that clients which match them keep working.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// QEMU's error classes (qapi/error.json) that strata's commands report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Every error without a class of its own.
    GenericError,
    /// An unknown command, or one given before (or after) capabilities negotiation.
    CommandNotFound,
    /// The device (for strata: export or node) a command names does not exist.
    DeviceNotFound,
}

impl ErrorClass {
    fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// Its class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command name.
    pub execute: String,
    /// Its arguments (empty when none were given).
    pub arguments: Map<String, Value>,
    /// The client's `id`, echoed in the reply.
    pub id: Option<Value>,
}

/// Checks a message as QEMU's `qmp_dispatch` does. On error, the `id` (if the message had one)
/// is returned with it, so the error reply echoes it.
pub fn parse_request(bytes: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        (
            QmpError::generic(format!("JSON parse error, {}", parse_error_text(&e))),
            None,
        )
    })?;
    let Value::Object(mut map) = value else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = map.remove("id");
    let fail = |desc: String| Err((QmpError::generic(desc), id.clone()));
    if let Some(key) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return fail(format!("QMP input member '{key}' is unexpected"));
    }
    let execute = match map.remove("execute") {
        Some(Value::String(name)) => name,
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
        None => return fail("QMP input lacks member 'execute'".into()),
    };
    let arguments = match map.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// serde_json's description without its position suffix (QEMU names no position either).
fn parse_error_text(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// A success reply.
pub fn reply_return(value: Value, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    reply.insert("return".into(), value);
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// An error reply.
pub fn reply_error(error: &QmpError, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    reply.insert(
        "error".into(),
        json!({"class": error.class.name(), "desc": error.desc}),
    );
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// An event, stamped with the wall-clock time (seconds and microseconds since the epoch).
pub fn event(name: &str, data: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        "event": name,
        "data": data,
    })
}

/// The QEMU version strata's QMP reports: the QEMU release whose QMP interface (commands,
/// arguments, errors) strata follows, so that tools gating features on the version treat it
/// as that qemu-storage-daemon. `package` names strata and its own version.
pub fn version() -> Value {
    json!({
        "qemu": {"major": 7, "minor": 2, "micro": 0},
        "package": concat!("strata ", env!("CARGO_PKG_VERSION")),
    })
}

/// The greeting sent to each client as it connects. strata offers no capability (QEMU's
/// `oob` needs out-of-band execution, which strata's monitor does not have).
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

/// A message as sent on the wire: compact, or indented as QEMU's `pretty=on` does; each ends
/// with a newline.
pub fn encode(message: &Value, pretty: bool) -> Vec<u8> {
    use serde::Serialize;
    let mut bytes = Vec::new();
    let written = if pretty {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut bytes,
            serde_json::ser::PrettyFormatter::with_indent(b"    "),
        );
        message.serialize(&mut ser)
    } else {
        message.serialize(&mut serde_json::Serializer::with_formatter(
            &mut bytes,
            QemuCompact,
        ))
    };
    if written.is_err() {
        bytes.clear(); // a Value always serialises; nothing half-written goes out
    }
    bytes.push(b'\n');
    bytes
}

/// QEMU's one-line layout: `{"return": {}, "id": 1}` (a space after each `:` and `,`).
struct QemuCompact;

/// The `, ` QEMU writes before every member or element but the first.
fn write_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for QemuCompact {
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        write_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        write_separator(writer, first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> (String, Option<Value>) {
        let (e, id) = parse_request(text.as_bytes()).expect_err(text);
        assert_eq!(e.class, ErrorClass::GenericError);
        (e.desc, id)
    }

    #[test]
    fn requests_are_checked_as_qemu_checks_them() {
        let ok =
            parse_request(br#"{"execute": "x", "arguments": {"a": 1}, "id": [7]}"#).expect("valid");
        assert_eq!(ok.execute, "x");
        assert_eq!(ok.arguments["a"], 1);
        assert_eq!(ok.id, Some(json!([7])));
        assert_eq!(error_of("[1]").0, "QMP input must be a JSON object");
        assert_eq!(
            error_of(r#"{"foo": 1, "id": 3}"#),
            (
                "QMP input member 'foo' is unexpected".into(),
                Some(json!(3))
            )
        );
        assert_eq!(
            error_of(r#"{"execute": 1}"#).0,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            error_of(r#"{"id": 1}"#).0,
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            error_of(r#"{"execute": "x", "arguments": []}"#).0,
            "QMP input member 'arguments' must be an object"
        );
        assert!(error_of("{]").0.starts_with("JSON parse error, "));
    }

    #[test]
    fn replies_echo_the_id_and_events_carry_a_timestamp() {
        let e = QmpError::command_not_found("gone");
        assert_eq!(
            reply_error(&e, Some(json!("a"))),
            json!({"error": {"class": "CommandNotFound", "desc": "gone"}, "id": "a"})
        );
        assert_eq!(reply_return(json!({}), None), json!({"return": {}}));
        let ev = event("E", json!({"id": "x"}));
        assert!(ev["timestamp"]["seconds"].as_u64().is_some_and(|s| s > 0));
        assert!(ev["timestamp"]["microseconds"]
            .as_u64()
            .is_some_and(|us| us < 1_000_000));
        assert_eq!(
            encode(&json!({"a": 1, "b": [1, 2]}), false),
            b"{\"a\": 1, \"b\": [1, 2]}\n"
        );
    }
}
