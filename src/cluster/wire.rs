//! wire: the fill request as it travels between hosts: its path, and the chunk key in its query.
//!
//! Owns [`FILL_PATH`], [`fill_query`] and [`parse_fill_query`], the membership announcements
//! ([`HELLO_PATH`], [`BYE_PATH`]) and the sender's name ([`from_query`]), public so that tests
//! build a request exactly as the client does. Both sides of every host must agree on it. Must not touch
//! HTTP, the signature (`auth`) or the peer set.

use std::sync::Arc;

use crate::chunk::{ChunkKey, ObjectVersion};
use crate::peer::PeerAddr;

/// The path of the internal fill RPC.
pub const FILL_PATH: &str = "/internal/fill";
/// A member announcing that it has started (or restarted) and serves.
pub const HELLO_PATH: &str = "/internal/hello";
/// A member announcing that it stops cleanly.
pub const BYE_PATH: &str = "/internal/bye";
/// A metadata query (a LIST page, a HEAD) to the host that coordinates its name.
pub const META_PATH: &str = "/internal/meta";

/// The query string of a metadata request: the query itself (opaque here) and the sender.
pub fn meta_query(query: &str, me: &PeerAddr) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("q", query)
        .append_pair("from", me.as_str())
        .finish()
}

/// The metadata query a request carries.
pub fn parse_meta_query(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "q")
        .map(|(_, v)| v.into_owned())
}

/// The query naming the member that sends a request (`from=<host:port>`): signed with the rest
/// of the request, so an authenticated request is also proof that this member is alive.
pub fn from_query(me: &PeerAddr) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("from", me.as_str())
        .finish()
}

/// The sender a request's query names, if it names one.
pub fn parse_from(query: &str) -> Option<PeerAddr> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "from")
        .map(|(_, v)| PeerAddr::new(&v))
}

/// The query string of a fill request: every chunk key field.
pub fn fill_query(key: &ChunkKey) -> String {
    let o = &key.object;
    form_urlencoded::Serializer::new(String::new())
        .append_pair("origin_id", &o.origin_id)
        .append_pair("bucket", &o.bucket)
        .append_pair("key", &o.key)
        .append_pair("etag", &o.etag)
        .append_pair("chunk_size", &key.chunk_size.to_string())
        .append_pair("index", &key.index.to_string())
        .append_pair("object_size", &o.size.to_string())
        .finish()
}

/// Rebuilds the chunk key from a fill request's query; None unless every field is there once
/// and the chunk is a non-empty part of the object.
pub fn parse_fill_query(query: &str) -> Option<ChunkKey> {
    let mut fields: [Option<String>; 7] = Default::default();
    const NAMES: [&str; 7] = [
        "origin_id",
        "bucket",
        "key",
        "etag",
        "chunk_size",
        "index",
        "object_size",
    ];
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == "from" {
            continue;
        }
        let i = NAMES.iter().position(|n| *n == name)?;
        if fields[i].replace(value.into_owned()).is_some() {
            return None;
        }
    }
    let [origin_id, bucket, key, etag, chunk_size, index, object_size] = fields;
    let chunk_size: u64 = chunk_size?.parse().ok()?;
    let index: u64 = index?.parse().ok()?;
    let size: u64 = object_size?.parse().ok()?;
    if chunk_size == 0 || index.checked_mul(chunk_size)? >= size {
        return None;
    }
    let object = Arc::new(ObjectVersion {
        origin_id: origin_id?.into(),
        bucket: bucket?.into(),
        key: key?.into(),
        etag: etag?.into(),
        size,
    });
    Some(ChunkKey::new(object, chunk_size, index))
}
