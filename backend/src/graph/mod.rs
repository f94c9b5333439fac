//! The node graph: the named nodes of one daemon, adding, finding, listing and removing them.
//! How a node is opened from options is [`open`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::driver::BackingPolicy;
use crate::error::{BlockError, Result};
use crate::flags::keys;
use crate::io::executor::block_on;
use crate::node::{Node, NodeInfo};
use crate::options::Options;

mod open;

pub use open::SNAPSHOT;

/// Stack of the thread that opens a node: enough for a backing chain of
/// [`MAX_BACKING_CHAIN`](crate::driver::MAX_BACKING_CHAIN) images in an unoptimised build.
const OPENER_STACK: usize = 64 << 20;

/// The set of nodes of one daemon.
#[derive(Default)]
pub struct Graph {
    inner: Mutex<Inner>,
    /// Which backing files images may name.
    backing_policy: BackingPolicy,
}

#[derive(Default)]
struct Inner {
    /// Every live node by name; a node leaves when its last holder drops it.
    nodes: BTreeMap<String, Weak<Node>>,
    /// Nodes added by the user (`--blockdev`, blockdev-add), kept until `blockdev_del`.
    owned: BTreeMap<String, Arc<Node>>,
}

impl Graph {
    /// An empty graph with the default backing-file policy (see [`BackingPolicy`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty graph whose images may name the backing files `policy` allows.
    pub fn with_backing_policy(policy: BackingPolicy) -> Self {
        Graph {
            inner: Mutex::default(),
            backing_policy: policy,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under this lock is a single map operation, so a poisoned lock is
        // still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a node the user defined (QSD's `--blockdev`, QMP's `blockdev-add`). It needs a
    /// node-name, and lives until [`blockdev_del`](Self::blockdev_del).
    pub fn blockdev_add(&self, options: Options) -> Result<Arc<Node>> {
        if !options.contains(keys::NODE_NAME) {
            return Err(BlockError::invalid("--blockdev needs a 'node-name'"));
        }
        let node = self.open(options)?;
        self.lock()
            .owned
            .insert(node.name().to_string(), node.clone());
        Ok(node)
    }

    /// Opens a node the caller holds; it is closed when the last reference goes.
    ///
    /// The caller (a control thread, never a queue's worker) waits while an opener thread
    /// does the I/O that opening needs (headers, probing). Opening recurses once per image
    /// of a backing chain, so that thread gets a stack for the deepest chain allowed, whatever
    /// the caller's own stack.
    pub fn open(&self, options: Options) -> Result<Arc<Node>> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("strata-open".into())
                .stack_size(OPENER_STACK)
                .spawn_scoped(scope, || block_on(self.open_node(options, None))?)
                .map_err(|e| BlockError::io(&e, "Could not start a thread to open the node"))?
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Opens an image file: the format is given, or probed (with a warning for raw).
    pub fn open_image(
        &self,
        filename: &str,
        format: Option<&str>,
        read_only: bool,
    ) -> Result<Arc<Node>> {
        let mut options = Options::new();
        options.set("file.filename", filename);
        if let Some(format) = format {
            options.set(keys::DRIVER, format);
        }
        if read_only {
            options.set(keys::READ_ONLY, "on");
        }
        self.open(options)
    }

    /// The live node with this name.
    pub fn find(&self, name: &str) -> Option<Arc<Node>> {
        self.lock().nodes.get(name).and_then(Weak::upgrade)
    }

    /// Removes a user-added node that nothing else uses (QMP's `blockdev-del`).
    pub fn blockdev_del(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let Some(node) = inner.owned.get(name) else {
            return Err(BlockError::invalid(
                match inner.nodes.get(name).and_then(Weak::upgrade) {
                    Some(_) => format!("Node '{name}' is not owned by the monitor"),
                    None => format!("Failed to find node with node-name='{name}'"),
                },
            ));
        };
        // One reference is `owned`'s own.
        if Arc::strong_count(node) > 1 {
            let parents = node.parents();
            return Err(BlockError::new(
                libc::EBUSY,
                if parents.is_empty() {
                    format!("Node '{name}' is in use (by an export)")
                } else {
                    let names: Vec<String> = parents.into_iter().map(|(_, p)| p).collect();
                    format!("Node '{name}' is in use by node(s) {}", names.join(", "))
                },
            ));
        }
        inner.owned.remove(name);
        inner.nodes.remove(name);
        Ok(())
    }

    /// Every live node, sorted by name.
    pub fn query(&self) -> Vec<NodeInfo> {
        self.nodes().iter().map(|n| n.info()).collect()
    }

    /// Every live node, sorted by name.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock()
            .nodes
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn check_unused(&self, name: &str) -> Result<()> {
        if self.find(name).is_some() {
            return Err(BlockError::invalid(format!("Duplicate node name '{name}'")));
        }
        Ok(())
    }
}
