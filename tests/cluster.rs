//! Cluster end-to-end: one S3 origin, optionally a shared cache store, and several real `orcafs`
//! processes on 127.0.0.1, each with its own mount, cache dir and internal TLS port. Dedup is
//! measured at the origin (GET requests and bytes served).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "bkt";

/// GET over TLS against a host's internal listener, as a scraper does; returns the body.
fn http_get(addr: &str, path: &str) -> String {
    https_get(addr, path)
        .split_once("\r\n\r\n")
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

/// How often hosts health-check each other in these tests (the default is 2s).
const HEALTH_INTERVAL: &str = "500ms";

/// Starts one orcafs host with a `[cluster]` section (and `[shared_cache]` when given).
fn start_host(
    s: &Scratch,
    o: &DevOrigin,
    shared: Option<&DevOrigin>,
    name: &str,
    spec: HostSpec,
) -> Host {
    start_host_checking_every(s, o, shared, name, spec, HEALTH_INTERVAL)
}

fn start_host_checking_every(
    s: &Scratch,
    o: &DevOrigin,
    shared: Option<&DevOrigin>,
    name: &str,
    spec: HostSpec,
    health_interval: &str,
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
        "[cluster]\nlisten = \"127.0.0.1:{}\"\npeers = [{}]\nsecret_file = \"{}\"\nhealth_interval = \"{health_interval}\"\n",
        spec.port,
        peers.join(", "),
        secret.display()
    );
    if let Some(sh) = shared {
        // A fixed 200 ms patience with the store: these tests count origin requests, and a
        // loaded machine can be later than the adaptive 50 ms.
        toml.push_str(&format!(
            "[shared_cache]\nendpoint_url = \"{}\"\nbucket = \"cache\"\nforce_path_style = true\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\nfirst_byte_floor = \"200ms\"\n",
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
                secret: "s3cret-shared-by-all-hosts",
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

/// `n` hosts started together (no waiting for one before the next), with health checks too rare
/// to matter: their views can only agree through the announcements.
fn hosts_started_together(s: &Scratch, o: &DevOrigin, n: usize) -> Vec<Host> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    std::thread::scope(|scope| {
        let started: Vec<_> = (0..n)
            .map(|i| {
                let ports = &ports;
                scope.spawn(move || {
                    let spec = HostSpec {
                        port: ports[i],
                        peers: ports,
                        secret: "started-together-secret-123",
                    };
                    start_host_checking_every(s, o, None, &format!("h{i}"), spec, "1h")
                })
            })
            .collect();
        started.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

fn hosts_started_together_read_each_chunk_from_the_origin_once(n: usize) {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(32 * CHUNK, 9);
    o.put_object(BUCKET, "cold.bin", data.clone());
    let hosts = hosts_started_together(&s, &o, n);
    // Read at once, within half a second of the last mount: no health round has run.
    o.reset_stats();
    let sums = concurrent_sha256(hosts.iter().map(|h| h.mount.path("cold.bin")).collect());
    for sum in sums {
        assert_eq!(sum, sha256_hex(&data));
    }
    let st = o.stats();
    assert_eq!(
        st.get_bytes,
        data.len() as u64,
        "{n} hosts started together: each byte from the origin once: {st:?}"
    );
    for h in &hosts {
        assert_eq!(metric(&h.addr, "orcafs_cluster_peers_alive"), n as f64);
    }
}

#[test]
fn three_hosts_started_together_read_each_chunk_from_the_origin_once() {
    hosts_started_together_read_each_chunk_from_the_origin_once(3);
}

#[test]
fn five_hosts_started_together_read_each_chunk_from_the_origin_once() {
    hosts_started_together_read_each_chunk_from_the_origin_once(5);
}

#[test]
fn a_host_that_stops_cleanly_leaves_the_others_views_at_once() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let mut hosts = hosts_started_together(&s, &o, 3);
    let gone = hosts.pop().unwrap();
    assert_eq!(gone.mount.unmount(), 0);
    for h in &hosts {
        assert_eq!(
            metric(&h.addr, "orcafs_cluster_peers_alive"),
            2.0,
            "the leaver announced it: no health round needed"
        );
    }
    // And the two left still read everything once between them.
    let data = pattern(8 * CHUNK, 10);
    o.put_object(BUCKET, "after.bin", data.clone());
    o.reset_stats();
    let sums = concurrent_sha256(hosts.iter().map(|h| h.mount.path("after.bin")).collect());
    assert!(sums.iter().all(|x| *x == sha256_hex(&data)));
    assert_eq!(o.stats().get_bytes, data.len() as u64);
}

#[test]
fn hosts_listing_one_prefix_together_list_each_page_from_the_origin_once() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    for i in 0..2500 {
        o.put_object(BUCKET, &format!("d/f{i:05}"), b"x".to_vec());
    }
    let hosts = hosts_started_together(&s, &o, 3);
    o.reset_stats();
    let counts: Vec<usize> = std::thread::scope(|scope| {
        let listers: Vec<_> = hosts
            .iter()
            .map(|h| {
                let dir = h.mount.path("d");
                scope.spawn(move || std::fs::read_dir(dir).unwrap().count())
            })
            .collect();
        listers.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(counts, [2500, 2500, 2500]);
    let st = o.stats();
    // 3 pages for the whole fleet (the lookup of `d` asks the same first page).
    assert!(
        st.list_requests <= 3,
        "each LIST page once for three hosts: {st:?}"
    );
    // HEADs are not counted here: the lookups' HEAD of `d` goes through one coordinator whose
    // request is not cancelled when a lookup drops it, and s3s-fs answers HEAD of a "directory"
    // key with a 500 that the SDK retries in the background (S3 answers 404). That HEADs are
    // asked once per fleet is pinned by origin::fleet's unit test.

    // The coordinator of the listing dies: the others list it from the origin, no error.
    let mut hosts = hosts;
    let killed = hosts.remove(0);
    drop(killed);
    std::thread::sleep(Duration::from_millis(1100));
    o.put_object(BUCKET, "d/new", b"n".to_vec());
    for h in &hosts {
        let names: Vec<_> = std::fs::read_dir(h.mount.path("d")).unwrap().collect();
        assert!(names.len() >= 2500);
    }
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
    let secret = "the-same-secret-everywhere";
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
            secret: "the-right-cluster-secret",
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
            secret: "the-right-cluster-secret",
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
            secret: "WRONG-WRONG-WRONG-WRONG",
        },
    );
    // c's identity is derived from another secret: a and b never finish a handshake with it,
    // nor it with them. Each side sees the other as dead and reads from the origin.
    wait_all_alive(&[&a, &b], 2.0);
    wait_all_alive(&[&c], 1.0);
    let sums = concurrent_sha256(vec![
        a.mount.path("x.bin"),
        b.mount.path("x.bin"),
        c.mount.path("x.bin"),
    ]);
    for sum in sums {
        assert_eq!(sum, sha256_hex(&data));
    }
    assert!(
        metric(&c.addr, "orcafs_cluster_peer_tls_failures") > 0.0,
        "c refused the identity of a and b"
    );
    let refused: f64 = [&a, &b]
        .iter()
        .map(|h| metric(&h.addr, "orcafs_cluster_inbound_tls_failures"))
        .sum();
    assert!(refused > 0.0, "a and b saw c's handshakes fail");
    assert_eq!(
        metric(&c.addr, "orcafs_cluster_peer_fill_bytes_received"),
        0.0
    );
}

/// How a fake peer behaves.
#[derive(Clone, Copy)]
enum Fake {
    /// A member (the secret's identity and proof) whose fill bodies stop halfway, after correct
    /// bytes: a peer that dies mid-stream, not a liar.
    Truncating(&'static str),
    /// No secret: a self-signed certificate, and 200 with the right number of garbage bytes.
    Impostor,
}

/// A fake peer on a fresh port, speaking TLS.
fn fake_peer(data: std::sync::Arc<Vec<u8>>, fake: Fake) -> u16 {
    let config = match fake {
        Fake::Truncating(secret) => orcafs::cluster::derived_tls(secret.as_bytes()).unwrap().0,
        Fake::Impostor => self_signed_server(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (data, config) = (data.clone(), config.clone());
            std::thread::spawn(move || {
                let Ok(tls) = rustls::ServerConnection::new(config) else {
                    return;
                };
                serve_fake(rustls::StreamOwned::new(tls, conn), &data, fake);
            });
        }
    });
    port
}

fn self_signed_server() -> std::sync::Arc<rustls::ServerConfig> {
    let ck = rcgen::generate_simple_self_signed(vec![orcafs::cluster::DERIVED_SERVER_NAME.into()])
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap(),
    )
}

fn serve_fake(mut conn: impl Read + Write, data: &[u8], fake: Fake) {
    let mut buf = [0u8; 8192];
    let n = conn.read(&mut buf).unwrap_or(0);
    let req = String::from_utf8_lossy(&buf[..n]).to_string();
    if req.starts_with("GET /healthz") {
        let _ =
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        let _ = conn.flush();
        return;
    }
    let index: usize = req
        .split(['?', '&', ' '])
        .find_map(|kv| kv.strip_prefix("index="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let chunk = &data[index * CHUNK..((index + 1) * CHUNK).min(data.len())];
    let proof = match fake {
        Fake::Truncating(secret) => {
            let signature = req
                .lines()
                .find_map(|l| l.strip_prefix("x-orcafs-auth: "))
                .unwrap_or_default();
            let proof = orcafs::cluster::auth::response_proof(secret.as_bytes(), signature);
            format!("x-orcafs-proof: {proof}\r\n")
        }
        Fake::Impostor => String::new(),
    };
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\n{proof}Content-Length: {}\r\nConnection: close\r\n\r\n",
        chunk.len()
    );
    let _ = match fake {
        Fake::Truncating(_) => conn.write_all(&chunk[..chunk.len() / 2]),
        Fake::Impostor => conn.write_all(&vec![0xEE; chunk.len()]),
    };
    let _ = conn.flush();
}

#[test]
fn a_peer_that_truncates_its_body_is_an_error_and_the_read_is_exact() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(16 * CHUNK, 6);
    o.put_object(BUCKET, "t.bin", data.clone());
    let secret = "a-secret-the-fake-peer-knows";
    let fake = fake_peer(std::sync::Arc::new(data.clone()), Fake::Truncating(secret));
    let pa = free_port();
    let a = start_host(
        &s,
        &o,
        None,
        "a",
        HostSpec {
            port: pa,
            peers: &[pa, fake],
            secret,
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
fn an_impostor_at_a_members_address_never_serves_a_byte() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let data = pattern(16 * CHUNK, 7);
    o.put_object(BUCKET, "i.bin", data.clone());
    let fake = fake_peer(std::sync::Arc::new(data.clone()), Fake::Impostor);
    let pa = free_port();
    let a = start_host(
        &s,
        &o,
        None,
        "a",
        HostSpec {
            port: pa,
            peers: &[pa, fake],
            secret: "the-secret-the-impostor-lacks",
        },
    );
    // Its health checks fail in the handshake: it is never alive, never asked for a chunk.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&a.addr, "orcafs_cluster_peer_tls_failures") < 2.0 {
        assert!(Instant::now() < deadline, "no TLS failure counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&a.addr, "orcafs_cluster_peers_alive"), 1.0);
    o.reset_stats();
    assert_eq!(sha256sum(&a.mount.path("i.bin")), sha256_hex(&data));
    assert_eq!(
        o.stats().get_requests,
        16,
        "every chunk came from the origin"
    );
    assert_eq!(
        metric(&a.addr, "orcafs_cluster_peer_fill_bytes_received"),
        0.0
    );
}

#[test]
fn health_and_readiness_endpoints_answer() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let hosts = three_hosts(&s, &o, None);
    let h = &hosts[0];
    assert_eq!(http_get(&h.addr, "/healthz"), "ok\n");
    let status = https_get(&h.addr, "/readyz");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // The listener speaks TLS only: plain HTTP gets no HTTP answer.
    let plain = {
        let mut c = TcpStream::connect(&h.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "GET /readyz HTTP/1.0\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    };
    assert!(!plain.starts_with(b"HTTP/"), "{plain:?}");
    let _ = std::fs::read_dir(&h.mount.mnt).unwrap().count();
    let text = http_get(&h.addr, "/metrics");
    for name in [
        "orcafs_origin_get_requests",
        "orcafs_fill_memory_in_use_bytes",
        "orcafs_cluster_peers_alive",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    // The first batch of a listing is READDIRPLUS, later ones plain READDIR (the kernel picks).
    assert!(
        text.contains("orcafs_fuse_op_seconds_count{op=\"readdirplus\"}")
            || text.contains("orcafs_fuse_op_seconds_count{op=\"readdir\"}"),
        "no directory read latency in /metrics:\n{text}"
    );
}
