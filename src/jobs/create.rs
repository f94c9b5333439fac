//! The `blockdev-create` job (QEMU's block/create.c): one image created through the driver
//! registry's create hook, onto a new file or onto an open node, with progress 0 of 1 and
//! then 1 of 1. A target that could not be found or opened fails the job, not the command,
//! as in QEMU.

use std::path::PathBuf;
use std::sync::Arc;

use strata_backend::driver::{CreateRequest, CreateTarget};
use strata_backend::{registry, Node, Options};

use super::{Job, JobContext, RunError};
use crate::daemon::explain_sandbox;

/// Where the image goes.
pub enum Target {
    /// A file, created (or emptied) by the format's hook.
    File(PathBuf),
    /// An open node the image is written onto (held for the job's life).
    Node(Arc<Node>),
}

/// One `blockdev-create`.
pub struct CreateJob {
    /// The registry's name of the format (or protocol) to create.
    pub format: &'static str,
    /// Where, or why there is nowhere (the job then fails with this text).
    pub target: Result<Target, String>,
    /// Virtual size in bytes.
    pub size: u64,
    /// The hook's options (qemu-img's `-o` keys).
    pub options: Options,
    /// The sandbox's directories, to explain a refusal (None: no sandbox).
    pub sandbox_dirs: Option<Vec<PathBuf>>,
}

impl Job for CreateJob {
    fn job_type(&self) -> &'static str {
        "create"
    }

    fn run(&mut self, ctx: &JobContext) -> Result<(), RunError> {
        ctx.set_remaining(1);
        let result = self.create();
        ctx.add_progress(1);
        result.map_err(RunError::Failed)
    }
}

impl CreateJob {
    fn create(&mut self) -> Result<(), String> {
        let target = match &self.target {
            Ok(Target::File(path)) => CreateTarget::File(path),
            Ok(Target::Node(node)) => CreateTarget::Node(node),
            Err(e) => return Err(e.clone()),
        };
        let request = CreateRequest {
            target,
            size: self.size,
            options: std::mem::take(&mut self.options),
        };
        registry::create(self.format, request)
            .map(drop)
            .map_err(|e| explain_sandbox(self.sandbox_dirs.as_deref(), e.to_string()))
    }
}
