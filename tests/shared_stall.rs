//! The shared store as a bottleneck, end to end: a shared store that hangs (its proxy is
//! SIGSTOPped) must not hold cold reads back or make memory grow, and readers of a chunk that only
//! the shared store has cost one shared-store read per host, not one each.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "bkt";

/// A TCP proxy in its own process (python3), so that it can be frozen for real with SIGSTOP:
/// connections are still accepted by the kernel, and nothing is answered.
struct Proxy {
    child: Child,
    port: u16,
}

const PROXY: &str = r#"
import socket, sys, threading
up = ("127.0.0.1", int(sys.argv[1]))
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(128)
print(ls.getsockname()[1], flush=True)
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except OSError: pass
    for s in (a, b):
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
while True:
    c, _ = ls.accept()
    u = socket.create_connection(up)
    for x, y in ((c, u), (u, c)):
        threading.Thread(target=pipe, args=(x, y), daemon=True).start()
"#;

impl Proxy {
    fn start(upstream_port: u16) -> Proxy {
        let mut child = Command::new("python3")
            .args(["-c", PROXY, &upstream_port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("proxy port");
        Proxy { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host of the site; `adaptive` lets a read's patience with the store adapt down to 20 ms
/// (`first_byte_floor`); otherwise it is fixed at 200 ms, which a loaded machine does not miss,
/// for tests that count on reads from the store.
fn host(
    s: &Scratch,
    o: &DevOrigin,
    shared: &str,
    name: &str,
    adaptive: bool,
    extra: &[&str],
) -> Mount {
    let cfg = s.dir.path().join(format!("{name}.toml"));
    // Every host of the site holds the secret that authenticates the store's objects.
    let secret = s.dir.path().join("shared.secret");
    std::fs::write(&secret, "stall-test-secret-0123456789").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[shared_cache]\nendpoint_url = \"{shared}\"\nbucket = \"cache\"\nprefix = \"fleet\"\n\
             force_path_style = true\ntimeout = \"2s\"\nsecret_file = \"{}\"\n{}",
            secret.display(),
            if adaptive {
                "first_byte_floor = \"20ms\"\n"
            } else {
                "first_byte_floor = \"200ms\"\n"
            }
        ),
    )
    .unwrap();
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    Mount::start(
        &Target::of(o),
        BUCKET,
        &s.path(&format!("{name}/mnt")),
        &s.path(&format!("{name}/cache")),
        &args,
    )
}

#[test]
fn a_hung_shared_store_neither_holds_cold_reads_back_nor_grows_memory() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let store = DevOrigin::start(&s.path("shared-root")).unwrap();
    store.create_bucket("cache");
    let proxy = Proxy::start(store.addr().port());
    // 32 MiB in 128 chunks: twice what the write-behind queue held before it held keys only.
    let data = pattern(128 * CHUNK, 40);
    o.put_object(BUCKET, "big.bin", data.clone());
    o.put_object(BUCKET, "small.bin", pattern(CHUNK, 41));

    let m = host(
        &s,
        &o,
        &proxy.endpoint(),
        "a",
        true,
        &["--memory-limit", "16MiB"],
    );
    // The store works: a first read is written behind to it.
    assert_eq!(
        sha256sum(&m.path("small.bin")),
        sha256_hex(&pattern(CHUNK, 41))
    );

    proxy.signal(libc::SIGSTOP);
    o.reset_stats();
    let t0 = Instant::now();
    assert_eq!(sha256sum(&m.path("big.bin")), sha256_hex(&data));
    let took = t0.elapsed();
    // A liveness bound, not a speed goal (that is scripts/bench's): before, every commit waited
    // for a queue slot that a hung store never freed, and a read like this took minutes.
    assert!(
        took < Duration::from_secs(30),
        "a cold read behind a hung shared store took {took:?}"
    );
    let st = o.stats();
    assert_eq!(
        st.get_bytes,
        data.len() as u64,
        "each byte from the origin once: {st:?}"
    );
    // Memory: the fill budget (16 MiB) plus the runtime, whatever the queue of a hung store.
    let peak = peak_rss(m.pid());
    assert!(peak < 160 << 20, "peak RSS {} MiB", peak >> 20);
    eprintln!(
        "cold read of 32 MiB behind a hung shared store: {took:?}, peak RSS {} MiB",
        peak >> 20
    );
    // Gone for good: the write-behind drains at unmount by failing fast instead of waiting.
    drop(proxy);
    drop(m);
}

#[test]
fn readers_of_a_chunk_only_in_the_shared_store_cost_one_shared_read_per_host() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let store = DevOrigin::start(&s.path("shared-root")).unwrap();
    store.create_bucket("cache");
    let data = pattern(4 * CHUNK, 42);
    o.put_object(BUCKET, "f.bin", data.clone());

    let a = host(&s, &o, &store.endpoint(), "a", false, &[]);
    assert_eq!(sha256sum(&a.path("f.bin")), sha256_hex(&data));
    assert_eq!(a.unmount(), 0, "unmount drains the write-behind");

    let b = host(
        &s,
        &o,
        &store.endpoint(),
        "b",
        false,
        &["--readahead-chunks", "0"],
    );
    store.reset_stats();
    o.reset_stats();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let p = b.path("f.bin");
            std::thread::spawn(move || sha256sum(&p))
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), sha256_hex(&data));
    }
    assert_eq!(o.stats().get_requests, 0, "nothing from the origin");
    let st = store.stats();
    assert_eq!(
        st.get_requests, 4,
        "one shared-store GET per chunk for eight readers: {st:?}"
    );
    drop(b);
}
