#!/usr/bin/env python3
"""query-qmp-schema and argument checking: the same checks against strata and
qemu-storage-daemon (QSD).

Usage: schema.py strata|qsd BINARY [QSD_BINARY]

Walks the daemon's own query-qmp-schema (type names masked into numbers, as QEMU does) and,
for every command strata has, calls it: with every member the schema lists (a refusal may
not be about the arguments: the handler takes each member its schema lists), with each
member of the wrong JSON type, each required one missing and an unknown one (at the top level
and inside nested objects: the error names that member with QEMU's text). Every command in
query-commands is in the schema; query-* returns conform to their ret-type. Against strata,
QSD's schema is fetched too and, command by command, the members strata accepts are compared
with QSD's: the differences must be exactly the documented ones (README, QMP section); return
types are compared at every depth (strata's members are QEMU's, with QEMU's types).
Prints "N passed, 0 failed".
"""
import asyncio
import os
import shutil
import subprocess
import sys
import time

from qemu.qmp import ExecuteError, QMPClient

from harness import (DAEMON, BINARY, STRATA, check, check_exit, listening, monitor_args, passed,
                     raw_disk_args, running, scratch_disk)

QSD = sys.argv[3] if len(sys.argv) > 3 else "qemu-storage-daemon"

# strata's commands.
COMMANDS = ["qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
            "blockdev-add", "blockdev-del", "query-named-block-nodes", "blockdev-reopen",
            "x-blockdev-set-iothread", "block_resize",
            "block-export-add", "block-export-del", "query-block-exports", "blockdev-create",
            "query-jobs", "job-cancel", "job-pause", "job-resume", "job-complete",
            "job-finalize", "job-dismiss", "query-blockstats", "block-latency-histogram-set"]
# strata's commands that QSD 7.2 does not have (README, QMP section): QEMU's system emulator
# has block-latency-histogram-set (qapi/block.json), for its devices only.
NOT_IN_QSD = {"block-latency-histogram-set"}
# The union cases probed for each command (those strata has): by member ("" for the
# arguments themselves), the case taken.
DRIVERS = ["file", "host_device", "null-co", "qcow2", "raw", "rbd"]
VARIANTS = {
    "blockdev-add": [{"": c} for c in DRIVERS],
    "block-export-add": [{"": "vhost-user-blk", "addr": "unix"},
                         {"": "vhost-user-blk", "addr": "fd"}],
    "blockdev-create": [{"options": "file"}, {"options": "qcow2"}, {"options": "raw"}],
}
EVENTS = ["BLOCK_EXPORT_DELETED", "JOB_STATUS_CHANGE"]


def label(cmd, choice):
    return cmd + "".join(f"/{c}" for c in choice.values())


# Members (label/path) where strata and QSD 7.2 differ, each documented in the README:
# strata's own options, and QEMU's that strata does not implement (refused as unexpected, so
# a management tool sees from the schema that they are absent).
EXPORTS = [label("block-export-add", c) for c in VARIANTS["block-export-add"]]
STRATA_ONLY = {
    "blockdev-add/file/share-rw", "blockdev-add/host_device/share-rw",
    "blockdev-add/qcow2/discard-no-unref",
    # BlockdevCreateOptionsRaw: QEMU 7.2's raw case has no members (no creation).
    "blockdev-create/raw/options.file", "blockdev-create/raw/options.size",
} | {f"{e}/{m}" for e in EXPORTS for m in ["serial", "socket-mode", "socket-group",
                                             "poll-max-ns"]}
QEMU_ONLY = {f"blockdev-add/{d}/force-share" for d in DRIVERS} | {
    f"blockdev-add/{d}/{m}" for d in ["file", "host_device"]
    for m in ["pr-manager", "aio-max-batch", "drop-cache", "x-check-cache-dropped"]
} | {
    "blockdev-add/qcow2/encrypt", "blockdev-add/qcow2/data-file", "blockdev-add/rbd/encrypt",
    "block-export-add/vhost-user-blk/unix/addr.abstract",
    "block-export-add/vhost-user-blk/unix/addr.tight",
    "blockdev-create/qcow2/options.data-file", "blockdev-create/qcow2/options.data-file-raw",
    "blockdev-create/qcow2/options.encrypt",
}


class Schema:
    """A query-qmp-schema answer, walked by (masked) type name."""

    def __init__(self, entries):
        self.by_name = {e["name"]: e for e in entries}

    def __getitem__(self, name):
        return self.by_name[name]

    def meta(self, ty):
        return self.by_name[ty]["meta-type"]

    def members(self, ty, case=None):
        """An object's members, with those of variant `case` (default: the first)."""
        entry = self.by_name[ty]
        members = list(entry["members"])
        if "tag" in entry:
            variants = {v["case"]: v["type"] for v in entry["variants"]}
            case = case or entry["variants"][0]["case"]
            members += self.members(variants[case])
        return members

    def cases(self, ty):
        entry = self.by_name[ty]
        return [v["case"] for v in entry.get("variants", [])]

    def tag(self, ty):
        return self.by_name[ty].get("tag")

    def conforms(self, value, ty, path="return"):
        """Whether `value` is of type `ty`; raises naming the first member that is not."""
        entry = self.by_name[ty]
        meta = entry["meta-type"]
        ok = True
        if meta == "builtin":
            ok = {"string": lambda v: isinstance(v, str),
                  "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "boolean": lambda v: isinstance(v, bool),
                  "number": lambda v: isinstance(v, (int, float)),
                  "null": lambda v: v is None,
                  "value": lambda v: True}[entry["json-type"]](value)
        elif meta == "enum":
            ok = value in entry["values"]
        elif meta == "array":
            ok = isinstance(value, list)
            for i, item in enumerate(value if ok else []):
                self.conforms(item, entry["element-type"], f"{path}[{i}]")
        elif meta == "alternate":
            ok = False
            for branch in entry["members"]:
                try:
                    self.conforms(value, branch["type"], path)
                    ok = True
                    break
                except AssertionError:
                    pass
        elif meta == "object":
            ok = isinstance(value, dict)
            if ok:
                case = value.get(entry["tag"]) if "tag" in entry else None
                members = self.members(ty, case)
                names = {m["name"] for m in members}
                extra = set(value) - names
                check(not extra, f"{path}: members {extra} are not in the schema")
                for m in members:
                    if m["name"] in value:
                        self.conforms(value[m["name"]], m["type"], f"{path}.{m['name']}")
                    else:
                        check("default" in m, f"{path}.{m['name']} is required, absent")
        check(ok, f"{path}: {value!r} is not a {meta} {ty}")


def example(schema, ty, depth=0):
    """A valid value of `ty`: strings "x", numbers 1, enums their first value; alternates
    their non-object branch where there is one (a node name rather than an inline node)."""
    entry = schema[ty]
    meta = entry["meta-type"]
    if meta == "builtin":
        return {"string": "x", "int": 1, "boolean": True, "number": 1,
                "null": None, "value": None}[entry["json-type"]]
    if meta == "enum":
        return entry["values"][0]
    if meta == "array":
        return [example(schema, entry["element-type"], depth)]
    if meta == "alternate":
        branches = [b["type"] for b in entry["members"]]
        plain = [b for b in branches if schema.meta(b) != "object"]
        return example(schema, (plain or branches)[0], depth)
    return {m["name"]: example(schema, m["type"], depth + 1) for m in schema.members(ty)}


def wrong(schema, ty):
    """A value of the wrong JSON type for `ty`, and the type QEMU's text names (None for an
    alternate: QEMU names it by its real name, which the schema masks)."""
    meta = schema.meta(ty)
    if meta == "builtin":
        json_type = schema[ty]["json-type"]
        return {"string": (1, "string"), "int": ("x", "integer"),
                "boolean": ("x", "boolean"), "number": ("x", "number")}.get(json_type)
    return {"enum": (1, "string"), "array": ("x", "array"), "object": (1, "object"),
            "alternate": ([], None)}[meta]


# Texts that mean the arguments were refused as such, not what they asked for.
ARGUMENT_ERRORS = ["is unexpected", "Invalid parameter", "is missing", "does not accept value",
                   "expects uint", "doesn't support the option", "does not support the option"]


async def outcome(qmp, cmd, args):
    try:
        await qmp.execute(cmd, args)
        return None
    except ExecuteError as e:
        return e.error.error.desc


def arguments_for(schema, cmd, choice):
    """Every member of `cmd`'s arguments, unions at the cases `choice` gives; returns the
    arguments and [(path, type, required, nested object)]."""
    args, slots = {}, []

    def fill(ty, into, prefix, key):
        tag = schema.tag(ty)
        case = (choice.get(key) or schema.cases(ty)[0]) if tag else None
        for m in schema.members(ty, case):
            path = prefix + m["name"]
            if m["name"] == tag:
                into[tag] = case
                continue
            mty = m["type"]
            if schema.meta(mty) == "object":
                into[m["name"]] = {}
                fill(mty, into[m["name"]], path + ".", m["name"])
                slots.append((path, mty, "default" not in m, into[m["name"]]))
            else:
                into[m["name"]] = example(schema, mty)
                slots.append((path, mty, "default" not in m, None))

    fill(schema[cmd]["arg-type"], args, "", "")
    return args, slots


def at(args, path):
    """The dict holding `path`'s last component, and that key."""
    *parents, last = path.split(".")
    for p in parents:
        args = args[p]
    return args, last


async def probe_command(qmp, schema, cmd, d):
    arg_type = schema[cmd]["arg-type"]
    for choice in VARIANTS.get(cmd, [{}]):
        where = label(cmd, choice)
        args, slots = arguments_for(schema, cmd, choice)
        # Every member the schema lists is taken: any refusal is about what they ask for.
        desc = await outcome(qmp, cmd, args)
        if desc is None and cmd == "blockdev-add":
            await qmp.execute("blockdev-del", {"node-name": args["node-name"]})
        check(desc is None or not any(t in desc for t in ARGUMENT_ERRORS),
              f"{where}: every member of the schema: {desc}")
        for path, ty, required, nested in slots:
            bad = wrong(schema, ty)
            if bad is not None:
                value, expected = bad
                probe = copy(args)
                holder, key = at(probe, path)
                holder[key] = value
                desc = await outcome(qmp, cmd, probe)
                # QEMU names an alternate by its member name only.
                named = path.rsplit(".", 1)[-1] if expected is None else path
                prefix = f"Invalid parameter type for '{named}', expected: "
                # "int" is QEMU's int64 or one of its unsigned types, with another text.
                check(desc is not None and (desc.startswith(prefix) and
                                            (expected is None or desc == prefix + expected) or
                                            expected == "integer" and
                                            desc == f"Parameter '{path}' expects uint64"),
                      f"{where} {path}: wrong type: {desc}")
            if required:
                probe = copy(args)
                holder, key = at(probe, path)
                del holder[key]
                desc = await outcome(qmp, cmd, probe)
                check(desc == f"Parameter '{path}' is missing", f"{where} {path} missing: {desc}")
            if nested is not None:
                probe = copy(args)
                holder, key = at(probe, path)
                holder[key]["zz-unknown"] = 1
                desc = await outcome(qmp, cmd, probe)
                check(desc == f"Parameter '{path}.zz-unknown' is unexpected",
                      f"{where} {path}: unknown member: {desc}")
        probe = dict(copy(args), **{"zz-unknown": 1})
        desc = await outcome(qmp, cmd, probe)
        check(desc == "Parameter 'zz-unknown' is unexpected", f"{where}: unknown member: {desc}")
    check(schema.meta(arg_type) == "object", f"{cmd}: arguments are an object")


def copy(value):
    if isinstance(value, dict):
        return {k: copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy(v) for v in value]
    return value


def shape(schema, cmd, choice):
    """{path: (json kind, required)} of `cmd`'s arguments for the cases `choice`, nested
    objects flattened (an alternate counts as one member), to compare two daemons' schemas."""
    out = {}

    def kind(ty):
        entry = schema[ty]
        meta = entry["meta-type"]
        if meta == "builtin":
            return entry["json-type"]
        if meta == "enum":
            return "enum"
        if meta == "array":
            return "[" + kind(entry["element-type"]) + "]"
        return meta

    def walk(ty, prefix, key):
        tag = schema.tag(ty)
        for m in schema.members(ty, choice.get(key) if tag else None):
            path = prefix + m["name"]
            out[path] = (kind(m["type"]), "default" not in m)
            if out[path][0] == "object":
                walk(m["type"], path + ".", m["name"])

    walk(schema[cmd]["arg-type"], "", "")
    return out


def compare_returns(mine, theirs, ty_a, ty_b, where, seen):
    """strata's return type `ty_a` against QSD's `ty_b`, at every depth: the same kind; an
    object lists QEMU's members only (those strata fills in), every one QEMU requires, each
    of the same kind and required-ness; an enum QEMU's values only."""
    if (ty_a, ty_b) in seen:
        return
    seen.add((ty_a, ty_b))
    meta = mine.meta(ty_a)
    check(meta == theirs.meta(ty_b), f"{where}: strata's {meta}, QSD's {theirs.meta(ty_b)}")
    if meta == "array":
        compare_returns(mine, theirs, mine[ty_a]["element-type"], theirs[ty_b]["element-type"],
                        f"{where}[]", seen)
    elif meta == "builtin":
        check(mine[ty_a]["json-type"] == theirs[ty_b]["json-type"], f"{where}: json types")
    elif meta == "enum":
        extra = set(mine[ty_a]["values"]) - set(theirs[ty_b]["values"])
        check(not extra, f"{where}: values {extra} are not QEMU's")
    elif meta == "object":
        ours = {m["name"]: m for m in mine[ty_a]["members"]}
        qemus = {m["name"]: m for m in theirs[ty_b]["members"]}
        check(set(ours) <= set(qemus), f"{where}: not QEMU's: {set(ours) - set(qemus)}")
        required = {n for n, m in qemus.items() if "default" not in m}
        check(required <= set(ours), f"{where}: QEMU requires {required - set(ours)}")
        for name, m in ours.items():
            check(("default" in m) == ("default" in qemus[name]), f"{where}.{name}: optional")
            compare_returns(mine, theirs, m["type"], qemus[name]["type"], f"{where}.{name}",
                            seen)
        # A union's cases strata has (its tag lists only those): each variant's members.
        if "tag" in mine[ty_a]:
            theirs_cases = {v["case"]: v["type"] for v in theirs[ty_b]["variants"]}
            for v in mine[ty_a]["variants"]:
                check(v["case"] in theirs_cases, f"{where}: case {v['case']} is not QEMU's")
                compare_returns(mine, theirs, v["type"], theirs_cases[v["case"]],
                                f"{where}/{v['case']}", seen)


def compare_with_qsd(mine, theirs):
    for cmd in NOT_IN_QSD:
        check(cmd not in theirs.by_name, f"QSD has {cmd} now")
    for cmd in [c for c in COMMANDS if c not in NOT_IN_QSD]:
        for choice in VARIANTS.get(cmd, [{}]):
            where = label(cmd, choice)
            a, b = shape(mine, cmd, choice), shape(theirs, cmd, choice)
            # A member one side lacks, not those nested in it.
            only_strata = {f"{where}/{p}" for p in set(a) - set(b)
                           if "." not in p or p.rsplit(".", 1)[0] not in set(a) - set(b)}
            only_qemu = {f"{where}/{p}" for p in set(b) - set(a)
                         if "." not in p or p.rsplit(".", 1)[0] not in set(b) - set(a)}
            documented_strata = {p for p in STRATA_ONLY if p.rsplit("/", 1)[0] == where}
            documented_qemu = {p for p in QEMU_ONLY if p.rsplit("/", 1)[0] == where}
            check(only_strata == documented_strata,
                  f"{where}: strata-only members {sorted(only_strata)}, "
                  f"documented {sorted(documented_strata)}")
            check(only_qemu == documented_qemu,
                  f"{where}: QEMU-only members {sorted(only_qemu)}, "
                  f"documented {sorted(documented_qemu)}")
            for path in set(a) & set(b):
                check(a[path] == b[path], f"{where}/{path}: strata {a[path]}, QSD {b[path]}")
        if cmd != "query-qmp-schema":
            compare_returns(mine, theirs, mine[cmd]["ret-type"], theirs[cmd]["ret-type"],
                            f"{cmd} return", set())
    for event in EVENTS:
        a = {m["name"] for m in mine.members(mine[event]["arg-type"])}
        b = {m["name"] for m in theirs.members(theirs[event]["arg-type"])}
        check(a == b, f"{event}: data {a} vs {b}")


async def fetch_schema(binary, d):
    mon = os.path.join(d, "qsd-ref.sock")
    daemon = subprocess.Popen([binary, *monitor_args(mon)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not listening(mon):
            check(daemon.poll() is None and time.monotonic() < deadline, "QSD started")
            await asyncio.sleep(0.05)
        qmp = QMPClient("schema-reference")
        await qmp.connect(mon)
        schema = Schema(await qmp.execute("query-qmp-schema"))
        await qmp.disconnect()
        return schema
    finally:
        daemon.terminate()
        daemon.wait(30)


async def checks(d, mon):
    qmp = QMPClient("schema")
    await qmp.connect(mon)
    entries = await qmp.execute("query-qmp-schema")
    schema = Schema(entries)
    schema.conforms(entries, schema["query-qmp-schema"]["ret-type"])
    names = [c["name"] for c in await qmp.execute("query-commands")]
    commands = [e["name"] for e in entries if e["meta-type"] == "command"]
    check(set(names) <= set(commands), f"query-commands not in the schema: "
                                       f"{set(names) - set(commands)}")
    mine = COMMANDS if STRATA else [c for c in COMMANDS if c not in NOT_IN_QSD]
    check(set(mine) <= set(names), f"missing commands {set(mine) - set(names)}")
    if STRATA:
        check(set(names) == set(commands) == set(COMMANDS),
              f"strata-only: the schema lists exactly strata's commands: {commands}")
        check({e["name"] for e in entries if e["meta-type"] == "event"} == set(EVENTS),
              "strata-only: exactly its events")
    else:
        check(not NOT_IN_QSD & set(commands), f"QSD has {NOT_IN_QSD & set(commands)} now")
    # Every reference resolves; type names are masked as QEMU masks them.
    for e in entries:
        refs = [e.get(k) for k in ("arg-type", "ret-type", "element-type")]
        refs += [m.get("type") for m in e.get("members", [])]
        refs += [v["type"] for v in e.get("variants", [])]
        for r in refs:
            check(r is None or r in schema.by_name, f"{e['name']}: {r} is not listed")
        if e["meta-type"] in ("object", "enum", "alternate"):
            check(e["name"].isdigit(), f"type name {e['name']} is masked")
    for cmd in ["query-version", "query-commands", "query-named-block-nodes",
                "query-block-exports", "query-jobs", "query-blockstats"]:
        schema.conforms(await qmp.execute(cmd), schema[cmd]["ret-type"], cmd)
    stats = await qmp.execute("query-blockstats", {"query-nodes": True})
    check({e["node-name"] for e in stats} == {"f0", "d0"}, f"query-blockstats: {stats}")
    schema.conforms(stats, schema["query-blockstats"]["ret-type"], "query-blockstats")
    for cmd in mine:
        if cmd != "qmp_capabilities":  # answered by the server once negotiated
            await probe_command(qmp, schema, cmd, d)
    # Values a type check cannot see, with QSD's texts.
    for args, desc in [({"node-name": "d0", "size": -1}, "Parameter 'size' expects a >0 size"),
                       ({"node-name": "d0", "size": 1.5},
                        "Invalid parameter type for 'size', expected: integer")]:
        check(await outcome(qmp, "block_resize", args) == desc, f"block_resize {args}")
    if STRATA:
        compare_with_qsd(schema, await fetch_schema(QSD, d))
    await qmp.disconnect()


def main():
    d, image = scratch_disk("strata-qmp-schema-")
    mon = os.path.join(d, "m0.sock")
    argv = [BINARY, *raw_disk_args(image), *monitor_args(mon)]
    if STRATA:
        argv += ["--sandbox-allow-dir", d]
    try:
        # Relative names ("x") the probes give land in the test's directory.
        with running(argv, os.path.join(d, "daemon.log"), [mon], cwd=d) as daemon:
            asyncio.run(checks(d, mon))
            check(daemon.poll() is None, "the daemon is still running")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    check_exit(daemon)
    print(f"qmp schema ({DAEMON}): {passed()} passed, 0 failed")


main()
