//! The cluster module alone, over loopback: signed fill RPC, 409, streaming, short bodies, dead
//! peers, health/readiness/metrics endpoints.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use orcafs::cachestore::{ChunkStream, StoreError};
use orcafs::chunk::{ChunkKey, ObjectVersion};
use orcafs::cluster::{
    auth, serve_metrics_only, wire, Cluster, ClusterError, LocalFills, Observe, ServerHandle,
};
use orcafs::config::cluster::ClusterConfig;
use orcafs::peer::{PeerAddr, PeerError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SECRET: &str = "test-secret-6b1f0c2e9a7d";
const PIECE: usize = 64 << 10;
const CHUNK: u64 = 5 * PIECE as u64;

// ---------------------------------------------------------------- logs

/// Every log line of this test binary, to prove no credential is ever written.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        struct W;
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                logs().lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter("orcafs=trace")
            .with_writer(|| W)
            .with_ansi(false)
            .try_init();
        Mutex::new(Vec::new())
    })
}

// ---------------------------------------------------------------- fakes

/// The bytes of a chunk: a pattern that differs per chunk and per offset.
fn content(key: &ChunkKey) -> Vec<u8> {
    (0..key.len())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(key.index as u8))
        .collect()
}

/// A local fill that yields the chunk in 64 KiB pieces, one every `delay`.
#[derive(Clone)]
struct SlowFills {
    delay: Duration,
    /// Pieces produced so far, over all streams.
    produced: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    /// Fail after this many pieces.
    fail_after: Option<usize>,
}

impl SlowFills {
    fn new(delay: Duration) -> SlowFills {
        SlowFills {
            delay,
            produced: Arc::default(),
            calls: Arc::default(),
            fail_after: None,
        }
    }
}

impl LocalFills for SlowFills {
    fn stream_local(&self, key: ChunkKey) -> ChunkStream {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let data = Bytes::from(content(&key));
        let pieces: Vec<Bytes> = (0..data.len())
            .step_by(PIECE)
            .map(|at| data.slice(at..(at + PIECE).min(data.len())))
            .collect();
        let (delay, produced, fail_after) = (self.delay, self.produced.clone(), self.fail_after);
        Box::pin(
            futures::stream::iter(pieces.into_iter().enumerate()).then(move |(i, p)| {
                let produced = produced.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    if Some(i) == fail_after {
                        return Err(StoreError::Transient("origin broke".into()));
                    }
                    produced.fetch_add(1, Ordering::SeqCst);
                    Ok(p)
                }
            }),
        )
    }
}

struct TestObserve(AtomicBool);

impl Observe for TestObserve {
    fn ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn metrics_text(&self) -> String {
        "# HELP orcafs_test_total a process counter\n# TYPE orcafs_test_total counter\norcafs_test_total 7\n".into()
    }
}

fn observe(ready: bool) -> Arc<TestObserve> {
    Arc::new(TestObserve(AtomicBool::new(ready)))
}

// ---------------------------------------------------------------- setup

/// A loopback address nobody listens on right now.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn secret_file(dir: &tempfile::TempDir, name: &str, secret: &str) -> PathBuf {
    let path = dir.path().join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{secret}").unwrap();
    path
}

fn config(listen: &str, peers: &[&str], secret_file: PathBuf) -> ClusterConfig {
    ClusterConfig {
        listen: listen.parse().unwrap(),
        advertise: None,
        peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
        dns: None,
        secret_file,
        health_interval: Some(Duration::from_millis(100)),
        peer_timeout: Some(Duration::from_secs(1)),
        dns_interval: None,
    }
}

struct Host {
    cluster: Arc<Cluster>,
    server: Option<ServerHandle>,
    fills: SlowFills,
    addr: PeerAddr,
}

/// Two hosts that list each other, serving, both seen alive by both.
async fn pair(dir: &tempfile::TempDir, delay: Duration) -> (Host, Host) {
    logs();
    let (a, b) = (free_addr(), free_addr());
    let secret = secret_file(dir, "secret", SECRET);
    let mut hosts = Vec::new();
    for me in [&a, &b] {
        let cluster = Cluster::start(&config(me, &[&a, &b], secret.clone()))
            .await
            .unwrap();
        let fills = SlowFills::new(delay);
        let server = cluster
            .serve(Arc::new(fills.clone()), observe(true))
            .await
            .unwrap();
        hosts.push(Host {
            addr: PeerAddr::new(me),
            cluster,
            server: Some(server),
            fills,
        });
    }
    let b = hosts.pop().unwrap();
    let a = hosts.pop().unwrap();
    for h in [&a, &b] {
        eventually("both alive", || {
            h.cluster.peers().iter().all(|(_, alive)| *alive)
        })
        .await;
    }
    (a, b)
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn object() -> Arc<ObjectVersion> {
    Arc::new(ObjectVersion {
        origin_id: "http://127.0.0.1:9000".into(),
        bucket: "bucket".into(),
        key: "dir/a file&more=1".into(),
        etag: "\"0123abcd\"".into(),
        size: 1000 * CHUNK - 10,
    })
}

/// A chunk that `host` coordinates in everyone's view.
fn chunk_of(host: &Host, others: &[&Host]) -> ChunkKey {
    let o = object();
    (0..1000)
        .map(|i| ChunkKey::new(o.clone(), CHUNK, i))
        .find(|k| {
            host.cluster.coordinator_for(&k.id()).is_none()
                && others
                    .iter()
                    .all(|h| h.cluster.coordinator_for(&k.id()) == Some(host.addr.clone()))
        })
        .expect("some chunk is coordinated by each host")
}

fn fill_path(key: &ChunkKey) -> String {
    format!("{}?{}", wire::FILL_PATH, wire::fill_query(key))
}

struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// One HTTP/1.1 request over a fresh connection, read to the end.
async fn raw_get(addr: &str, path: &str, auth_header: Option<&str>) -> Raw {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(h) = auth_header {
        req.push_str(&format!("{}: {h}\r\n", auth::HEADER));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut all))
        .await
        .expect("response within 10s")
        .unwrap();
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    Raw {
        status,
        head,
        body: all[split + 4..].to_vec(),
    }
}

async fn collect(mut s: ChunkStream) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    while let Some(piece) = s.next().await {
        out.extend_from_slice(&piece?);
    }
    Ok(out)
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_streams_from_the_coordinator_as_it_fills() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(&dir, Duration::from_millis(150)).await;
    let key = chunk_of(&b, &[&a]);
    assert_eq!(a.cluster.coordinator_for(&key.id()), Some(b.addr.clone()));

    let mut stream = a.cluster.fetch_from_peer(&b.addr, &key).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let produced = b.fills.produced.load(Ordering::SeqCst);
    assert!(
        produced < 5,
        "the first piece arrived only after {produced} of 5 were produced: buffered, not streamed"
    );
    let mut got = first.to_vec();
    got.extend(collect(stream).await.unwrap());
    assert_eq!(got, content(&key));
    assert_eq!(b.fills.calls.load(Ordering::SeqCst), 1);
    assert_eq!(a.fills.calls.load(Ordering::SeqCst), 0);

    // The response carries the chunk's length up front.
    let signed = auth::sign(SECRET.as_bytes(), "GET", &fill_path(&key), auth::now_unix());
    let raw = raw_get(b.addr.as_str(), &fill_path(&key), Some(&signed)).await;
    assert_eq!(raw.status, 200);
    assert!(
        raw.head.contains(&format!("content-length: {CHUNK}")),
        "{}",
        raw.head
    );
    assert_eq!(raw.body, content(&key));

    let a_text = a.cluster.metrics_text();
    assert!(
        a_text.contains("orcafs_cluster_peer_fills_received_total 1"),
        "{a_text}"
    );
    assert!(a_text.contains(&format!(
        "orcafs_cluster_peer_fill_bytes_received_total {CHUNK}"
    )));
    assert!(a_text.contains("orcafs_cluster_peer_request_seconds_count 1"));
    let b_text = b.cluster.metrics_text();
    assert!(
        b_text.contains("orcafs_cluster_peer_fills_served_total 2"),
        "{b_text}"
    );
    assert!(b_text.contains("orcafs_cluster_peer_fills_serving 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_forged_or_stale_requests_get_401_and_no_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(&dir, Duration::ZERO).await;
    let key = chunk_of(&b, &[&a]);
    let path = fill_path(&key);
    let now = auth::now_unix();
    let cases = [
        ("no header", None),
        (
            "wrong secret",
            Some(auth::sign(b"another-secret-entirely", "GET", &path, now)),
        ),
        (
            "stale timestamp",
            Some(auth::sign(SECRET.as_bytes(), "GET", &path, now - 400)),
        ),
        (
            "future timestamp",
            Some(auth::sign(SECRET.as_bytes(), "GET", &path, now + 400)),
        ),
        (
            "signature of another chunk",
            Some(auth::sign(
                SECRET.as_bytes(),
                "GET",
                &path.replace("index=", "index=1"),
                now,
            )),
        ),
        ("garbage", Some("t=1,sig=zz".to_string())),
    ];
    for (what, header) in &cases {
        let raw = raw_get(b.addr.as_str(), &path, header.as_deref()).await;
        assert_eq!(raw.status, 401, "{what}");
        assert!(raw.body.is_empty(), "{what}: {} body bytes", raw.body.len());
    }
    assert_eq!(
        b.fills.calls.load(Ordering::SeqCst),
        0,
        "no fill was started"
    );

    // A host with another secret is refused, and falls back.
    let other_secret = secret_file(&dir, "other", "not-the-cluster-secret");
    let c_addr = free_addr();
    let c = Cluster::start(&config(
        &c_addr,
        &[&c_addr, a.addr.as_str(), b.addr.as_str()],
        other_secret,
    ))
    .await
    .unwrap();
    assert_eq!(
        c.fetch_from_peer(&b.addr, &key).await.err(),
        Some(PeerError::Unauthorized)
    );
    assert!(c
        .metrics_text()
        .contains("orcafs_cluster_peer_fallbacks_total{reason=\"unauthorized\"} 1"));
    let failures = cases.len() + 1;
    assert!(b.cluster.metrics_text().contains(&format!(
        "orcafs_cluster_peer_auth_failures_total {failures}"
    )));

    // The right signature works.
    let ok = auth::sign(SECRET.as_bytes(), "GET", &path, auth::now_unix());
    assert_eq!(raw_get(b.addr.as_str(), &path, Some(&ok)).await.status, 200);

    // No credential in any log line.
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(
        text.contains("refused an internal request: bad credentials"),
        "logs are captured"
    );
    assert!(!text.contains(SECRET), "the secret was logged");
    assert!(!text.contains("sig="), "a signature was logged");
    assert!(!text.contains(&ok[ok.find("sig=").unwrap() + 4..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_does_not_coordinate_answers_409() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(&dir, Duration::ZERO).await;
    // A chunk b coordinates, asked of a: a refuses and b fills it locally.
    let key = chunk_of(&b, &[&a]);
    assert_eq!(
        b.cluster.fetch_from_peer(&a.addr, &key).await.err(),
        Some(PeerError::NotCoordinator)
    );
    assert_eq!(a.fills.calls.load(Ordering::SeqCst), 0);
    assert!(a
        .cluster
        .metrics_text()
        .contains("orcafs_cluster_peer_not_coordinator_409_sent_total 1"));
    let b_text = b.cluster.metrics_text();
    assert!(b_text.contains("orcafs_cluster_peer_not_coordinator_409_received_total 1"));
    assert!(b_text.contains("orcafs_cluster_peer_fallbacks_total{reason=\"not_coordinator\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_fill_that_fails_cuts_the_peer_body() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(&dir, Duration::ZERO).await;
    // Replace a's server with one whose fills break after two pieces.
    a.server.take().unwrap().shutdown().await;
    let mut broken = SlowFills::new(Duration::from_millis(10));
    broken.fail_after = Some(2);
    let _server = a
        .cluster
        .serve(Arc::new(broken.clone()), observe(true))
        .await
        .unwrap();
    let key = chunk_of(&a, &[&b]);
    let stream = b.cluster.fetch_from_peer(&a.addr, &key).await.unwrap();
    let mut stream = stream;
    let mut got = 0;
    let err = loop {
        match stream.next().await {
            Some(Ok(p)) => got += p.len(),
            Some(Err(e)) => break e,
            None => panic!("a cut body ended without an error"),
        }
    };
    assert_eq!(got, 2 * PIECE);
    assert!(err.to_string().contains("of 327680 bytes"), "{err}");
    assert!(b
        .cluster
        .metrics_text()
        .contains("orcafs_cluster_peer_fallbacks_total{reason=\"body\"} 1"));
}

/// A fake peer that answers every request with `head` then `body`, then closes or stalls.
async fn fake_peer(head: String, body: Vec<u8>, stall: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let (head, body) = (head.clone(), body.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                while !buf.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    buf.push(byte[0]);
                }
                let _ = tcp.write_all(head.as_bytes()).await;
                let _ = tcp.write_all(&body).await;
                if stall {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_long_stalled_or_refused_answers_are_errors() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let me = free_addr();
    let mut cfg = config(&me, &[&me], secret_file(&dir, "secret", SECRET));
    cfg.peer_timeout = Some(Duration::from_millis(500));
    let cluster = Cluster::start(&cfg).await.unwrap();
    let key = ChunkKey::new(object(), CHUNK, 3);
    let len = key.len() as usize;
    let ok_head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");

    // Ends short (connection closed).
    let peer = PeerAddr::new(&fake_peer(ok_head.clone(), vec![1; len / 2], false).await);
    let err = collect(cluster.fetch_from_peer(&peer, &key).await.unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("of {len} bytes")),
        "{err}"
    );

    // Stalls after some bytes: an error within about the peer timeout.
    let peer = PeerAddr::new(&fake_peer(ok_head.clone(), vec![1; 1000], true).await);
    let started = Instant::now();
    let err = collect(cluster.fetch_from_peer(&peer, &key).await.unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Headers that never come: a timeout.
    let peer = PeerAddr::new(&fake_peer(String::new(), Vec::new(), true).await);
    let started = Instant::now();
    assert_eq!(
        cluster.fetch_from_peer(&peer, &key).await.err(),
        Some(PeerError::Timeout(Duration::from_millis(500)))
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // Wrong or missing Content-Length.
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", len - 1);
    let peer = PeerAddr::new(&fake_peer(head, vec![1; len - 1], false).await);
    assert_eq!(
        cluster.fetch_from_peer(&peer, &key).await.err(),
        Some(PeerError::BadLength {
            expected: len as u64,
            got: Some(len as u64 - 1)
        })
    );
    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_string();
    let peer = PeerAddr::new(&fake_peer(head, Vec::new(), false).await);
    assert!(matches!(
        cluster.fetch_from_peer(&peer, &key).await.err(),
        Some(PeerError::BadLength { got: None, .. })
    ));

    // 5xx.
    let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_string();
    let peer = PeerAddr::new(&fake_peer(head, Vec::new(), false).await);
    assert_eq!(
        cluster.fetch_from_peer(&peer, &key).await.err(),
        Some(PeerError::Status(503))
    );
    let text = cluster.metrics_text();
    assert!(
        text.contains("orcafs_cluster_peer_fallbacks_total{reason=\"body\"} 2"),
        "{text}"
    );
    assert!(text.contains("orcafs_cluster_peer_fallbacks_total{reason=\"timeout\"} 1"));
    assert!(text.contains("orcafs_cluster_peer_fallbacks_total{reason=\"bad_length\"} 2"));
    assert!(text.contains("orcafs_cluster_peer_fallbacks_total{reason=\"status\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_fails_fast_is_marked_dead_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b) = pair(&dir, Duration::ZERO).await;
    let key = chunk_of(&b, &[&a]);

    // b goes away: a's health check marks it dead, and a coordinates everything itself.
    b.server.take().unwrap().shutdown().await;
    eventually("b marked dead", || {
        a.cluster.peers().contains(&(b.addr.clone(), false))
    })
    .await;
    assert_eq!(a.cluster.coordinator_for(&key.id()), None);
    let started = Instant::now();
    assert!(matches!(
        a.cluster.fetch_from_peer(&b.addr, &key).await.err(),
        Some(PeerError::Connect(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));

    // b serves again: a's health check brings it back.
    let _server = b
        .cluster
        .serve(Arc::new(b.fills.clone()), observe(true))
        .await
        .unwrap();
    eventually("b alive again", || {
        a.cluster.peers().contains(&(b.addr.clone(), true))
    })
    .await;
    assert_eq!(a.cluster.coordinator_for(&key.id()), Some(b.addr.clone()));

    // A peer that never existed: dead from the first check, and a fetch fails at once.
    let me = free_addr();
    let ghost = free_addr();
    let c = Cluster::start(&config(
        &me,
        &[&me, &ghost],
        secret_file(&dir, "secret", SECRET),
    ))
    .await
    .unwrap();
    assert!(c.peers().contains(&(PeerAddr::new(&ghost), false)));
    let started = Instant::now();
    assert!(matches!(
        c.fetch_from_peer(&PeerAddr::new(&ghost), &key).await.err(),
        Some(PeerError::Connect(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(c.metrics_text().contains("orcafs_cluster_peers_alive 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_endpoints() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let me = free_addr();
    let cluster = Cluster::start(&config(&me, &[&me], secret_file(&dir, "secret", SECRET)))
        .await
        .unwrap();
    let obs = observe(false);
    let server = cluster
        .serve(Arc::new(SlowFills::new(Duration::ZERO)), obs.clone())
        .await
        .unwrap();
    assert_eq!(server.local_addr().to_string(), me);

    let r = raw_get(&me, "/healthz", None).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"ok\n"[..]));
    let r = raw_get(&me, "/readyz", None).await;
    assert_eq!(r.status, 503);
    obs.0.store(true, Ordering::SeqCst);
    assert_eq!(raw_get(&me, "/readyz", None).await.status, 200);

    let r = raw_get(&me, "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.head.contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.head
    );
    let body = String::from_utf8(r.body).unwrap();
    assert!(body.starts_with("# HELP orcafs_test_total"), "{body}");
    assert!(body.contains("orcafs_test_total 7\n"));
    for name in [
        "orcafs_cluster_peer_fills_served_total 0",
        "orcafs_cluster_peer_fills_received_total 0",
        "orcafs_cluster_peer_auth_failures_total 0",
        "orcafs_cluster_peer_not_coordinator_409_sent_total 0",
        "orcafs_cluster_peer_request_seconds_count 0",
        "orcafs_cluster_peers 1",
        "orcafs_cluster_peers_alive 1",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(!body.contains("# EOF"));
    assert_eq!(raw_get(&me, "/nope", None).await.status, 404);

    // The address is taken now.
    let err = cluster
        .serve(Arc::new(SlowFills::new(Duration::ZERO)), obs.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Bind { .. }), "{err}");
    assert!(err.to_string().contains(&me));

    // Stopped, it stops answering.
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(&me).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_only_endpoint_has_no_internal_rpc() {
    let addr = free_addr();
    let server = serve_metrics_only(&addr, observe(true)).await.unwrap();
    assert_eq!(raw_get(&addr, "/healthz", None).await.status, 200);
    assert_eq!(raw_get(&addr, "/readyz", None).await.status, 200);
    let m = raw_get(&addr, "/metrics", None).await;
    let body = String::from_utf8(m.body).unwrap();
    assert!(body.contains("orcafs_test_total 7") && !body.contains("orcafs_cluster"));
    let key = ChunkKey::new(object(), CHUNK, 0);
    let signed = auth::sign(SECRET.as_bytes(), "GET", &fill_path(&key), auth::now_unix());
    assert_eq!(
        raw_get(&addr, &fill_path(&key), Some(&signed)).await.status,
        404
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_names_resolve_to_the_peer_set_and_self_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let me = free_addr();
    let port = me.rsplit_once(':').unwrap().1;
    let mut cfg = config(&me, &[], secret_file(&dir, "secret", SECRET));
    cfg.dns = Some(format!("localhost:{port}").parse().unwrap());
    let cluster = Cluster::start(&cfg).await.unwrap();
    assert!(cluster.peer_set_known());
    assert_eq!(cluster.advertise().as_str(), me);
    let peers = cluster.peers();
    assert!(peers.contains(&(PeerAddr::new(&me), true)), "{peers:?}");
    // Alone (an IPv6 localhost, if any, listens nowhere): every chunk is ours.
    for i in 0..50 {
        let key = ChunkKey::new(object(), CHUNK, i);
        assert_eq!(cluster.coordinator_for(&key.id()), None);
    }
}
