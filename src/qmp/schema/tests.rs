//! The schema is whole (every name it uses is defined, every union covers its tag), matches
//! the command table, describes its own `query-qmp-schema` output, and refuses each member of
//! the wrong type naming it.

use serde_json::{json, Map, Value};

use super::check::check;
use super::introspect::schema_info;
use super::*;

/// Every type name a definition uses.
fn references(def: &TypeDef) -> Vec<&'static str> {
    match &def.kind {
        Kind::Object {
            members, variants, ..
        } => members
            .iter()
            .map(|m| m.ty)
            .chain(variants.iter().map(|(_, t)| *t))
            .collect(),
        Kind::Enum(_) => Vec::new(),
        Kind::Alternate(branches) => branches.to_vec(),
    }
}

fn element(ty: &str) -> &str {
    match ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        Some(inner) => element(inner),
        None => ty,
    }
}

fn defined(ty: &str) -> bool {
    let ty = element(ty);
    builtin_name(ty).is_some() || find_type(ty).is_some()
}

fn is_object(ty: &str) -> bool {
    find_type(ty).is_some_and(|d| matches!(d.kind, Kind::Object { .. }))
}

#[test]
fn every_name_is_defined_once() {
    let names: Vec<&str> = types().map(|t| t.name).collect();
    for (i, name) in names.iter().enumerate() {
        assert!(!names[..i].contains(name), "{name} is defined twice");
        assert!(builtin_name(name).is_none(), "{name} shadows a builtin");
    }
    for def in types() {
        for ty in references(def) {
            assert!(defined(ty), "{} uses undefined type {ty}", def.name);
        }
    }
    for c in defs::COMMANDS {
        assert!(
            is_object(c.args),
            "{}: arguments {} are not an object",
            c.name,
            c.args
        );
        assert!(defined(c.ret), "{}: return type {}", c.name, c.ret);
    }
    for e in defs::EVENTS {
        assert!(is_object(e.data), "{}: data {}", e.name, e.data);
    }
}

#[test]
fn unions_cover_their_tag() {
    for def in types() {
        let Kind::Object {
            members,
            tag: Some(tag),
            variants,
        } = &def.kind
        else {
            continue;
        };
        let tag_member = members.iter().find(|m| m.name == *tag);
        let tag_member = tag_member.unwrap_or_else(|| panic!("{}: no member {tag}", def.name));
        assert!(!tag_member.optional, "{}: the tag is optional", def.name);
        let Some(Kind::Enum(values)) = find_type(tag_member.ty).map(|d| &d.kind) else {
            panic!("{}: tag {tag} is not an enum", def.name)
        };
        let cases: Vec<&str> = variants.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            &cases, values,
            "{}: one variant per value, in order",
            def.name
        );
        for (case, ty) in variants.iter() {
            assert!(is_object(ty), "{}: case {case} is not an object", def.name);
        }
    }
}

#[test]
fn every_command_of_the_table_is_in_the_schema() {
    let table: Vec<&str> = crate::qmp::dispatch::COMMANDS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let schema: Vec<&str> = defs::COMMANDS.iter().map(|c| c.name).collect();
    assert_eq!(table, schema);
}

#[test]
fn the_schema_describes_its_own_introspection() {
    let info = Value::Array(schema_info());
    check("[SchemaInfo]", &info, "return", "return").unwrap();
    let list = info.as_array().unwrap();
    let names: Vec<&str> = list.iter().filter_map(|e| e["name"].as_str()).collect();
    for (i, name) in names.iter().enumerate() {
        assert!(!names[..i].contains(name), "{name} listed twice");
    }
    // QEMU's style: type names masked into numbers, the empty object first.
    let by_name = |n: &str| list.iter().find(|e| e["name"] == n).cloned();
    let resize = by_name("block_resize").unwrap();
    let args = by_name(resize["arg-type"].as_str().unwrap()).unwrap();
    assert!(
        args["name"].as_str().unwrap().parse::<u32>().is_ok(),
        "{args}"
    );
    assert_eq!(
        args["members"],
        json!([
            {"name": "device", "type": "str", "default": null},
            {"name": "node-name", "type": "str", "default": null},
            {"name": "size", "type": "int"},
        ])
    );
    assert_eq!(resize["ret-type"], "0");
    assert_eq!(by_name("0").unwrap()["members"], json!([]));
    // Every reference leads to an entry.
    for entry in list {
        for key in ["arg-type", "ret-type", "element-type"] {
            if let Some(ty) = entry[key].as_str() {
                assert!(by_name(ty).is_some(), "{entry}: {ty} is not listed");
            }
        }
    }
}

/// A valid value of `ty`, with every optional member too (`depth` bounds the recursion
/// through BlockdevRef).
fn example(ty: &str, depth: u32) -> Value {
    if let Some(inner) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return json!([example(inner, depth)]);
    }
    match ty {
        "str" => return json!("x"),
        "bool" => return json!(true),
        "int" | "uint16" | "uint32" | "uint64" | "size" | "number" => return json!(1),
        "null" | "any" => return Value::Null,
        _ => {}
    }
    let def = find_type(ty).unwrap();
    match &def.kind {
        Kind::Enum(values) => json!(values[0]),
        Kind::Alternate(branches) => {
            // The non-object branch when recursion is deep enough.
            let branch = if depth > 1 { branches[1] } else { branches[0] };
            example(branch, depth + 1)
        }
        Kind::Object { .. } => Value::Object(example_members(ty, None, depth)),
    }
}

/// Every member of object type `ty` (for a union: of the variant `case`, else the first).
fn example_members(ty: &str, case: Option<&str>, depth: u32) -> Map<String, Value> {
    let Some(Kind::Object {
        members,
        tag,
        variants,
    }) = find_type(ty).map(|d| &d.kind)
    else {
        unreachable!("{ty} is an object")
    };
    let mut map = Map::new();
    for m in members.iter() {
        map.insert(m.name.to_string(), example(m.ty, depth));
    }
    if let Some(tag) = tag {
        let (case, variant) = match case {
            Some(c) => *variants.iter().find(|(v, _)| *v == c).unwrap(),
            None => variants[0],
        };
        map.insert(tag.to_string(), json!(case));
        map.extend(example_members(variant, None, depth));
    }
    map
}

/// A value of the wrong JSON type for `ty`, and the type QEMU's text then expects.
fn wrong(ty: &str) -> (Value, String) {
    if ty.starts_with('[') {
        return (json!("x"), "array".into());
    }
    let text = |v: Value, t: &str| (v, t.to_string());
    match ty {
        "str" => text(json!(1), "string"),
        "bool" => text(json!("x"), "boolean"),
        "int" => text(json!("x"), "integer"),
        "uint16" | "uint32" | "uint64" | "size" => text(json!("x"), "uint64"),
        _ => match &find_type(ty).unwrap().kind {
            Kind::Enum(_) => text(json!(1), "string"),
            Kind::Object { .. } => text(json!(1), "object"),
            Kind::Alternate(_) => text(json!([]), ty),
        },
    }
}

#[test]
fn each_member_of_the_wrong_type_is_named() {
    for command in defs::COMMANDS {
        let def = find_type(command.args).unwrap();
        let cases: Vec<Option<&str>> = match &def.kind {
            Kind::Object { variants, .. } if !variants.is_empty() => {
                variants.iter().map(|(c, _)| Some(*c)).collect()
            }
            _ => vec![None],
        };
        for case in cases {
            let full = example_members(command.args, case, 0);
            check_arguments(command.name, &full)
                .unwrap_or_else(|e| panic!("{}: {full:?}: {}", command.name, e.desc));
            for (key, value) in &full {
                let Some(ty) = member_type(command.args, case, key) else {
                    unreachable!("{key} comes from the schema")
                };
                if ty == "any" || (is_tag(command.args, key)) {
                    continue;
                }
                let (bad, expected) = wrong(ty);
                let mut args = full.clone();
                args.insert(key.clone(), bad);
                let e = check_arguments(command.name, &args).unwrap_err();
                let want = if expected == "uint64" {
                    format!("Parameter '{key}' expects uint64")
                } else {
                    format!("Invalid parameter type for '{key}', expected: {expected}")
                };
                assert_eq!(e.desc, want, "{}", command.name);
                let _ = value;
            }
            let mut extra = full.clone();
            extra.insert("strata-no-such-member".into(), json!(1));
            assert_eq!(
                check_arguments(command.name, &extra).unwrap_err().desc,
                "Parameter 'strata-no-such-member' is unexpected"
            );
        }
    }
}

fn is_tag(ty: &str, key: &str) -> bool {
    matches!(find_type(ty).map(|d| &d.kind), Some(Kind::Object { tag: Some(t), .. }) if *t == key)
}

fn member_type(ty: &str, case: Option<&str>, key: &str) -> Option<&'static str> {
    let Some(Kind::Object {
        members, variants, ..
    }) = find_type(ty).map(|d| &d.kind)
    else {
        return None;
    };
    if let Some(m) = members.iter().find(|m| m.name == key) {
        return Some(m.ty);
    }
    let (_, variant) = match case {
        Some(c) => variants.iter().find(|(v, _)| *v == c)?,
        None => variants.first()?,
    };
    member_type(variant, None, key)
}

fn desc(command: &str, args: Value) -> String {
    let Value::Object(args) = args else {
        unreachable!("tests pass objects")
    };
    match check_arguments(command, &args) {
        Ok(()) => "ok".into(),
        Err(e) => e.desc,
    }
}

/// QEMU 7.2's texts for nested and unusual cases, as qemu-storage-daemon gives them.
#[test]
fn nested_members_have_qemus_texts() {
    let file = |extra: Value| {
        let mut f = json!({"driver": "file", "filename": "/x"});
        f.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        f
    };
    for (command, args, want) in [
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x", "file": file(json!({"foo": 1}))}),
            "Parameter 'file.foo' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x",
                                "file": file(json!({"read-only": "x"}))}),
            "Invalid parameter type for 'file.read-only', expected: boolean",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x", "file": 5}),
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "x"}),
            "Parameter 'file' is missing",
        ),
        (
            "blockdev-add",
            json!({"driver": "nope"}),
            "Parameter 'driver' does not accept value 'nope'",
        ),
        (
            "blockdev-add",
            json!({"node-name": "x"}),
            "Parameter 'driver' is missing",
        ),
        (
            "blockdev-add",
            file(json!({"cache": {"foo": true}})),
            "Parameter 'cache.foo' is unexpected",
        ),
        (
            "blockdev-add",
            file(json!({"aio": "x"})),
            "Parameter 'aio' does not accept value 'x'",
        ),
        (
            "blockdev-add",
            file(json!({"size": 1})),
            "Parameter 'size' is unexpected",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "file": "f", "overlap-check": 5}),
            "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "file": "f", "overlap-check": {"template": "x"}}),
            "Parameter 'template' does not accept value 'x'",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "file": "f", "overlap-check": "all", "backing": null}),
            "ok",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "file": "f", "backing": 5}),
            "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
        ),
        (
            "blockdev-add",
            json!({"driver": "rbd", "pool": "p", "image": "i",
                                "server": [{"host": "h", "port": 5}]}),
            "Invalid parameter type for 'server[0].port', expected: string",
        ),
        (
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": "e", "node-name": "d",
                                    "addr": {"type": "unix", "path": "/s", "foo": 1}}),
            "Parameter 'addr.foo' is unexpected",
        ),
        (
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": "e", "node-name": "d",
                                    "addr": {"type": "zz"}}),
            "Parameter 'type' does not accept value 'zz'",
        ),
        (
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": "e", "node-name": "d"}),
            "Parameter 'addr' is missing",
        ),
        (
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": "e", "node-name": "d",
                                    "addr": {"type": "fd", "str": "3"}, "num-queues": -1}),
            "Parameter 'num-queues' expects uint16_t",
        ),
        (
            "blockdev-create",
            json!({"job-id": "j", "options": {"driver": "qcow2", "size": 0,
                                   "file": {"driver": "file", "filename": "/x", "foo": 1}}}),
            "Parameter 'options.file.foo' is unexpected",
        ),
        (
            "blockdev-create",
            json!({"job-id": "j", "options": {}}),
            "Parameter 'options.driver' is missing",
        ),
        (
            "blockdev-create",
            json!({"job-id": "j", "options": 5}),
            "Invalid parameter type for 'options', expected: object",
        ),
        (
            "block_resize",
            json!({"node-name": "d", "size": 1.5e21}),
            "Invalid parameter type for 'size', expected: integer",
        ),
        ("block_resize", json!({"node-name": "d", "size": -1}), "ok"),
        (
            "blockdev-add",
            json!({"driver": "null-co", "latency-ns": "x"}),
            "Parameter 'latency-ns' expects uint64",
        ),
        (
            "blockdev-create",
            json!({"job-id": "j", "options": {"driver": "file", "filename": "/x",
                                   "size": 1.5}}),
            "Parameter 'options.size' expects uint64",
        ),
        (
            "query-blockstats",
            json!({"query-nodes": 1}),
            "Invalid parameter type for 'query-nodes', expected: boolean",
        ),
        (
            "block-latency-histogram-set",
            json!({"id": "e", "boundaries-read": [1, "x"]}),
            "Parameter 'boundaries-read[1]' expects uint64",
        ),
        (
            "block-latency-histogram-set",
            json!({"id": "e", "boundaries-zap": [1]}),
            "Parameter 'boundaries-zap' is unexpected",
        ),
        // QEMU's uint64 takes a negative integer (the handler refuses it).
        (
            "block-latency-histogram-set",
            json!({"id": "e", "boundaries": [-1]}),
            "ok",
        ),
    ] {
        assert_eq!(desc(command, args.clone()), want, "{command} {args}");
    }
}
