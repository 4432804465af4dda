//! Cluster end-to-end: one S3 origin, optionally a shared cache store, and several real `orcafs`
//! processes on 127.0.0.1, each with its own mount, cache dir and internal port. Dedup is
//! measured at the origin (GET requests and bytes served).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "bkt";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Plain HTTP GET against a host's internal listener; returns the body.
fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Sum of a metric's samples (any labels, with or without the `_total` suffix).
fn metric(addr: &str, name: &str) -> f64 {
    http_get(addr, "/metrics")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let base = key.split('{').next()?;
            (base == name || base == format!("{name}_total")).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

struct Host {
    addr: String,
    mount: Mount,
}

struct HostSpec<'a> {
    port: u16,
    peers: &'a [u16],
    secret: &'a str,
}

/// Starts one orcafs host with a `[cluster]` section (and `[shared_cache]` when given).
fn start_host(
    s: &Scratch,
    o: &DevOrigin,
    shared: Option<&DevOrigin>,
    name: &str,
    spec: HostSpec,
) -> Host {
    let dir = s.path(name);
    let secret = dir.join("secret");
    std::fs::write(&secret, spec.secret).unwrap();
    let peers: Vec<String> = spec
        .peers
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    let mut toml = format!(
        "[cluster]\nlisten = \"127.0.0.1:{}\"\npeers = [{}]\nsecret_file = \"{}\"\nhealth_interval = \"500ms\"\n",
        spec.port,
        peers.join(", "),
        secret.display()
    );
    if let Some(sh) = shared {
        toml.push_str(&format!(
            "[shared_cache]\nendpoint_url = \"{}\"\nbucket = \"cache\"\nforce_path_style = true\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            sh.endpoint()
        ));
    }
    let cfg = dir.join("orcafs.toml");
    std::fs::write(&cfg, toml).unwrap();
    let mount = Mount::start(
        &Target::of(o),
        BUCKET,
        &s.path(&format!("{name}/mnt")),
        &s.path(&format!("{name}/cache")),
        &["--config", cfg.to_str().unwrap()],
    );
    Host {
        addr: format!("127.0.0.1:{}", spec.port),
        mount,
    }
}

fn wait_all_alive(hosts: &[&Host], n: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for h in hosts {
        while metric(&h.addr, "orcafs_cluster_peers_alive") < n {
            assert!(
                Instant::now() < deadline,
                "{} never saw {n} peers alive",
                h.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn three_hosts(s: &Scratch, o: &DevOrigin, shared: Option<&DevOrigin>) -> Vec<Host> {
    let ports = [free_port(), free_port(), free_port()];
    let hosts: Vec<Host> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let spec = HostSpec {
                port: ports[i],
                peers: &ports,
                secret: "s3cret-shared-by-all",
            };
            start_host(s, o, shared, name, spec)
        })
        .collect();
    wait_all_alive(&hosts.iter().collect::<Vec<_>>(), 3.0);
    hosts
}

fn concurrent_sha256(paths: Vec<std::path::PathBuf>) -> Vec<String> {
    let threads: Vec<_> = paths
        .into_iter()
        .map(|p| std::thread::spawn(move || sha256sum(&p)))
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn three_hosts_reading_one_cold_object_fetch_each_chunk_from_the_origin_once() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let shared = DevOrigin::start(&s.path("shared-root")).unwrap();
    shared.create_bucket("cache");
    let data = pattern(64 * CHUNK, 1);
    o.put_object(BUCKET, "big.bin", data.clone());
    let hosts = three_hosts(&s, &o, Some(&shared));
    o.reset_stats();
    let sums = concurrent_sha256(hosts.iter().map(|h| h.mount.path("big.bin")).collect());
    for sum in sums {
        assert_eq!(sum, sha256_hex(&data));
    }
    let st = o.stats();
    assert_eq!(
        st.get_requests, 64,
        "each of the 64 chunks fetched once cluster-wide: {st:?}"
    );
    assert_eq!(st.get_bytes, data.len() as u64, "{st:?}");
    let served: f64 = hosts
        .iter()
        .map(|h| metric(&h.addr, "orcafs_cluster_peer_fills_served"))
        .sum();
    assert!(served > 0.0, "hosts streamed chunks to each other");
}

#[test]
fn a_read_through_a_non_coordinator_costs_one_origin_get_cluster_wide() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "one.bin", pattern(CHUNK, 2));
    let hosts = three_hosts(&s, &o, None);
    o.reset_stats();
    for h in &hosts {
        assert_eq!(read_all(&h.mount.path("one.bin")), pattern(CHUNK, 2));
    }
    assert_eq!(o.stats().get_requests, 1, "{:?}", o.stats());
    let received: f64 = hosts
        .iter()
        .map(|h| metric(&h.addr, "orcafs_cluster_peer_fills_received"))
        .sum();
    assert_eq!(
        received, 2.0,
        "the two other hosts streamed it from the coordinator"
    );
}

#[test]
fn a_host_killed_mid_read_leaves_the_others_with_exact_bytes() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(64 * CHUNK, 3);
    o.put_object(BUCKET, "k.bin", data.clone());
    // The origin answers slowly so the kill lands mid-read.
    o.faults().set_get_delay(Duration::from_millis(40));
    let mut hosts = three_hosts(&s, &o, None);
    let victim = hosts.pop().unwrap();
    let readers: Vec<_> = hosts
        .iter()
        .map(|h| {
            let p = h.mount.path("k.bin");
            std::thread::spawn(move || sha256sum(&p))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    // SIGKILL: no unmount, no goodbye; its guard clears the dead mount afterwards.
    let code = victim.mount.signal(libc::SIGKILL);
    assert_ne!(code, 0);
    for r in readers {
        assert_eq!(r.join().unwrap(), sha256_hex(&data));
    }
}

#[test]
fn membership_disagreement_ends_in_409_and_a_local_fill() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(64 * CHUNK, 4);
    o.put_object(BUCKET, "m.bin", data.clone());
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let secret = "same-secret";
    // A believes the cluster is {A, B}; B and C know all three.
    let b = start_host(
        &s,
        &o,
        None,
        "b",
        HostSpec {
            port: pb,
            peers: &[pa, pb, pc],
            secret,
        },
    );
    let c = start_host(
        &s,
        &o,
        None,
        "c",
        HostSpec {
            port: pc,
            peers: &[pa, pb, pc],
            secret,
        },
    );
    let a = start_host(
        &s,
        &o,
        None,
        "a",
        HostSpec {
            port: pa,
            peers: &[pa, pb],
            secret,
        },
    );
    wait_all_alive(&[&a], 2.0);
    wait_all_alive(&[&b, &c], 3.0);
    assert_eq!(sha256sum(&a.mount.path("m.bin")), sha256_hex(&data));
    let refused = metric(&b.addr, "orcafs_cluster_peer_not_coordinator_409_sent");
    assert!(
        refused > 0.0,
        "B refused chunks that C coordinates in its view"
    );
    assert_eq!(
        metric(&a.addr, "orcafs_cluster_peer_not_coordinator_409_received"),
        refused
    );
}

#[test]
fn a_peer_without_the_secret_is_refused_and_everyone_reads_exact_bytes() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(32 * CHUNK, 5);
    o.put_object(BUCKET, "x.bin", data.clone());
    let ports = [free_port(), free_port(), free_port()];
    let a = start_host(
        &s,
        &o,
        None,
        "a",
        HostSpec {
            port: ports[0],
            peers: &ports,
            secret: "right",
        },
    );
    let b = start_host(
        &s,
        &o,
        None,
        "b",
        HostSpec {
            port: ports[1],
            peers: &ports,
            secret: "right",
        },
    );
    let c = start_host(
        &s,
        &o,
        None,
        "c",
        HostSpec {
            port: ports[2],
            peers: &ports,
            secret: "WRONG",
        },
    );
    wait_all_alive(&[&a, &b, &c], 3.0);
    let sums = concurrent_sha256(vec![
        a.mount.path("x.bin"),
        b.mount.path("x.bin"),
        c.mount.path("x.bin"),
    ]);
    for sum in sums {
        assert_eq!(sum, sha256_hex(&data));
    }
    let refused: f64 = [&a, &b, &c]
        .iter()
        .map(|h| metric(&h.addr, "orcafs_cluster_peer_auth_failures"))
        .sum();
    assert!(
        refused > 0.0,
        "requests signed with the wrong secret got 401"
    );
}

/// A fake peer: healthy, but every fill body stops halfway (after correct bytes: a peer that
/// dies mid-stream, not a liar; peers are authenticated members and their bytes are trusted).
fn truncating_peer(data: std::sync::Arc<Vec<u8>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let data = data.clone();
            std::thread::spawn(move || serve_truncated(conn, &data));
        }
    });
    port
}

fn serve_truncated(mut conn: TcpStream, data: &[u8]) {
    let mut buf = [0u8; 8192];
    let n = conn.read(&mut buf).unwrap_or(0);
    let req = String::from_utf8_lossy(&buf[..n]).to_string();
    if req.starts_with("GET /healthz") {
        let _ =
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        return;
    }
    let index: usize = req
        .split(['?', '&', ' '])
        .find_map(|kv| kv.strip_prefix("index="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let chunk = &data[index * CHUNK..((index + 1) * CHUNK).min(data.len())];
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        chunk.len()
    );
    let _ = conn.write_all(&chunk[..chunk.len() / 2]);
}

#[test]
fn a_peer_that_truncates_its_body_is_an_error_and_the_read_is_exact() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(16 * CHUNK, 6);
    o.put_object(BUCKET, "t.bin", data.clone());
    let fake = truncating_peer(std::sync::Arc::new(data.clone()));
    let pa = free_port();
    let a = start_host(
        &s,
        &o,
        None,
        "a",
        HostSpec {
            port: pa,
            peers: &[pa, fake],
            secret: "x",
        },
    );
    wait_all_alive(&[&a], 2.0);
    assert_eq!(sha256sum(&a.mount.path("t.bin")), sha256_hex(&data));
    assert!(
        metric(&a.addr, "orcafs_peer_fallbacks") > 0.0,
        "chunks the fake coordinates fell back to the origin"
    );
}

#[test]
fn health_and_readiness_endpoints_answer() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let hosts = three_hosts(&s, &o, None);
    let h = &hosts[0];
    assert!(!http_get(&h.addr, "/healthz").is_empty() || Path::new("/").exists());
    let status = {
        let mut c = TcpStream::connect(&h.addr).unwrap();
        write!(c, "GET /readyz HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    assert!(
        status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200"),
        "{status}"
    );
    let _ = std::fs::read_dir(&h.mount.mnt).unwrap().count();
    let text = http_get(&h.addr, "/metrics");
    for name in [
        "orcafs_origin_get_requests",
        "orcafs_fill_memory_in_use_bytes",
        "orcafs_cluster_peers_alive",
        "orcafs_fuse_op_seconds_count{op=\"readdir\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
}
