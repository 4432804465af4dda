//! rendezvous: which peer coordinates a chunk, by highest random weight hashing of the chunk id.
//!
//! Owns the weight function: every host must hash the same bytes for a (peer, chunk) pair, so
//! changing it splits the fleet's view during a rolling upgrade. Must not touch the peer set or
//! health (`membership` decides who is alive and calls in here).

use sha2::{Digest as _, Sha256};

use crate::chunk::ChunkId;
use crate::peer::PeerAddr;

/// The rendezvous weight of `peer` for chunk `id`: the first 8 bytes of
/// SHA-256(len(peer) ‖ peer ‖ id).
pub fn weight(peer: &PeerAddr, id: &ChunkId) -> u64 {
    weigh(&peer_hasher(peer), id)
}

/// The SHA-256 state after the peer's part of the input, kept per member so that weighing a
/// chunk costs one short hash per peer.
pub(super) fn peer_hasher(peer: &PeerAddr) -> Sha256 {
    let mut h = Sha256::new();
    h.update((peer.as_str().len() as u64).to_le_bytes());
    h.update(peer.as_str().as_bytes());
    h
}

/// The weight of chunk `id` for the peer whose [`peer_hasher`] is `prefix`.
pub(super) fn weigh(prefix: &Sha256, id: &ChunkId) -> u64 {
    let mut h = prefix.clone();
    h.update(id.0);
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The peer with the highest weight for `id` (ties broken by address); None for no peers.
pub fn rendezvous<'a, I>(peers: I, id: &ChunkId) -> Option<&'a PeerAddr>
where
    I: IntoIterator<Item = &'a PeerAddr>,
{
    peers
        .into_iter()
        .map(|p| (weight(p, id), p))
        .max()
        .map(|(_, p)| p)
}
