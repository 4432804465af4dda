//! cachestore: where chunks are kept once fetched. For now the local disk store ([`disk`]);
//! the shared in-datacenter store, the replica and the common `CacheStore` trait come with
//! the cache-store work. Stores keep bytes by [`crate::chunk::ChunkKey`] and never talk to the
//! origin or know about FUSE.

pub mod disk;

pub use disk::DiskStore;
