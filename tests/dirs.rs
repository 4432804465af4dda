//! Directories end to end: `ls -l` of a directory bigger than a LIST page costs its LIST pages and
//! no request per name (READDIRPLUS), a repeat within the TTL costs nothing, and names stream.

mod common;

use std::time::Duration;

use common::*;

const BUCKET: &str = "bkt";

#[test]
fn ls_l_of_a_big_directory_costs_its_list_pages_and_a_repeat_costs_nothing() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    for i in 0..2100 {
        o.put_object(BUCKET, &format!("d/f{i:05}"), vec![b'x'; i % 7]);
    }
    let metrics = free_addr();
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &["--metadata-ttl", "300s", "--metrics-addr", &metrics],
    );
    o.reset_stats();
    let out = run("ls", &["-l", m.path("d").to_str().unwrap()]);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<_> = text.lines().filter(|l| l.starts_with('-')).collect();
    assert_eq!(lines.len(), 2100);
    // Sizes come with the names (READDIRPLUS): spot-check one.
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" f00006") && l.split_whitespace().nth(4) == Some("6")),
        "f00006 has size 6"
    );
    let st = o.stats();
    // The lookup of `d` (one LIST page, and a HEAD that may race it), then 3 pages. That HEAD
    // of a "directory" key gets a 500 from s3s-fs, which the SDK may retry before the lookup drops
    // it; a HEAD per name would be 2100.
    assert!(st.list_requests <= 4, "{st:?}");
    assert!(st.head_requests <= 4, "no HEAD per name: {st:?}");
    assert_eq!(st.get_requests, 0);

    o.reset_stats();
    let again = run("ls", &["-l", m.path("d").to_str().unwrap()]);
    assert_eq!(again, text.as_bytes(), "same listing");
    let st = o.stats();
    assert_eq!(st.requests, 0, "within the TTL: nothing sent: {st:?}");
    // `ls -l` asks each name for `security.selinux` and `system.posix_acl_access`; the mount
    // has neither namespace and says so, and `ls` stops asking: two requests per run, not two
    // per name (4200 per run).
    let getxattrs =
        metric_sample(&metrics, "orcafs_fuse_op_seconds_count{op=\"getxattr\"}").unwrap_or(0.0);
    assert!(
        (1.0..=4.0).contains(&getxattrs),
        "{getxattrs} getxattr requests for two ls -l"
    );
}

#[test]
fn find_walks_a_tree_and_rewinddir_restarts_cleanly() {
    let s = Scratch::new();
    let o = origin(&s, BUCKET);
    for d in 0..3 {
        for f in 0..150 {
            o.put_object(BUCKET, &format!("t/d{d}/f{f:03}"), b"1".to_vec());
        }
    }
    let m = Mount::start(
        &Target::of(&o),
        BUCKET,
        &s.path("mnt"),
        &s.path("cache"),
        &["--metadata-ttl", "1s"],
    );
    let out = run("find", &[m.path("t").to_str().unwrap(), "-type", "f"]);
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 450);
    // After the TTL the listing streams again; `du` (which stats every name) agrees.
    std::thread::sleep(Duration::from_millis(1100));
    let du = run(
        "du",
        &[
            "-s",
            "--apparent-size",
            "-B1",
            m.path("t").to_str().unwrap(),
        ],
    );
    let bytes: u64 = String::from_utf8(du)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes >= 450, "du counted {bytes} bytes");
    drop(m);
}
