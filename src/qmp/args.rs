//! A command's arguments, taken one by one with their expected type; whatever is left is an
//! error. The schema ([`super::schema`]) has checked them before a handler runs, so these
//! checks matter for the parts a handler takes apart itself. Texts are QEMU's: "Parameter 'x' is missing", "Invalid parameter type for 'x',
//! expected: integer", "Parameter 'x' is unexpected".

use serde_json::{Map, Value};

use super::protocol::QmpError;

/// The arguments of one command.
pub struct Args {
    map: Map<String, Value>,
}

impl Args {
    /// Wraps a request's `arguments`.
    pub fn new(map: Map<String, Value>) -> Self {
        Args { map }
    }

    /// A required string.
    pub fn str(&mut self, key: &str) -> Result<String, QmpError> {
        self.opt_str(key)?.ok_or_else(|| missing(key))
    }

    /// An optional string.
    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_type(key, "string")),
        }
    }

    /// A required non-negative integer.
    pub fn u64(&mut self, key: &str) -> Result<u64, QmpError> {
        self.opt_u64(key)?.ok_or_else(|| missing(key))
    }

    /// An optional non-negative integer.
    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v) if v.is_u64() => Ok(v.as_u64()),
            Some(v) if v.is_i64() => Err(QmpError::generic(format!(
                "Parameter '{key}' expects a non-negative integer, got {v}"
            ))),
            Some(_) => Err(wrong_type(key, "integer")),
        }
    }

    /// A required integer of any sign (QAPI's `int`).
    pub fn int(&mut self, key: &str) -> Result<i64, QmpError> {
        match self.map.remove(key) {
            None => Err(missing(key)),
            Some(v) => v.as_i64().ok_or_else(|| wrong_type(key, "integer")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(wrong_type(key, "boolean")),
        }
    }

    /// An optional value of an enum: one of `values`.
    pub fn opt_enum(&mut self, key: &str, values: &[&str]) -> Result<Option<String>, QmpError> {
        match self.opt_str(key)? {
            Some(v) if !values.contains(&v.as_str()) => Err(QmpError::generic(format!(
                "Parameter '{key}' does not accept value '{v}'"
            ))),
            other => Ok(other),
        }
    }

    /// Every argument not taken yet, for commands that hand them on as a whole.
    pub fn take_rest(&mut self) -> Map<String, Value> {
        std::mem::take(&mut self.map)
    }

    /// Refuses any argument not taken.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(key) => Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            ))),
            None => Ok(()),
        }
    }
}

/// QEMU's text for a missing member.
pub fn missing(key: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{key}' is missing"))
}

/// QEMU's text for a member of the wrong JSON type.
pub fn wrong_type(key: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{key}', expected: {expected}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => unreachable!("tests pass objects"),
        }
    }

    /// The description of the error `result` must be.
    fn problem<T: std::fmt::Debug>(result: Result<T, QmpError>) -> String {
        result.unwrap_err().desc
    }

    #[test]
    fn each_problem_names_the_member() {
        let mut a = args(json!({"n": "x", "b": 1, "s": 2, "extra": true}));
        let problems = [
            problem(a.u64("n")),
            problem(a.opt_bool("b")),
            problem(a.str("s")),
            problem(a.str("gone")),
            problem(a.finish()),
        ];
        assert_eq!(
            problems,
            [
                "Invalid parameter type for 'n', expected: integer",
                "Invalid parameter type for 'b', expected: boolean",
                "Invalid parameter type for 's', expected: string",
                "Parameter 'gone' is missing",
                "Parameter 'extra' is unexpected",
            ]
        );
        let mut a = args(json!({"mode": "soft", "size": -1}));
        assert!(a.opt_enum("mode", &["safe", "hard"]).is_err());
        assert!(a.u64("size").unwrap_err().desc.contains("non-negative"));
        assert!(a.finish().is_ok());
    }
}
