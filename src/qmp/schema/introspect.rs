//! `query-qmp-schema`: QEMU's `SchemaInfo` list of the commands, the events and every type
//! they reach. As QEMU does, type names are masked into numbers (a client must not depend on
//! them; `q_empty` is "0"), arrays are `[N]` and builtins keep their names; members that may be
//! left out have `"default": null`.

use serde_json::{json, Value};

use super::{builtin_name, defs, find_type, Kind, BUILTINS, EMPTY};

/// The masked names given so far, in the order they were first reached.
struct Masks {
    names: Vec<String>,
    entries: Vec<Value>,
}

impl Masks {
    /// The name `query-qmp-schema` shows for `ty`, describing it (and what it reaches) the
    /// first time.
    fn name(&mut self, ty: &str) -> String {
        if let Some(builtin) = builtin_name(ty) {
            return builtin.to_string();
        }
        if let Some(element) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let element = self.name(element);
            let name = format!("[{element}]");
            if !self.entries.iter().any(|e| e["name"] == name) {
                self.entries
                    .push(json!({"name": name, "meta-type": "array", "element-type": element}));
            }
            return name;
        }
        if let Some(i) = self.names.iter().position(|n| n == ty) {
            return i.to_string();
        }
        let masked = self.names.len().to_string();
        self.names.push(ty.to_string());
        let Some(def) = find_type(ty) else {
            // Ruled out by the unit tests; shown as `any` rather than as a broken reference.
            return "any".to_string();
        };
        let mut entry = json!({"name": masked});
        match &def.kind {
            Kind::Object {
                members,
                tag,
                variants,
            } => {
                entry["meta-type"] = json!("object");
                let members: Vec<Value> = members
                    .iter()
                    .map(|m| {
                        let mut member = json!({"name": m.name, "type": self.name(m.ty)});
                        if m.optional {
                            member["default"] = Value::Null;
                        }
                        member
                    })
                    .collect();
                entry["members"] = json!(members);
                if let Some(tag) = tag {
                    entry["tag"] = json!(tag);
                    let variants: Vec<Value> = variants
                        .iter()
                        .map(|(case, ty)| json!({"case": case, "type": self.name(ty)}))
                        .collect();
                    entry["variants"] = json!(variants);
                }
            }
            Kind::Enum(values) => {
                entry["meta-type"] = json!("enum");
                entry["values"] = json!(values);
                let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                entry["members"] = json!(members);
            }
            Kind::Alternate(branches) => {
                entry["meta-type"] = json!("alternate");
                let members: Vec<Value> = branches
                    .iter()
                    .map(|b| json!({"type": self.name(b)}))
                    .collect();
                entry["members"] = json!(members);
            }
        }
        self.entries.push(entry);
        masked
    }
}

/// The `SchemaInfo` list: commands, events, then the types in the order first reached, then
/// the builtins.
pub fn schema_info() -> Vec<Value> {
    let mut masks = Masks {
        names: Vec::new(),
        entries: Vec::new(),
    };
    masks.name(EMPTY);
    let mut list = Vec::new();
    for command in defs::COMMANDS {
        list.push(json!({
            "name": command.name,
            "meta-type": "command",
            "arg-type": masks.name(command.args),
            "ret-type": masks.name(command.ret),
        }));
    }
    for event in defs::EVENTS {
        list.push(json!({
            "name": event.name,
            "meta-type": "event",
            "arg-type": masks.name(event.data),
        }));
    }
    list.append(&mut masks.entries);
    list.extend(BUILTINS.iter().map(
        |(name, json_type)| json!({"name": name, "meta-type": "builtin", "json-type": json_type}),
    ));
    list
}
