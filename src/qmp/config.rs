//! `--chardev` and `--monitor`: where the QMP monitors listen, in qemu-storage-daemon's syntax.

use std::os::fd::RawFd;
use std::path::PathBuf;

use strata_backend::Options;

/// Where a monitor's chardev listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevAddr {
    /// A Unix socket created at this path (`path=`).
    Path(PathBuf),
    /// An inherited listening Unix socket (`fd=N`).
    Fd(RawFd),
}

/// One `--monitor`, with its chardev resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    /// The chardev id (messages name it).
    pub chardev: String,
    /// Where it listens.
    pub addr: ChardevAddr,
    /// `pretty=on`: replies and events indented over several lines.
    pub pretty: bool,
}

/// A `--chardev socket,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chardev {
    id: String,
    addr: ChardevAddr,
}

/// Resolves every `--monitor` against the `--chardev`s. A chardev no monitor uses is an error
/// (strata has nothing else to attach it to); so is one used twice.
pub fn parse(chardevs: &[String], monitors: &[String]) -> Result<Vec<MonitorConfig>, String> {
    let mut devs = Vec::new();
    for text in chardevs {
        let dev = parse_chardev(text).map_err(|e| format!("--chardev {text}: {e}"))?;
        if devs.iter().any(|d: &Chardev| d.id == dev.id) {
            return Err(format!(
                "--chardev {text}: Duplicate chardev ID '{}'",
                dev.id
            ));
        }
        devs.push(dev);
    }
    let mut configs: Vec<MonitorConfig> = Vec::new();
    for text in monitors {
        let mut o =
            Options::parse(text, Some("chardev")).map_err(|e| format!("--monitor {text}: {e}"))?;
        let bad = |e: String| format!("--monitor {text}: {e}");
        let chardev = o
            .take("chardev")
            .ok_or_else(|| bad("needs 'chardev'".into()))?;
        let pretty = o
            .take_bool("pretty")
            .map_err(|e| bad(e.to_string()))?
            .unwrap_or(false);
        match o.take("mode").as_deref() {
            None | Some("control") => {}
            Some(other) => {
                return Err(bad(format!(
                    "mode={other} is not supported (strata's monitors speak QMP: mode=control)"
                )))
            }
        }
        o.take("id");
        if let Some(key) = o.first_key() {
            return Err(bad(format!("Invalid parameter '{key}'")));
        }
        let dev = devs
            .iter()
            .find(|d| d.id == chardev)
            .ok_or_else(|| bad(format!("chardev '{chardev}' not found")))?;
        if configs.iter().any(|c| c.chardev == chardev) {
            return Err(bad(format!(
                "chardev '{chardev}' is already used by another monitor"
            )));
        }
        configs.push(MonitorConfig {
            chardev,
            addr: dev.addr.clone(),
            pretty,
        });
    }
    if let Some(unused) = devs
        .iter()
        .find(|d| !configs.iter().any(|c| c.chardev == d.id))
    {
        return Err(format!(
            "--chardev id={}: no --monitor uses it (strata's chardevs serve monitors only)",
            unused.id
        ));
    }
    Ok(configs)
}

fn parse_chardev(text: &str) -> Result<Chardev, String> {
    let mut o = Options::parse(text, Some("backend")).map_err(|e| e.to_string())?;
    match o.take("backend").as_deref() {
        Some("socket") => {}
        Some(other) => {
            return Err(format!(
                "chardev backend '{other}' is not supported (strata's monitors listen on \
                 socket chardevs)"
            ))
        }
        None => return Err("needs a backend (socket)".into()),
    }
    let id = o.take("id").ok_or("needs an 'id'")?;
    let err = |e: strata_backend::BlockError| e.to_string();
    if o.take_bool("server").map_err(err)? != Some(true) {
        return Err("strata's monitors listen: give server=on".into());
    }
    // QEMU's default wait=on would hold the daemon until a monitor client connects.
    if o.take_bool("wait").map_err(err)? != Some(false) {
        return Err(
            "give wait=off (strata serves its exports without waiting for a monitor client)".into(),
        );
    }
    let addr = match (o.take("path"), o.take("fd")) {
        (Some(path), None) => ChardevAddr::Path(PathBuf::from(path)),
        (None, Some(fd)) => ChardevAddr::Fd(
            fd.parse()
                .map_err(|_| format!("fd must be a file descriptor number, got '{fd}'"))?,
        ),
        (Some(_), Some(_)) => return Err("give path= or fd=, not both".into()),
        (None, None) => {
            return Err("needs path= (a Unix socket; TCP is not supported) or fd=".into())
        }
    };
    if let Some(key) = o.first_key() {
        return Err(format!("Invalid parameter '{key}'"));
    }
    Ok(Chardev { id, addr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn qsd_monitor_lines_are_accepted() {
        let configs = parse(
            &strings(&[
                "socket,id=m0,path=/run/m0.sock,server=on,wait=off",
                "socket,id=m1,fd=5,server=on,wait=off",
            ]),
            &strings(&["chardev=m0", "chardev=m1,pretty=on"]),
        )
        .expect("valid");
        assert_eq!(
            configs,
            [
                MonitorConfig {
                    chardev: "m0".into(),
                    addr: ChardevAddr::Path("/run/m0.sock".into()),
                    pretty: false
                },
                MonitorConfig {
                    chardev: "m1".into(),
                    addr: ChardevAddr::Fd(5),
                    pretty: true
                },
            ]
        );
    }

    #[test]
    fn what_strata_cannot_do_is_refused_by_name() {
        let refused = [
            ("socket,id=m,path=/x,server=on", "chardev=m", "wait=off"),
            (
                "socket,id=m,path=/x,server=off,wait=off",
                "chardev=m",
                "server=on",
            ),
            (
                "socket,id=m,host=h,port=1,server=on,wait=off",
                "chardev=m",
                "TCP",
            ),
            ("stdio,id=m", "chardev=m", "stdio"),
            (
                "socket,id=m,path=/x,server=on,wait=off",
                "chardev=n",
                "'n' not found",
            ),
            (
                "socket,id=m,path=/x,server=on,wait=off",
                "chardev=m,mode=readline",
                "readline",
            ),
        ];
        for (dev, mon, needle) in refused {
            let err = parse(&strings(&[dev]), &strings(&[mon])).expect_err(dev);
            assert!(err.contains(needle), "{dev} {mon}: {err}");
        }
        let err = parse(&strings(&["socket,id=m,path=/x,server=on,wait=off"]), &[]).unwrap_err();
        assert!(err.contains("no --monitor"), "{err}");
    }
}
