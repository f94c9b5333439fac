//! Parsing `--export` options (qemu-storage-daemon's `type=vhost-user-blk,...` syntax).

use std::ffi::CString;
use std::path::PathBuf;

use strata_backend::{Graph, Options};
use strata_vhost::{BlkExportConfig, Listen};

use crate::iothreads::IoThreads;

/// Parses one `--export`, resolves its node in the graph (and its iothread in `iothreads`), and
/// checks the settings ([`BlkExportConfig::validate`]).
pub fn parse(
    text: &str,
    graph: &Graph,
    iothreads: &IoThreads,
) -> Result<(BlkExportConfig, Listen), String> {
    let o = Options::parse(text, Some("type")).map_err(|e| e.to_string())?;
    from_options(o, graph, iothreads)
}

/// The same from options already split into keys (QMP's `block-export-add`, flattened).
pub fn from_options(
    mut o: Options,
    graph: &Graph,
    iothreads: &IoThreads,
) -> Result<(BlkExportConfig, Listen), String> {
    let err = |e: strata_backend::BlockError| e.to_string();
    match o.take("type").as_deref() {
        Some("vhost-user-blk") => {}
        Some(other) => {
            return Err(format!(
                "Export type '{other}' is not supported (strata serves type=vhost-user-blk)"
            ))
        }
        None => return Err("--export needs 'type' (type=vhost-user-blk)".into()),
    }
    let id = o.take("id").ok_or("--export needs an 'id'")?;
    let node_name = o
        .take("node-name")
        .ok_or_else(|| format!("export '{id}': needs 'node-name'"))?;
    let node = graph
        .find(&node_name)
        .ok_or_else(|| format!("export '{id}': Cannot find node '{node_name}'"))?;
    let mut config = BlkExportConfig::new(id.clone(), node);
    if let Some(writable) = o.take_bool("writable").map_err(err)? {
        config.writable = writable;
    }
    if let Some(writethrough) = o.take_bool("writethrough").map_err(err)? {
        config.writethrough = writethrough;
    }
    // strata runs a worker per queue whatever the iothread; its polling setting carries over.
    let iothread_poll_max_ns = match o.take("iothread") {
        Some(name) => iothreads
            .poll_max_ns(&name)
            .map_err(|e| format!("export '{id}': {e}"))?,
        None => None,
    };
    let listen = match o.take("addr.type").as_deref() {
        Some("unix") => {
            Listen::UnixPath(PathBuf::from(o.take("addr.path").ok_or_else(|| {
                format!("export '{id}': addr.type=unix needs 'addr.path'")
            })?))
        }
        Some("fd") => {
            let s = o
                .take("addr.str")
                .ok_or_else(|| format!("export '{id}': addr.type=fd needs 'addr.str'"))?;
            Listen::Fd(s.parse().map_err(|_| {
                format!("export '{id}': addr.str must be a file descriptor number, got '{s}'")
            })?)
        }
        Some(other) => {
            return Err(format!(
                "export '{id}': addr.type '{other}' is not supported (use unix or fd)"
            ))
        }
        None => return Err(format!("export '{id}': needs 'addr.type' (unix or fd)")),
    };
    if let Some(n) = o.take_u64("num-queues").map_err(err)? {
        config.num_queues = narrow(&id, "num-queues", n)?;
    }
    if let Some(n) = o.take_size("logical-block-size").map_err(err)? {
        config.logical_block_size = narrow(&id, "logical-block-size", n)?;
    }
    config.serial = o.take("serial");
    // strata extensions: who may connect to the socket the export creates at addr.path.
    let (mode, group) = (o.take("socket-mode"), o.take("socket-group"));
    if matches!(listen, Listen::Fd(_)) && (mode.is_some() || group.is_some()) {
        return Err(format!(
            "export '{id}': socket-mode and socket-group apply to addr.type=unix only"
        ));
    }
    if let Some(mode) = mode {
        config.socket_mode = u32::from_str_radix(&mode, 8).map_err(|_| {
            format!("export '{id}': socket-mode must be an octal mode such as 0660, got '{mode}'")
        })?;
    }
    if let Some(group) = group {
        config.socket_group =
            Some(group_id(&group).map_err(|e| format!("export '{id}': socket-group {e}"))?);
    }
    // QSD sets polling on its iothread object (poll-max-ns); strata's workers belong to the
    // export, so the export takes it too, and its own setting wins.
    if let Some(ns) = o
        .take_u64("poll-max-ns")
        .map_err(err)?
        .or(iothread_poll_max_ns)
    {
        config.poll_max_ns = ns;
    }
    if let Some(key) = o.first_key() {
        return Err(format!("export '{id}': Invalid parameter '{key}'"));
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok((config, listen))
}

/// Refuses two exports on one inherited descriptor or one socket path: the second would take
/// over (and close) what the first owns.
pub fn check_distinct(exports: &[(BlkExportConfig, Listen)]) -> Result<(), String> {
    for (i, (config, listen)) in exports.iter().enumerate() {
        let earlier = exports[..i].iter().find(|(_, l)| match (l, listen) {
            (Listen::Fd(a), Listen::Fd(b)) => a == b,
            (Listen::UnixPath(a), Listen::UnixPath(b)) => a == b,
            _ => false,
        });
        if let Some((first, _)) = earlier {
            let address = match listen {
                Listen::Fd(fd) => format!("addr.str={fd}"),
                Listen::UnixPath(path) => format!("addr.path={}", path.display()),
            };
            return Err(format!(
                "export '{}': {address} is already used by export '{}'",
                config.id, first.id
            ));
        }
    }
    Ok(())
}

/// The id of group `name`: a group name, or else a number.
fn group_id(name: &str) -> Result<u32, String> {
    let c_name = CString::new(name).map_err(|_| format!("'{name}' contains a NUL byte"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: `group` is plain data: all zeroes (null pointers, gid 0) is a valid value.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `c_name` is NUL-terminated; `group` and `found` are locals; `buf` has
        // `buf.len()` writable bytes, where getgrnam_r puts the strings `group` points to
        // (only `gr_gid` is read, below).
        let r = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 {
            return Err(format!(
                "'{name}': {}",
                std::io::Error::from_raw_os_error(r)
            ));
        }
        if !found.is_null() {
            return Ok(group.gr_gid);
        }
        return name.parse().map_err(|_| format!("'{name}': no such group"));
    }
}

/// `value` of option `key` in the setting's integer type. Only a value the type cannot hold is
/// refused here; the setting's range is [`BlkExportConfig::validate`]'s to check.
fn narrow<T: TryFrom<u64>>(id: &str, key: &str, value: u64) -> Result<T, String> {
    T::try_from(value)
        .map_err(|_| format!("export '{id}': Parameter '{key}' is too large, got '{value}'"))
}
