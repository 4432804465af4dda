//! The cluster module alone, over loopback: signed fill RPC over TLS, 409, streaming, short
//! bodies, dead peers, impostors at a member's address, replays, refused keys, the connection
//! cap, operator certificates, health/readiness/metrics endpoints.

mod common;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::free_addr;
use futures::StreamExt as _;
use orcafs::cachestore::memory::MemoryStore;
use orcafs::cachestore::CacheStore as _;
use orcafs::cachestore::{ChunkStream, StoreError};
use orcafs::chunk::{ChunkKey, ObjectVersion};
use orcafs::cluster::{
    auth, derived_tls, serve_metrics_only, wire, Cluster, ClusterError, LocalFills, Observe,
    ServerHandle, DERIVED_SERVER_NAME,
};
use orcafs::config::cluster::ClusterConfig;
use orcafs::fetch::{FetchPolicy, Fetcher, Peers};
use orcafs::metrics::Metrics;
use orcafs::origin::fault::FaultOrigin;
use orcafs::peer::{PeerAddr, PeerError};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

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
    fn chunk_size(&self) -> u64 {
        CHUNK
    }

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
        tls_cert: None,
        tls_key: None,
        tls_ca: None,
        tls_server_name: None,
        max_connections: None,
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

/// A client that checks the server holds the secret-derived identity of `secret`, as members do.
fn member_client(secret: &str) -> Arc<rustls::ClientConfig> {
    derived_tls(secret.as_bytes()).unwrap().1
}

async fn tls_connect(
    addr: &str,
    client: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(DERIVED_SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
}

/// One HTTP/1.1 request over a fresh TLS connection checked as a member checks it, read to the
/// end.
async fn raw_get(addr: &str, path: &str, auth_header: Option<&str>) -> Raw {
    raw_get_with(member_client(SECRET), addr, path, auth_header).await
}

async fn raw_get_with(
    client: Arc<rustls::ClientConfig>,
    addr: &str,
    path: &str,
    auth_header: Option<&str>,
) -> Raw {
    let tls = tls_connect(addr, client).await.unwrap();
    raw_exchange(tls, addr, path, auth_header).await
}

async fn raw_exchange(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    addr: &str,
    path: &str,
    auth_header: Option<&str>,
) -> Raw {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(h) = auth_header {
        req.push_str(&format!("{}: {h}\r\n", auth::HEADER));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    // A TLS peer may close without close_notify after `Connection: close`: keep what came.
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut all))
        .await
        .expect("response within 10s");
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

/// One plain HTTP/1.1 request (the metrics-only listener), read to the end.
async fn raw_get_plain(addr: &str, path: &str, auth_header: Option<&str>) -> Raw {
    let tcp = TcpStream::connect(addr).await.unwrap();
    raw_exchange(tcp, addr, path, auth_header).await
}

/// A metric's value in a text exposition (0 when absent).
fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
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
    let proof = auth::response_proof(SECRET.as_bytes(), &signed);
    assert!(
        raw.head
            .contains(&format!("{}: {proof}", auth::PROOF_HEADER)),
        "a 200 proves the secret: {}",
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

    // A host with another secret does not accept b's identity (derived from the secret), so it
    // reads nothing from b and falls back; b sees a failed handshake, no request.
    let other_secret = secret_file(&dir, "other", "not-the-cluster-secret");
    let c_addr = free_addr();
    let c = Cluster::start(&config(
        &c_addr,
        &[&c_addr, a.addr.as_str(), b.addr.as_str()],
        other_secret,
    ))
    .await
    .unwrap();
    assert!(matches!(
        c.fetch_from_peer(&b.addr, &key).await.err(),
        Some(PeerError::Tls(_))
    ));
    assert!(c
        .metrics_text()
        .contains("orcafs_cluster_peer_fallbacks_total{reason=\"tls\"} 1"));
    let b_text = b.cluster.metrics_text();
    assert!(
        b_text.contains(&format!(
            "orcafs_cluster_peer_auth_failures_total {}",
            cases.len()
        )),
        "{b_text}"
    );
    assert!(metric_value(&b_text, "orcafs_cluster_inbound_tls_failures_total") >= 1.0);

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

/// How a fake peer presents itself.
#[derive(Clone)]
enum Face {
    /// Plain TCP, answering as soon as any byte arrives (without waiting for a request).
    Plain,
    /// TLS with this server config; when given a secret, its 200 carries that secret's proof.
    Tls(Arc<rustls::ServerConfig>, Option<&'static str>),
}

/// A member as far as TLS and the secret go, answering whatever the test says.
fn member_face() -> Face {
    Face::Tls(derived_tls(SECRET.as_bytes()).unwrap().0, Some(SECRET))
}

/// A TLS server config for a self-signed certificate (any name) that no secret derived.
fn self_signed_face() -> Face {
    let ck = rcgen::generate_simple_self_signed(vec![DERIVED_SERVER_NAME.into()]).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![ck.cert.der().clone()],
        PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap(),
    )
    .unwrap();
    Face::Tls(Arc::new(config), None)
}

/// A fake peer that answers every request with `head` then `body`, then closes or stalls.
async fn fake_peer(face: Face, head: String, body: Vec<u8>, stall: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (face, head, body) = (face.clone(), head.clone(), body.clone());
            tokio::spawn(async move {
                match face {
                    Face::Plain => answer(tcp, head, body, stall, None, true).await,
                    Face::Tls(config, proof) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(config);
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            answer(tls, head, body, stall, proof, false).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Reads a request head (or, `eager`, any first bytes), then writes `head` (with the proof of
/// `proof_secret` for the request's signature) and `body`.
async fn answer(
    mut io: impl AsyncRead + AsyncWrite + Unpin,
    head: String,
    body: Vec<u8>,
    stall: bool,
    proof_secret: Option<&str>,
    eager: bool,
) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !(request.ends_with(b"\r\n\r\n") || eager && !request.is_empty()) {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let mut head = head;
    if let (Some(secret), Some((status_line, rest))) = (proof_secret, head.split_once("\r\n")) {
        let request = String::from_utf8_lossy(&request).into_owned();
        let signature = request
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{}: ", auth::HEADER)))
            .unwrap_or_default();
        let proof = auth::response_proof(secret.as_bytes(), signature);
        head = format!("{status_line}\r\n{}: {proof}\r\n{rest}", auth::PROOF_HEADER);
    }
    let _ = io.write_all(head.as_bytes()).await;
    let _ = io.write_all(&body).await;
    let _ = io.flush().await;
    if stall {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
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

    let fake =
        |head: String, body: Vec<u8>, stall: bool| fake_peer(member_face(), head, body, stall);

    // Ends short (connection closed).
    let peer = PeerAddr::new(&fake(ok_head.clone(), vec![1; len / 2], false).await);
    let err = collect(cluster.fetch_from_peer(&peer, &key).await.unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("of {len} bytes")),
        "{err}"
    );

    // Stalls after some bytes: an error within about the peer timeout.
    let peer = PeerAddr::new(&fake(ok_head.clone(), vec![1; 1000], true).await);
    let started = Instant::now();
    let err = collect(cluster.fetch_from_peer(&peer, &key).await.unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Headers that never come: a timeout.
    let peer = PeerAddr::new(&fake(String::new(), Vec::new(), true).await);
    let started = Instant::now();
    assert_eq!(
        cluster.fetch_from_peer(&peer, &key).await.err(),
        Some(PeerError::Timeout(Duration::from_millis(500)))
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // Wrong or missing Content-Length.
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", len - 1);
    let peer = PeerAddr::new(&fake(head, vec![1; len - 1], false).await);
    assert_eq!(
        cluster.fetch_from_peer(&peer, &key).await.err(),
        Some(PeerError::BadLength {
            expected: len as u64,
            got: Some(len as u64 - 1)
        })
    );
    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_string();
    let peer = PeerAddr::new(&fake(head, Vec::new(), false).await);
    assert!(matches!(
        cluster.fetch_from_peer(&peer, &key).await.err(),
        Some(PeerError::BadLength { got: None, .. })
    ));

    // 5xx.
    let head = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_string();
    let peer = PeerAddr::new(&fake(head, Vec::new(), false).await);
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

    // A scraper without the secret reaches /metrics over TLS, as `curl -k` does.
    let r = raw_get_with(common::insecure_tls_client(), &me, "/metrics", None).await;
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
        "orcafs_cluster_peer_replays_refused_total 0",
        "orcafs_cluster_peer_tls_failures_total 0",
        "orcafs_cluster_inbound_tls_failures_total 0",
        "orcafs_cluster_connections_refused_total 0",
        "orcafs_cluster_connections 1",
        "orcafs_cluster_peers 1",
        "orcafs_cluster_peers_alive 1",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(!body.contains("# EOF"));
    assert_eq!(raw_get(&me, "/nope", None).await.status, 404);

    // Plain HTTP gets no HTTP answer: the listener speaks TLS only.
    let mut tcp = TcpStream::connect(&me).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    eventually("the failed handshake is counted", || {
        cluster
            .metrics_text()
            .contains("orcafs_cluster_inbound_tls_failures_total 1")
    })
    .await;

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
    assert_eq!(raw_get_plain(&addr, "/healthz", None).await.status, 200);
    assert_eq!(raw_get_plain(&addr, "/readyz", None).await.status, 200);
    let m = raw_get_plain(&addr, "/metrics", None).await;
    let body = String::from_utf8(m.body).unwrap();
    assert!(body.contains("orcafs_test_total 7") && !body.contains("orcafs_cluster"));
    let key = ChunkKey::new(object(), CHUNK, 0);
    let signed = auth::sign(SECRET.as_bytes(), "GET", &fill_path(&key), auth::now_unix());
    assert_eq!(
        raw_get_plain(&addr, &fill_path(&key), Some(&signed))
            .await
            .status,
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

// ---------------------------------------------------------------- trust

/// `fetch` asks `peer` for every chunk, as a host does whose coordinator's name now leads to it
/// (a spoofed DNS answer, a reused IP).
struct AlwaysAsk {
    cluster: Arc<Cluster>,
    peer: PeerAddr,
}

#[async_trait::async_trait]
impl Peers for AlwaysAsk {
    fn coordinator_for(&self, _: &ChunkKey) -> Option<PeerAddr> {
        Some(self.peer.clone())
    }

    async fn fetch(&self, peer: &PeerAddr, key: &ChunkKey) -> Result<ChunkStream, PeerError> {
        self.cluster.fetch_from_peer(peer, key).await
    }
}

fn fetch_policy() -> FetchPolicy {
    FetchPolicy {
        chunk_size: CHUNK,
        max_attempts: 4,
        retry_time: Duration::from_secs(60),
        stall_timeout: Duration::from_secs(2),
        queue_timeout: Duration::from_secs(10),
        max_origin_requests: 16,
        readahead_chunks: 0,
        readahead_max_chunks: 0,
        memory_limit: 64 * CHUNK,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_at_a_members_address_never_gets_its_bytes_to_a_reader_or_a_cache() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let me = free_addr();
    let origin = Arc::new(FaultOrigin::new("bkt"));
    let data: Bytes = (0..3 * CHUNK)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let etag = origin.put("obj", data.clone());
    let object = Arc::new(ObjectVersion {
        origin_id: "fault".into(),
        bucket: "bkt".into(),
        key: "obj".into(),
        etag: etag.into(),
        size: 3 * CHUNK,
    });
    // It knows no secret and answers every request with 200 and the right number of bytes.
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {CHUNK}\r\n\r\n");
    let garbage = vec![0xEE; CHUNK as usize];
    for (what, face) in [
        ("plain HTTP", Face::Plain),
        ("TLS with a self-signed certificate", self_signed_face()),
    ] {
        let impostor = PeerAddr::new(&fake_peer(face, head.clone(), garbage.clone(), false).await);
        let cfg = config(
            &me,
            &[&me, impostor.as_str()],
            secret_file(&dir, "secret", SECRET),
        );
        let cluster = Cluster::start(&cfg).await.unwrap();
        let store = Arc::new(MemoryStore::new(1 << 30));
        let fetch = Fetcher::new(
            origin.clone(),
            store.clone(),
            fetch_policy(),
            Arc::new(Metrics::default()),
        );
        fetch.set_peers(Arc::new(AlwaysAsk {
            cluster: cluster.clone(),
            peer: impostor.clone(),
        }));
        let gets = origin.gets();

        let got = fetch.read_object(&object, 0, 3 * CHUNK).await.unwrap();
        assert!(got == data, "{what}: the reader got the origin's bytes");
        assert_eq!(
            origin.gets() - gets,
            3,
            "{what}: every chunk came from the origin"
        );
        eventually("commits done", || fetch.fills_in_flight() == 0).await;
        for index in 0..3 {
            let key = ChunkKey::new(object.clone(), CHUNK, index);
            let stream = store.get_chunk(&key, 0, CHUNK).await.unwrap();
            let cached = collect(stream.expect("committed")).await.unwrap();
            let at = (index * CHUNK) as usize;
            assert!(
                cached[..] == data[at..at + CHUNK as usize],
                "{what}: the cache holds the origin's bytes"
            );
        }
        let text = cluster.metrics_text();
        let sample = "orcafs_cluster_peer_fallbacks_total{reason=\"tls\"}";
        assert_eq!(metric_value(&text, sample), 3.0, "{what}: {text}");
        assert!(metric_value(&text, "orcafs_cluster_peer_tls_failures_total") >= 3.0);
        assert_eq!(
            metric_value(&text, "orcafs_cluster_peer_fill_bytes_received_total"),
            0.0
        );
        // Its health checks fail the same way: the cluster never picks it as a coordinator.
        assert!(
            cluster.peers().contains(&(impostor.clone(), false)),
            "{what}"
        );
    }
}

/// A TCP proxy to `target` that keeps a copy of every byte it passes, both ways.
async fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&target).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, record.clone()));
            tokio::spawn(pump(sr, cw, record.clone()));
        }
    });
    (addr, seen)
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    record: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        record.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_streams_over_tls_and_nothing_is_readable_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(&dir, Duration::ZERO).await;
    let key = chunk_of(&b, &[&a]);
    let (proxy, wire) = recording_proxy(b.addr.to_string()).await;
    let stream = a
        .cluster
        .fetch_from_peer(&PeerAddr::new(&proxy), &key)
        .await
        .unwrap();
    assert_eq!(collect(stream).await.unwrap(), content(&key));
    let wire = wire.lock().unwrap().clone();
    assert!(wire.len() as u64 > CHUNK, "{} bytes passed", wire.len());
    assert!(
        !find(&wire, &content(&key)[1000..1064]),
        "chunk bytes in clear"
    );
    assert!(!find(&wire, wire::FILL_PATH.as_bytes()), "request in clear");
    assert!(!find(&wire, auth::HEADER.as_bytes()), "signature in clear");
    // Both ends show the same secret-derived identity.
    assert_eq!(a.cluster.tls_fingerprint(), b.cluster.tls_fingerprint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_request_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(&dir, Duration::ZERO).await;
    let key = chunk_of(&b, &[&a]);
    let path = fill_path(&key);
    let now = auth::now_unix();
    let signed = auth::sign(SECRET.as_bytes(), "GET", &path, now);
    assert_eq!(
        raw_get(b.addr.as_str(), &path, Some(&signed)).await.status,
        200
    );
    let again = raw_get(b.addr.as_str(), &path, Some(&signed)).await;
    assert_eq!(again.status, 401, "the same signature twice");
    assert!(again.body.is_empty());
    assert_eq!(b.fills.calls.load(Ordering::SeqCst), 1, "one fill only");
    let text = b.cluster.metrics_text();
    assert!(
        text.contains("orcafs_cluster_peer_replays_refused_total 1"),
        "{text}"
    );
    assert!(
        text.contains("orcafs_cluster_peer_auth_failures_total 1"),
        "{text}"
    );
    // Another request for the same chunk in the same second is no replay.
    let fresh = auth::sign(SECRET.as_bytes(), "GET", &path, now);
    assert_eq!(
        raw_get(b.addr.as_str(), &path, Some(&fresh)).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_requests_for_another_chunk_size_or_an_absurd_object_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = pair(&dir, Duration::ZERO).await;
    let huge = Arc::new(ObjectVersion {
        size: 6 << 40,
        ..(*object()).clone()
    });
    let other_size = ChunkKey::new(object(), 2 * CHUNK, 0);
    let out_of_range =
        fill_path(&ChunkKey::new(object(), CHUNK, 0)).replace("index=0", "index=1000");
    for (what, path, says) in [
        (
            "another chunk size",
            fill_path(&other_size),
            "not this host's",
        ),
        (
            "an object larger than S3 holds",
            fill_path(&ChunkKey::new(huge, CHUNK, 0)),
            "larger than any S3 object",
        ),
        (
            "a chunk past the object's end",
            out_of_range,
            "bad chunk key",
        ),
    ] {
        let signed = auth::sign(SECRET.as_bytes(), "GET", &path, auth::now_unix());
        let r = raw_get(b.addr.as_str(), &path, Some(&signed)).await;
        assert_eq!(r.status, 400, "{what}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains(says), "{what}: {body}");
    }
    assert_eq!(
        b.fills.calls.load(Ordering::SeqCst),
        0,
        "no fill was started"
    );
    let text = b.cluster.metrics_text();
    for reason in ["chunk_size", "object_size", "bad_key"] {
        let sample = format!("orcafs_cluster_fill_requests_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric_value(&text, &sample), 1.0, "{reason}: {text}");
    }
    // A host of another chunk size is refused through the client too, and fills locally.
    assert_eq!(
        a.cluster.fetch_from_peer(&b.addr, &other_size).await.err(),
        Some(PeerError::Status(400))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let me = free_addr();
    let mut cfg = config(&me, &[&me], secret_file(&dir, "secret", SECRET));
    cfg.max_connections = Some(2);
    let cluster = Cluster::start(&cfg).await.unwrap();
    let _server = cluster
        .serve(Arc::new(SlowFills::new(Duration::ZERO)), observe(true))
        .await
        .unwrap();
    let held = [
        tls_connect(&me, member_client(SECRET)).await.unwrap(),
        tls_connect(&me, member_client(SECRET)).await.unwrap(),
    ];
    let gauge = |n| {
        let cluster = cluster.clone();
        move || metric_value(&cluster.metrics_text(), "orcafs_cluster_connections") == n
    };
    eventually("two connections held", gauge(2.0)).await;
    // The third is closed at once: its handshake never completes.
    assert!(tls_connect(&me, member_client(SECRET)).await.is_err());
    assert!(cluster
        .metrics_text()
        .contains("orcafs_cluster_connections_refused_total 1"));
    // One closes: a slot is free again.
    drop(held);
    eventually("connections closed", gauge(0.0)).await;
    assert_eq!(raw_get(&me, "/healthz", None).await.status, 200);
}

// ---------------------------------------------------------------- operator certificates

/// A test CA: its issuer and the path of its PEM certificate.
fn make_ca(
    dir: &tempfile::TempDir,
    name: &str,
) -> (rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, PathBuf) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let issuer =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let path = dir.path().join(format!("{name}.pem"));
    std::fs::write(&path, issuer.pem()).unwrap();
    (issuer, path)
}

/// A certificate for `names` signed by `ca`: (cert path, key path, server config presenting it).
fn make_leaf(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    names: &[&str],
    dir: &tempfile::TempDir,
    name: &str,
) -> (PathBuf, PathBuf, Arc<rustls::ServerConfig>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    let (cert_path, key_path) = (
        dir.path().join(format!("{name}.pem")),
        dir.path().join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    (cert_path, key_path, Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificates_are_verified_against_their_ca_and_the_secret_still_counts() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (ca, ca_pem) = make_ca(&dir, "fleet-ca");
    // Peers are named by IP: without tls_server_name, that IP is the name checked.
    let (cert, key, _) = make_leaf(&ca, &["127.0.0.1"], &dir, "member");
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let secret = secret_file(&dir, "secret", SECRET);
    let with_certs = |me: &str| {
        let mut c = config(me, &[&a_addr, &b_addr], secret.clone());
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.tls_ca = Some(ca_pem.clone());
        c
    };
    let a = Cluster::start(&with_certs(&a_addr)).await.unwrap();
    let b = Cluster::start(&with_certs(&b_addr)).await.unwrap();
    let fills = SlowFills::new(Duration::ZERO);
    let _a_server = a
        .serve(Arc::new(fills.clone()), observe(true))
        .await
        .unwrap();
    let _b_server = b
        .serve(Arc::new(fills.clone()), observe(true))
        .await
        .unwrap();
    // Both views: a request from a would otherwise make b see a alive mid-test and change
    // who coordinates the chunk.
    a.announce(true).await;
    b.announce(true).await;
    eventually("both alive in both views", || {
        [&a, &b]
            .iter()
            .all(|c| c.peers().iter().all(|(_, alive)| *alive))
    })
    .await;
    let b_peer = PeerAddr::new(&b_addr);
    let key_b = (0..1000)
        .map(|i| ChunkKey::new(object(), CHUNK, i))
        .find(|k| b.coordinator_for(&k.id()).is_none())
        .unwrap();
    let stream = a.fetch_from_peer(&b_peer, &key_b).await.unwrap();
    assert_eq!(collect(stream).await.unwrap(), content(&key_b));

    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {CHUNK}\r\n\r\n");
    let garbage = vec![0xEE; CHUNK as usize];
    let impostor = |face| fake_peer(face, head.clone(), garbage.clone(), false);
    // A certificate from the same CA, but no secret: its 200 proves nothing, its body is unread.
    let (_, _, same_ca) = make_leaf(&ca, &["127.0.0.1"], &dir, "impostor");
    let peer = PeerAddr::new(&impostor(Face::Tls(same_ca, None)).await);
    assert_eq!(
        a.fetch_from_peer(&peer, &key_b).await.err(),
        Some(PeerError::Unauthenticated)
    );
    // Another CA's certificate, or the secret-derived one: refused in the handshake.
    let (other_ca, _) = make_ca(&dir, "other-ca");
    let (_, _, stranger) = make_leaf(&other_ca, &["127.0.0.1"], &dir, "stranger");
    for face in [Face::Tls(stranger, None), member_face()] {
        let peer = PeerAddr::new(&impostor(face).await);
        assert!(matches!(
            a.fetch_from_peer(&peer, &key_b).await.err(),
            Some(PeerError::Tls(_))
        ));
    }
    let text = a.metrics_text();
    assert!(
        text.contains("orcafs_cluster_peer_fallbacks_total{reason=\"unauthenticated\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("orcafs_cluster_peer_fallbacks_total{reason=\"tls\"} 2"),
        "{text}"
    );

    // Misconfigurations stop the host at start, in one sentence.
    let err =
        |cfg: ClusterConfig| async move { Cluster::start(&cfg).await.unwrap_err().to_string() };
    let mut c = with_certs(&a_addr);
    c.tls_ca = None;
    let e = err(c).await;
    assert!(e.contains("tls_cert, tls_key and tls_ca together"), "{e}");
    let mut c = config(&a_addr, &[&a_addr], secret.clone());
    c.tls_server_name = Some("orcafs.test".to_string().try_into().unwrap());
    let e = err(c).await;
    assert!(e.contains("only checked with operator certificates"), "{e}");
    let mut c = with_certs(&a_addr);
    c.tls_server_name = Some("orcafs.test".to_string().try_into().unwrap());
    let e = err(c).await;
    assert!(e.contains("peers will refuse it"), "{e}");
    let mut c = with_certs(&a_addr);
    c.tls_key = Some(dir.path().join("missing.key"));
    let e = err(c).await;
    assert!(e.contains("tls_key") && e.contains("missing.key"), "{e}");
    // A named cluster certificate works with tls_server_name.
    let (named_cert, named_key, _) = make_leaf(&ca, &["orcafs.test"], &dir, "named");
    let mut c = with_certs(&a_addr);
    c.tls_cert = Some(named_cert);
    c.tls_key = Some(named_key);
    c.tls_server_name = Some("orcafs.test".to_string().try_into().unwrap());
    Cluster::start(&c).await.unwrap();
}

#[tokio::test]
async fn a_short_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let me = free_addr();
    let cfg = config(&me, &[&me], secret_file(&dir, "secret", "too-short"));
    let e = Cluster::start(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("is 9 bytes; use at least 16"), "{e}");
    assert!(!e.contains("too-short"), "the secret is not shown: {e}");
}

// ---------------------------------------------------------------- throughput

/// A local fill that hands out one prepared buffer in 256 KiB pieces: no per-byte work, so the
/// RPC is what is measured.
#[derive(Clone)]
struct FastFills {
    chunk: Bytes,
}

impl LocalFills for FastFills {
    fn chunk_size(&self) -> u64 {
        self.chunk.len() as u64
    }

    fn stream_local(&self, key: ChunkKey) -> ChunkStream {
        let data = self.chunk.slice(..key.len() as usize);
        let pieces: Vec<Result<Bytes, StoreError>> = (0..data.len())
            .step_by(256 << 10)
            .map(|at| Ok(data.slice(at..(at + (256 << 10)).min(data.len()))))
            .collect();
        Box::pin(futures::stream::iter(pieces))
    }
}

/// Streams 1 GiB of 8 MiB chunks from a peer over loopback (4 at a time, like readahead) and
/// prints MB/s. Run in release: `cargo test --release -p orcafs --test cluster_unit --
/// --ignored --nocapture peer_fill_throughput`; the same test at the commit before TLS gives the
/// plain-HTTP figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn peer_fill_throughput() {
    const BIG: u64 = 8 << 20;
    const CHUNKS: usize = 128;
    const PARALLEL: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let secret = secret_file(&dir, "secret", SECRET);
    let fills = FastFills {
        chunk: Bytes::from(vec![0x5A; BIG as usize]),
    };
    let mut clusters = Vec::new();
    let mut servers = Vec::new();
    for me in [&a_addr, &b_addr] {
        let mut cfg = config(me, &[&a_addr, &b_addr], secret.clone());
        // The default pace: a loaded machine must not flap the peers mid-run.
        cfg.health_interval = Some(Duration::from_secs(2));
        let c = Cluster::start(&cfg).await.unwrap();
        servers.push(
            c.serve(Arc::new(fills.clone()), observe(true))
                .await
                .unwrap(),
        );
        clusters.push(c);
    }
    let (a, b) = (clusters[0].clone(), clusters[1].clone());
    // Both views: a request from a would otherwise make b see a alive mid-test and change
    // who coordinates the chunk.
    a.announce(true).await;
    b.announce(true).await;
    eventually("both alive in both views", || {
        [&a, &b]
            .iter()
            .all(|c| c.peers().iter().all(|(_, alive)| *alive))
    })
    .await;
    let object = Arc::new(ObjectVersion {
        size: 4 * CHUNKS as u64 * BIG,
        ..(*object()).clone()
    });
    let keys: Vec<ChunkKey> = (0..4 * CHUNKS as u64)
        .map(|i| ChunkKey::new(object.clone(), BIG, i))
        .filter(|k| b.coordinator_for(&k.id()).is_none())
        .take(CHUNKS + PARALLEL)
        .collect();
    assert_eq!(keys.len(), CHUNKS + PARALLEL);
    let b_peer = PeerAddr::new(&b_addr);
    let fetch_all = |keys: Vec<ChunkKey>| {
        let (a, b_peer) = (a.clone(), b_peer.clone());
        async move {
            let mut bytes = 0u64;
            for key in keys {
                let mut s = a.fetch_from_peer(&b_peer, &key).await.unwrap();
                while let Some(piece) = s.next().await {
                    bytes += piece.unwrap().len() as u64;
                }
            }
            bytes
        }
    };
    // Warm up: one connection per stream, as a running host has them pooled.
    let warm: Vec<_> = keys[..PARALLEL]
        .iter()
        .map(|k| tokio::spawn(fetch_all(vec![k.clone()])))
        .collect();
    for w in warm {
        w.await.unwrap();
    }
    let (started, cpu_before) = (Instant::now(), cpu_seconds());
    let tasks: Vec<_> = (0..PARALLEL)
        .map(|p| {
            let mine: Vec<ChunkKey> = keys[PARALLEL..]
                .iter()
                .skip(p)
                .step_by(PARALLEL)
                .cloned()
                .collect();
            tokio::spawn(fetch_all(mine))
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let (secs, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu_before);
    assert_eq!(total, CHUNKS as u64 * BIG);
    // Wall time depends on whatever else runs; CPU time per GiB (both ends, this process) is
    // what TLS costs.
    println!(
        "peer fill throughput: {:.0} MB/s ({total} bytes in {secs:.2} s, {PARALLEL} streams), \
         {:.2} CPU s per GiB",
        total as f64 / secs / 1e6,
        cpu / (total as f64 / (1u64 << 30) as f64)
    );
}

/// User + system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage(2) fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
