//! orcafs: mount an S3 bucket read-only through FUSE, fetching objects lazily in
//! content-addressed chunks and caching them on local disk.
//!
//! The data path reads top to bottom: [`fs`] (FUSE adapter) → [`namespace`] (names) and
//! [`fetch`] (bytes) → [`cachestore`] and [`origin`]. [`mount`] wires them together and
//! [`cli`] is the command line;
//! [`warm`] (`orcafs warm`) fills a mount's cache by reading through it.

pub mod cachestore;
pub mod chunk;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod fetch;
pub mod fs;
pub mod metrics;
pub mod mount;
pub mod namespace;
pub mod notify;
pub mod origin;
pub mod pagebuf;
pub mod peer;
pub mod s3;
pub mod secret;
pub mod warm;
