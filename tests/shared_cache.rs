//! The shared in-datacenter cache store end to end: hosts with their own local caches share one
//! S3-compatible store (a second s3s-fs server here), write behind to it, read through it with
//! copy-back, keep serving reads from the origin when it is slow or gone, never serve an object
//! a non-member wrote, and refuse to start without a secret to tell the two apart.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "bkt";

/// The secret file every member host of a test shares.
fn secret_file(s: &Scratch) -> PathBuf {
    let path = s.dir.path().join("shared.secret");
    std::fs::write(&path, "fleet secret of the shared cache tests\n").unwrap();
    path
}

fn shared_store(s: &Scratch) -> DevOrigin {
    let st = DevOrigin::start(&s.path("shared-root")).unwrap();
    st.create_bucket("cache");
    st
}

fn host(s: &Scratch, o: &DevOrigin, shared_endpoint: &str, name: &str, extra: &[&str]) -> Mount {
    let secret = secret_file(s);
    let mut args = vec![
        "--shared-cache",
        "s3://cache/fleet",
        "--shared-cache-endpoint-url",
        shared_endpoint,
        "--shared-cache-secret-file",
        secret.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Mount::start(
        &Target::of(o),
        BUCKET,
        &s.path(&format!("{name}/mnt")),
        &s.path(&format!("{name}/cache")),
        &args,
    )
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        count_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_second_host_reads_through_the_shared_store_with_zero_origin_gets() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let shared = shared_store(&s);
    let data = pattern(6 * CHUNK + 10, 1);
    o.put_object(BUCKET, "f.bin", data.clone());

    let a = host(&s, &o, &shared.endpoint(), "a", &[]);
    assert_eq!(sha256sum(&a.path("f.bin")), sha256_hex(&data));
    // Write-behind: the 7 chunks reach the shared store after the reads were served.
    let stored = s.dir.path().join("shared-root/cache/fleet");
    wait_for("7 chunks written behind", || count_files(&stored) == 7);
    assert_eq!(a.unmount(), 0);

    o.reset_stats();
    let b = host(&s, &o, &shared.endpoint(), "b", &[]);
    assert_eq!(sha256sum(&b.path("f.bin")), sha256_hex(&data));
    assert_eq!(
        o.stats().get_requests,
        0,
        "host b read everything from the shared store: {:?}",
        o.stats()
    );
    // Copy-back: b's local disk now holds the chunks; without the shared store they still serve.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.unmount(), 0);
    shared.reset_stats();
    let b = host(&s, &o, &shared.endpoint(), "b", &[]);
    assert_eq!(sha256sum(&b.path("f.bin")), sha256_hex(&data));
    assert_eq!(o.stats().get_requests, 0);
    // The only shared GET left is the start-up self test's probe (a few dozen bytes).
    let st = shared.stats();
    assert!(st.get_bytes < 1024, "served from b's local copy: {st:?}");
}

#[test]
fn a_slow_or_dead_shared_store_never_fails_a_read() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let shared = shared_store(&s);
    let one = pattern(3 * CHUNK, 2);
    let two = pattern(3 * CHUNK, 3);
    o.put_object(BUCKET, "one.bin", one.clone());
    o.put_object(BUCKET, "two.bin", two.clone());
    let cfg = s.dir.path().join("shared.toml");
    secret_file(&s);
    // A relative secret_file is next to the config file.
    std::fs::write(
        &cfg,
        format!(
            "[shared_cache]\nendpoint_url = \"{}\"\nbucket = \"cache\"\nforce_path_style = true\ntimeout = \"1s\"\nsecret_file = \"shared.secret\"\n",
            shared.endpoint()
        ),
    )
    .unwrap();
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &["--config", cfg.to_str().unwrap()],
    );
    // Slow: every shared GET takes longer than the store timeout.
    shared.faults().set_get_delay(Duration::from_secs(3));
    assert_eq!(sha256sum(&m.path("one.bin")), sha256_hex(&one));
    // Dead: the server is gone altogether.
    drop(shared);
    assert_eq!(sha256sum(&m.path("two.bin")), sha256_hex(&two));
    assert_eq!(
        o.stats().get_bytes,
        (one.len() + two.len()) as u64,
        "both came from the origin"
    );
}

#[test]
fn an_unreachable_shared_store_fails_the_mount_unless_optional() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    o.put_object(BUCKET, "x.txt", b"x".to_vec());
    let dead = format!("http://{}", free_addr());
    let secret = secret_file(&s);
    let out = mount_command(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &[
            "--shared-cache",
            "s3://cache",
            "--shared-cache-endpoint-url",
            &dead,
            "--shared-cache-secret-file",
            secret.to_str().unwrap(),
            "--foreground",
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("shared cache") && err.contains("self test"),
        "{err}"
    );
    assert!(!is_mounted(&s.path("mnt")));

    let cfg = s.dir.path().join("optional.toml");
    std::fs::write(
        &cfg,
        format!("[shared_cache]\nendpoint_url = \"{dead}\"\nbucket = \"cache\"\nforce_path_style = true\nrequired = false\nsecret_file = \"shared.secret\"\n"),
    )
    .unwrap();
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &["--config", cfg.to_str().unwrap()],
    );
    assert_eq!(read_all(&m.path("x.txt")), b"x");
}

#[test]
fn a_shared_store_without_a_secret_refuses_to_start() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let shared = shared_store(&s);
    let out = mount_command(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &[
            "--shared-cache",
            "s3://cache/fleet",
            "--shared-cache-endpoint-url",
            &shared.endpoint(),
            "--foreground",
        ],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("has no secret") && err.contains("secret_file in [shared_cache]"),
        "{err}"
    );
    assert!(!is_mounted(&s.path("mnt")));
}

/// Replaces every chunk object under `cache/fleet/` as someone with write access to the bucket
/// but no secret can: garbage under plausible metadata (CRCs that match it), a member's
/// metadata over garbage, and a member's object moved to another chunk's key.
fn poison_every_chunk(shared: &DevOrigin) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = shared.client();
        let list = client
            .list_objects_v2()
            .bucket("cache")
            .prefix("fleet/")
            .send()
            .await
            .unwrap();
        let mut objects: Vec<String> = list
            .contents()
            .iter()
            .filter_map(|o| o.key().map(String::from))
            .collect();
        objects.sort();
        assert_eq!(objects.len(), 3, "{objects:?}");
        let mut genuine = Vec::new();
        for object in &objects {
            let got = client
                .get_object()
                .bucket("cache")
                .key(object)
                .send()
                .await
                .unwrap();
            let meta = got.metadata().cloned().unwrap_or_default();
            let body = got.body.collect().await.unwrap().into_bytes();
            genuine.push((body, meta));
        }
        let garbage = bytes::Bytes::from(pattern(CHUNK, 99));
        let crcs: String = garbage
            .chunks(64 * KIB)
            .map(|b| format!("{:08x}", crc32c::crc32c(b)))
            .collect();
        let mut forged: HashMap<String, String> = HashMap::new();
        for k in ["orcafs-id", "orcafs-len", "orcafs-block"] {
            forged.insert(k.into(), genuine[0].1[k].clone());
        }
        forged.insert("orcafs-crcs".into(), crcs);
        let replacements = [
            (garbage.clone(), forged),
            (garbage, genuine[1].1.clone()),
            (genuine[1].0.clone(), genuine[1].1.clone()),
        ];
        for (object, (body, meta)) in objects.iter().zip(replacements) {
            client
                .put_object()
                .bucket("cache")
                .key(object)
                .set_metadata(Some(meta))
                .body(body.into())
                .send()
                .await
                .unwrap();
        }
    });
}

#[test]
fn objects_a_non_member_wrote_are_never_served() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    let shared = shared_store(&s);
    let data = pattern(3 * CHUNK, 4);
    o.put_object(BUCKET, "f.bin", data.clone());
    let stored = s.dir.path().join("shared-root/cache/fleet");

    let a = host(&s, &o, &shared.endpoint(), "a", &[]);
    assert_eq!(sha256sum(&a.path("f.bin")), sha256_hex(&data));
    wait_for("3 chunks written behind", || count_files(&stored) == 3);
    assert_eq!(a.unmount(), 0);

    poison_every_chunk(&shared);
    o.reset_stats();
    let metrics = free_addr();
    let b = host(
        &s,
        &o,
        &shared.endpoint(),
        "b",
        &["--metrics-addr", &metrics],
    );
    assert_eq!(sha256sum(&b.path("f.bin")), sha256_hex(&data));
    assert_eq!(
        o.stats().get_bytes,
        data.len() as u64,
        "every chunk came from the origin"
    );
    // At least once per chunk: a reader and a readahead fill may both meet one object.
    let rejected = metric_sample(&metrics, "orcafs_shared_rejected_total")
        .expect("orcafs_shared_rejected_total in /metrics");
    assert!(rejected >= 3.0, "{rejected}");
    assert!(b.log_text().contains("shared cache object rejected"));
    // The member's fills replaced the poisoned objects: a third host reads them all.
    wait_for("3 chunks written behind again", || {
        count_files(&stored) == 3
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.unmount(), 0);
    o.reset_stats();
    let c = host(&s, &o, &shared.endpoint(), "c", &[]);
    assert_eq!(sha256sum(&c.path("f.bin")), sha256_hex(&data));
    assert_eq!(o.stats().get_requests, 0, "{:?}", o.stats());
}
