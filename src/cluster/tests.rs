use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use tokio::time::Instant;

use super::membership::{system_resolver, Resolver};
use super::wire::{fill_query, parse_fill_query};
use super::*;
use crate::chunk::{ChunkId, ChunkKey, ObjectVersion};
use crate::config::de::HostPort;

fn id(n: u64) -> ChunkId {
    let object = Arc::new(ObjectVersion {
        origin_id: "o".into(),
        bucket: "b".into(),
        key: format!("file-{}", n / 7).into(),
        etag: "e".into(),
        size: 1 << 40,
    });
    ChunkKey::new(object, 1 << 20, n % 7).id()
}

fn addrs(n: usize) -> Vec<PeerAddr> {
    (0..n)
        .map(|i| PeerAddr::new(&format!("10.0.0.{}:7420", i + 1)))
        .collect()
}

#[test]
fn rendezvous_is_balanced() {
    const CHUNKS: u64 = 8_000;
    let ids: Vec<ChunkId> = (0..CHUNKS).map(id).collect();
    for n in 3..=5 {
        let peers = addrs(n);
        let mut counts: HashMap<&PeerAddr, u64> = HashMap::new();
        for id in &ids {
            *counts.entry(rendezvous(&peers, id).unwrap()).or_default() += 1;
        }
        assert_eq!(counts.len(), n);
        let mean = CHUNKS as f64 / n as f64;
        for (p, count) in counts {
            let off = (count as f64 - mean).abs() / mean;
            assert!(off < 0.08, "{p}: {count} chunks, mean {mean} ({n} peers)");
        }
    }
}

#[test]
fn removing_a_peer_moves_only_its_chunks() {
    let peers = addrs(5);
    let gone = &peers[2];
    let rest: Vec<PeerAddr> = peers.iter().filter(|p| *p != gone).cloned().collect();
    let ids: Vec<ChunkId> = (0..4_000).map(id).collect();
    let mut moved = 0;
    for (c, id) in ids.iter().enumerate() {
        let before = rendezvous(&peers, id).unwrap();
        let after = rendezvous(&rest, id).unwrap();
        if before == gone {
            moved += 1;
        } else {
            assert_eq!(before, after, "chunk {c} moved between surviving peers");
        }
    }
    assert!((600..1_000).contains(&moved), "{moved}");
}

#[test]
fn rendezvous_depends_only_on_names() {
    let peers = addrs(4);
    let mut reversed = peers.clone();
    reversed.reverse();
    for c in 0..1000 {
        assert_eq!(rendezvous(&peers, &id(c)), rendezvous(&reversed, &id(c)));
    }
    assert_eq!(rendezvous(&[], &id(0)), None);
    // IP literals are canonical, so hosts that spell them differently agree.
    assert_eq!(
        PeerAddr::new(" 10.0.0.1:7420 "),
        PeerAddr::new("10.0.0.1:7420")
    );
    assert_eq!(
        PeerAddr::new("[0:0:0:0:0:0:0:1]:7420"),
        PeerAddr::new("[::1]:7420")
    );
    assert_eq!(PeerAddr::new("Host.Example:1").as_str(), "host.example:1");
}

#[test]
fn fill_query_round_trips_every_field() {
    let object = Arc::new(ObjectVersion {
        origin_id: "http://127.0.0.1:9000".into(),
        bucket: "bucket.one".into(),
        key: "dir/a b&c=d?e#f%20/ünï/+plus".into(),
        etag: "\"abc-3\"".into(),
        size: 25,
    });
    let key = ChunkKey::new(object, 10, 2);
    let back = parse_fill_query(&fill_query(&key)).unwrap();
    assert_eq!(back, key);
    assert_eq!(back.id(), key.id());
    assert_eq!(back.len(), 5);

    let q = fill_query(&key);
    // Out of range, zero chunk size, missing, duplicated or unknown fields are refused.
    assert!(parse_fill_query(&q.replace("index=2", "index=3")).is_none());
    assert!(parse_fill_query(&q.replace("chunk_size=10", "chunk_size=0")).is_none());
    assert!(parse_fill_query(&q.replace("index=2", "index=x")).is_none());
    assert!(parse_fill_query(&q.replace("&index=2", "")).is_none());
    assert!(parse_fill_query(&format!("{q}&index=1")).is_none());
    assert!(parse_fill_query(&format!("{q}&extra=1")).is_none());
    assert!(parse_fill_query(&q.replace("index=2", "index=18446744073709551615")).is_none());
}

fn secret_file(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("secret");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

fn hp(text: &str) -> HostPort {
    text.parse().unwrap()
}

fn config(secret_file: PathBuf) -> ClusterConfig {
    ClusterConfig {
        listen: hp("127.0.0.1:1"),
        advertise: None,
        peers: vec![hp("127.0.0.1:1")],
        dns: None,
        secret_file,
        health_interval: None,
        peer_timeout: None,
        dns_interval: None,
        tls_cert: None,
        tls_key: None,
        tls_ca: None,
        tls_server_name: None,
        max_connections: None,
    }
}

#[tokio::test]
async fn bad_configs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let good = secret_file(&dir, "0123456789abcdef\n");
    let err =
        |cfg: ClusterConfig| async move { Cluster::start(&cfg).await.unwrap_err().to_string() };

    let mut c = config(dir.path().join("missing"));
    let e = err(c.clone()).await;
    assert!(e.contains("secret file") && e.contains("missing"), "{e}");
    c.secret_file = secret_file(&dir, " \n");
    assert!(err(c.clone()).await.contains("is empty"));

    let mut c = config(good.clone());
    c.dns = Some(hp("orcafs.internal:7420"));
    assert!(err(c.clone()).await.contains("not both"));
    c.peers.clear();
    c.dns = None;
    assert!(err(c.clone()).await.contains("`peers = ["));
    // (Each value's form is checked when the config is parsed: see `config::cluster`.)
    let mut c = config(good.clone());
    c.listen = hp("0.0.0.0:7420");
    assert!(err(c).await.contains("advertise"));

    // The secret never shows in Debug output.
    let c = config(secret_file(&dir, "very-secret-value-123"));
    let cluster = Cluster::start(&c).await.unwrap();
    assert!(!format!("{cluster:?}").contains("very-secret"));
    assert!(!format!("{:?}", cluster.secret).contains("very-secret"));
}

/// A resolver answering from a table the test changes.
fn table_resolver(table: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>) -> Resolver {
    Arc::new(move |name: String| {
        let answer = table.lock().unwrap().get(&name).cloned();
        async move {
            answer.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
        }
        .boxed()
    })
}

fn fast_tuning() -> Tuning {
    Tuning {
        health_interval: Duration::from_millis(100),
        health_timeout: Duration::from_millis(100),
        peer_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(100),
        dns_interval: Duration::from_millis(50),
        dns_grace: Duration::from_millis(400),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn dns_failures_keep_the_last_set_then_fall_back_to_self() {
    let dir = tempfile::tempdir().unwrap();
    let table = Arc::new(Mutex::new(HashMap::new()));
    table.lock().unwrap().insert(
        "peers.test:7420".to_string(),
        vec![sa("127.0.0.1:7420"), sa("127.0.0.9:7420")],
    );
    let mut cfg = config(secret_file(&dir, "0123456789abcdef"));
    cfg.listen = hp("127.0.0.1:7420");
    cfg.peers.clear();
    cfg.dns = Some(hp("peers.test:7420"));
    let cluster = Cluster::start_with(&cfg, fast_tuning(), table_resolver(table.clone()))
        .await
        .unwrap();
    assert!(cluster.peer_set_known());
    let names = |c: &Cluster| {
        c.peers()
            .into_iter()
            .map(|(p, _)| p.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&cluster), ["127.0.0.1:7420", "127.0.0.9:7420"]);
    assert_eq!(cluster.advertise().as_str(), "127.0.0.1:7420");

    // The name stops resolving: the set stays for the grace period, then only self is left.
    table.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(names(&cluster).len(), 2, "kept within the grace period");
    eventually("self only", || names(&cluster) == ["127.0.0.1:7420"]).await;
    assert!(cluster.peer_set_known());
    assert!(cluster
        .metrics_text()
        .contains("orcafs_cluster_dns_failures_total"));

    // It resolves again, to a new set that does not list this host: self is kept.
    table
        .lock()
        .unwrap()
        .insert("peers.test:7420".to_string(), vec![sa("127.0.0.8:7420")]);
    eventually("new set", || {
        names(&cluster) == ["127.0.0.1:7420", "127.0.0.8:7420"]
    })
    .await;
}

#[tokio::test]
async fn dns_mode_names_this_host_by_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let table = Arc::new(Mutex::new(HashMap::new()));
    table.lock().unwrap().insert(
        "me.test:7420".to_string(),
        vec![sa("[::1]:7420"), sa("127.0.0.5:7420")],
    );
    table.lock().unwrap().insert(
        "peers.test:7420".to_string(),
        vec![sa("127.0.0.5:7420"), sa("[::1]:7420"), sa("127.0.0.6:7420")],
    );
    let mut cfg = config(secret_file(&dir, "0123456789abcdef"));
    cfg.listen = hp("0.0.0.0:7420");
    cfg.advertise = Some(hp("me.test:7420"));
    cfg.peers.clear();
    cfg.dns = Some(hp("peers.test:7420"));
    let cluster = Cluster::start_with(&cfg, fast_tuning(), table_resolver(table.clone()))
        .await
        .unwrap();
    assert_eq!(cluster.advertise().as_str(), "127.0.0.5:7420");
    let peers = cluster.peers();
    // Both of our addresses are self (alive, never asked); the third is a peer.
    assert!(
        peers.contains(&(PeerAddr::new("127.0.0.5:7420"), true)),
        "{peers:?}"
    );
    assert!(
        peers.contains(&(PeerAddr::new("[::1]:7420"), true)),
        "{peers:?}"
    );
    assert!(
        peers.contains(&(PeerAddr::new("127.0.0.6:7420"), false)),
        "{peers:?}"
    );
    for c in 0..100 {
        assert_eq!(cluster.coordinator_for(&id(c)), None);
    }

    cfg.advertise = Some(hp("unknown.test:7420"));
    let err = Cluster::start_with(&cfg, fast_tuning(), table_resolver(table))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not resolve"), "{err}");
}

#[tokio::test]
async fn dns_unknown_at_start_is_not_ready_until_resolved_or_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let table = Arc::new(Mutex::new(HashMap::new()));
    let mut cfg = config(secret_file(&dir, "0123456789abcdef"));
    cfg.listen = hp("127.0.0.1:7420");
    cfg.peers.clear();
    cfg.dns = Some(hp("peers.test:7420"));
    let cluster = Cluster::start_with(&cfg, fast_tuning(), table_resolver(table.clone()))
        .await
        .unwrap();
    assert!(!cluster.peer_set_known());
    assert_eq!(cluster.coordinator_for(&id(1)), None, "self only meanwhile");
    eventually("decided self only", || cluster.peer_set_known()).await;
}

#[tokio::test]
async fn self_is_recognised_by_name_and_peers_start_dead_until_checked() {
    let dir = tempfile::tempdir().unwrap();
    let table = Arc::new(Mutex::new(HashMap::new()));
    table
        .lock()
        .unwrap()
        .insert("me.test:7420".to_string(), vec![sa("127.0.0.1:7420")]);
    let mut cfg = config(secret_file(&dir, "0123456789abcdef"));
    cfg.listen = hp("127.0.0.1:7420");
    // Nothing listens on 127.0.0.1:9: that peer is dead from the first check on.
    cfg.peers = vec![hp("me.test:7420"), hp("127.0.0.1:9")];
    let cluster = Cluster::start_with(&cfg, fast_tuning(), table_resolver(table))
        .await
        .unwrap();
    // This host hashes under the name the others use for it.
    assert_eq!(cluster.advertise().as_str(), "me.test:7420");
    assert_eq!(
        cluster.peers(),
        vec![
            (PeerAddr::new("me.test:7420"), true),
            (PeerAddr::new("127.0.0.1:9"), false)
        ]
    );
    for c in 0..200 {
        assert_eq!(cluster.coordinator_for(&id(c)), None);
    }
    let text = cluster.metrics_text();
    assert!(text.contains("orcafs_cluster_peers 2"), "{text}");
    assert!(text.contains("orcafs_cluster_peers_alive 1"), "{text}");
}

#[tokio::test]
async fn coordinator_skips_dead_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(secret_file(&dir, "0123456789abcdef"));
    cfg.listen = hp("127.0.0.1:7420");
    cfg.peers = vec![hp("127.0.0.1:7420"), hp("127.0.0.1:9"), hp("127.0.0.1:11")];
    let cluster = Cluster::start_with(&cfg, fast_tuning(), system_resolver())
        .await
        .unwrap();
    // Pretend both peers are alive: chunks spread over three.
    cluster.set_alive(&PeerAddr::new("127.0.0.1:9"), true);
    cluster.set_alive(&PeerAddr::new("127.0.0.1:11"), true);
    let all: Vec<PeerAddr> = cluster.peers().into_iter().map(|(p, _)| p).collect();
    let mut remote = 0;
    for c in 0..300 {
        let expect = rendezvous(&all, &id(c)).unwrap();
        match cluster.coordinator_for(&id(c)) {
            None => assert_eq!(expect, cluster.advertise()),
            Some(p) => {
                remote += 1;
                assert_eq!(&p, expect)
            }
        }
    }
    assert!(remote > 100);
    cluster.set_alive(&PeerAddr::new("127.0.0.1:9"), false);
    for c in 0..300 {
        assert_ne!(
            cluster.coordinator_for(&id(c)),
            Some(PeerAddr::new("127.0.0.1:9"))
        );
    }
    // Self can't be marked dead.
    cluster.set_alive(&PeerAddr::new("127.0.0.1:7420"), false);
    assert!(cluster.peers()[0].1);
}
