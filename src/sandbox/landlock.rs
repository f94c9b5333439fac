//! The Landlock half of the sandbox: the filesystem as far as the serving daemon needs it.
//!
//! `landlock_restrict_self` covers the calling thread and the threads it starts afterwards,
//! never threads already running (the kernel here lacks ABI 8's TSYNC), so [`restrict`]
//! refuses to run beside other threads: the daemon calls it on its main thread after its
//! exports listen and before any of them starts its thread. The exception is librbd's
//! threads (with [`Policy::librbd`]), which run from the rbd nodes' open on and stay outside
//! Landlock (see the module `sandbox`).

use std::path::Path;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};

use super::Policy;

/// The newest Landlock ABI this sandbox was written and tested for: everything it knows of
/// is handled (denied unless a rule allows it).
const ABI_HANDLED: ABI = ABI::V7;

/// Restricts the calling thread (the process's only one) and every thread it starts later to
/// `policy`. A kernel without Landlock, or with an older ABI, is a warning; the rest of the
/// sandbox (seccomp) still applies.
pub fn restrict(policy: &Policy) -> Result<(), String> {
    let threads = thread_count()?;
    if policy.librbd {
        log::info!(
            "sandbox: the {} threads librbd (and the helper that opened its images) started \
             run outside Landlock; seccomp covers them",
            threads - 1
        );
    } else if threads != 1 {
        return Err(format!(
            "the sandbox must start before any other thread, but {threads} threads run \
             (Landlock would not cover them)"
        ));
    }
    let status = ruleset(policy).map_err(|e| format!("Landlock: {e}"))?;
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => format!("ABI {}", effective_abi as i32),
        LandlockStatus::NotEnabled => "disabled at boot (lsm=)".into(),
        LandlockStatus::NotImplemented => "not built into this kernel".into(),
    };
    match status.ruleset {
        RulesetStatus::FullyEnforced => log::info!(
            "sandbox: Landlock ({abi}) limits the filesystem to the images and what is removed \
             at exit"
        ),
        RulesetStatus::PartiallyEnforced => log::warn!(
            "sandbox: this kernel has only part of Landlock ({abi}, strata handles up to ABI \
             {}): some file, network or scope restrictions are not enforced",
            ABI_HANDLED as i32
        ),
        RulesetStatus::NotEnforced => log::warn!(
            "sandbox: Landlock is not available ({abi}): the filesystem is not restricted \
             (system calls still are)"
        ),
    }
    Ok(())
}

fn ruleset(policy: &Policy) -> Result<landlock::RestrictionStatus, RulesetError> {
    let mut rules = Vec::new();
    for (image, writable) in &policy.images {
        let mut access = AccessFs::ReadFile | AccessFs::IoctlDev;
        if *writable {
            access |= AccessFs::WriteFile | AccessFs::Truncate;
        }
        rules.push((image.as_path(), access));
    }
    for file in &policy.removed_files {
        rules.push((parent(file), AccessFs::RemoveFile.into()));
    }
    for dir in &policy.removed_dirs {
        rules.push((parent(dir), AccessFs::RemoveDir.into()));
        rules.push((
            dir.as_path(),
            AccessFs::ReadDir | AccessFs::RemoveFile | AccessFs::RemoveDir,
        ));
    }
    if let Some(qmp) = &policy.qmp {
        for dir in &qmp.allowed_dirs {
            rules.push((
                dir.as_path(),
                AccessFs::ReadFile
                    // New images (blockdev-create).
                    | AccessFs::MakeReg
                    | AccessFs::WriteFile
                    | AccessFs::Truncate
                    | AccessFs::IoctlDev
                    | AccessFs::ReadDir
                    | AccessFs::MakeSock
                    | AccessFs::RemoveFile,
            ));
        }
        if let Some(dir) = &qmp.runtime_dir {
            rules.push((
                dir.as_path(),
                AccessFs::ReadDir
                    | AccessFs::MakeDir
                    | AccessFs::MakeSock
                    | AccessFs::RemoveDir
                    | AccessFs::RemoveFile,
            ));
            rules.push((parent(dir), AccessFs::RemoveDir.into()));
        }
    }
    let mut created = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI_HANDLED))?
        .handle_access(AccessNet::from_all(ABI_HANDLED))?
        .scope(Scope::from_all(ABI_HANDLED))?
        .create()?;
    for (path, access) in rules {
        created = add_rule(created, path, access)?;
    }
    created.restrict_self()
}

/// Adds a rule for `path`; a path that is gone (a snapshot overlay, already removed) needs
/// none.
fn add_rule(
    created: landlock::RulesetCreated,
    path: &Path,
    access: BitFlags<AccessFs>,
) -> Result<landlock::RulesetCreated, RulesetError> {
    match PathFd::new(path) {
        Ok(fd) => created.add_rule(PathBeneath::new(fd, access)),
        Err(e) => {
            log::debug!("sandbox: no Landlock rule for {}: {e}", path.display());
            Ok(created)
        }
    }
}

/// The directory of `path` ("." for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn thread_count() -> Result<usize, String> {
    std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .map_err(|e| format!("Could not list the process's threads in /proc/self/task: {e}"))
}
