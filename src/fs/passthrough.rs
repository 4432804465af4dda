//! passthrough: which open inodes the kernel reads itself (FUSE passthrough, Linux 6.9+), and
//! the backing files it reads.
//!
//! The kernel wants every open of an inode in one mode while any is open: all passthrough, with
//! one backing file, or all through orcafs; an open in the other mode fails with EIO. So an
//! inode's mode is chosen at the open that finds it closed and kept until its last release. An
//! inode (one object version) is read by passthrough when the local cache holds all of it; the
//! cache hands the file out only once every block of it was checked (by this process, or by an
//! earlier one whose stamp still matches the file), and keeps it pinned (never evicted) while
//! the kernel has it. Owns no I/O beyond the backing-file ioctls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::{BackingId, ReplyOpen};

use crate::cachestore::LocalFile;
use crate::metrics::Metrics;

pub struct Passthrough {
    /// Wanted by the configuration, offered by the kernel, and allowed (the first refused
    /// backing-file ioctl turns it off for the mount's life).
    on: AtomicBool,
    inodes: Mutex<HashMap<u64, InodeIo>>,
    metrics: Arc<Metrics>,
}

/// The open handles of one inode and how the kernel reads them.
struct InodeIo {
    opens: usize,
    /// Some: passthrough, with this backing file.
    backing: Option<Arc<BackingId>>,
    /// The cache's file and pin, held while the kernel reads it.
    _local: Option<LocalFile>,
}

impl InodeIo {
    /// How a further open of this inode is answered: the same way as the open ones.
    fn mode(&self) -> Mode {
        match &self.backing {
            Some(b) => Mode::Backing(b.clone()),
            None => Mode::Orcafs,
        }
    }
}

/// How an open of an inode is answered.
pub enum Mode {
    /// Through orcafs's read handler.
    Orcafs,
    /// By the kernel from this backing file.
    Backing(Arc<BackingId>),
}

impl Passthrough {
    pub fn new(wanted: bool, metrics: Arc<Metrics>) -> Passthrough {
        // SAFETY: geteuid cannot fail. Registering a backing file needs CAP_SYS_ADMIN.
        let root = unsafe { libc::geteuid() } == 0;
        if wanted && !root {
            tracing::info!("not running as root: cached objects are read through orcafs (FUSE passthrough needs CAP_SYS_ADMIN)");
        }
        Passthrough {
            on: AtomicBool::new(wanted && root),
            inodes: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub fn turn_off(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    fn inodes(&self) -> MutexGuard<'_, HashMap<u64, InodeIo>> {
        self.inodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the mode of an inode that is open; None when it is not (the caller decides).
    pub fn join(&self, ino: u64) -> Option<Mode> {
        let mut inodes = self.inodes();
        let io = inodes.get_mut(&ino)?;
        io.opens += 1;
        Some(io.mode())
    }

    /// Registers an open read through orcafs (joining the inode's mode if it got one meanwhile).
    pub fn open_through_orcafs(&self, ino: u64) -> Mode {
        let mut inodes = self.inodes();
        let io = inodes.entry(ino).or_insert(InodeIo {
            opens: 0,
            backing: None,
            _local: None,
        });
        io.opens += 1;
        io.mode()
    }

    /// Registers a passthrough open of `local`, unless the inode got a mode meanwhile (then
    /// joins it). A refused registration turns passthrough off and answers through orcafs.
    pub fn open_backing(&self, ino: u64, local: LocalFile, reply: &ReplyOpen) -> Mode {
        let mut inodes = self.inodes();
        if let Some(io) = inodes.get_mut(&ino) {
            io.opens += 1;
            return io.mode();
        }
        let (backing, mode) = match reply.open_backing(&local.file) {
            Ok(id) => {
                let id = Arc::new(id);
                (Some(id.clone()), Mode::Backing(id))
            }
            Err(e) => {
                self.turn_off();
                tracing::warn!(error = %e, "the kernel refused a backing file: FUSE passthrough is off for this mount");
                (None, Mode::Orcafs)
            }
        };
        let local = backing.as_ref().map(|_| local);
        inodes.insert(
            ino,
            InodeIo {
                opens: 1,
                backing,
                _local: local,
            },
        );
        mode
    }

    /// Counts an open answered with passthrough.
    pub fn count_open(&self) {
        Metrics::inc(&self.metrics.passthrough_opens);
    }

    /// A handle of `ino` was released; its last release lets the backing file and pin go.
    pub fn release(&self, ino: u64) {
        let mut inodes = self.inodes();
        if let Some(io) = inodes.get_mut(&ino) {
            io.opens = io.opens.saturating_sub(1);
            if io.opens == 0 {
                inodes.remove(&ino);
            }
        }
    }
}
