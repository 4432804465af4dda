//! The S3 side: the objects put into the origin (in parallel), and the plain SDK client that
//! orcafs is compared with: single-stream GETs, 4 KiB ranged GETs one at a time and paginated
//! LISTs on one warm connection, and the large object as parallel ranged GETs on warm
//! connections.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;
use orcafs_devorigin::pseudo_random_bytes;
use tokio::runtime::Runtime;

use crate::bail;
use crate::error::{Context, Result};
use crate::server::OriginServer;

/// Bucket holding every benchmark object.
pub const BUCKET: &str = "bench";
/// Key of the large object of the sequential, re-read and random phases.
pub const MAIN_KEY: &str = "big.bin";

/// Sizes and counts of the objects to create.
#[derive(Debug, Clone)]
pub struct Plan {
    pub main_size: u64,
    pub ttfb_objects: usize,
    pub ttfb_size: u64,
    pub rss_objects: usize,
    pub rss_size: u64,
    /// Objects in `DIR_LARGE`, in `DIR_PAGE`, and directories x objects of `TREE`.
    pub dir_large: usize,
    pub dir_page: usize,
    pub tree: (usize, usize),
}

/// The objects in the origin, and what is known about them.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub main_size: u64,
    pub main_sha256: String,
    pub ttfb_keys: Vec<String>,
    /// TTFB objects in a directory of more than one LIST page (see `BIG_DIR`).
    pub ttfb_big_dir_keys: Vec<String>,
    pub rss_keys: Vec<String>,
    pub rss_size: u64,
    /// Keys and bodies of every small object of the directory phases.
    pub dir_objects: Vec<(String, Bytes)>,
    /// Objects in `DIR_LARGE`, in `DIR_PAGE`, and directories x objects of `TREE`.
    pub dir_large: usize,
    pub dir_page: usize,
    pub tree: (usize, usize),
}

/// A directory holding TTFB objects among more than 1000 others, so its lookup cannot keep a
/// complete listing and each name costs a lookup at the origin (LIST and HEAD).
pub const BIG_DIR: &str = "ttfb-big-dir";
/// Filler objects put in `BIG_DIR`.
pub const BIG_DIR_FILLERS: usize = 1000;

/// A prefix of many small objects (`ls -l`, first names).
pub const DIR_LARGE: &str = "dir-large";
/// A prefix of one LIST page of small objects (`ls -l`, with the peers).
pub const DIR_PAGE: &str = "dir-page";
/// A tree of directories of small objects (`find`, `du -s`, `ls -R`).
pub const TREE: &str = "tree";
/// Small objects put at once.
const SMALL_PARALLEL: usize = 32;
/// Large objects put at once (each is generated in memory first).
const LARGE_PARALLEL: usize = 2;
/// Worker threads of the parallel ranged GETs' runtime (its connections' I/O).
const PARALLEL_WORKERS: usize = 2;

/// An SDK client on its own single-threaded runtime: what a plain
/// application doing one request at a time looks like. For the parallel
/// ranged GETs, a second client (its own connection pool) on a
/// multi-threaded runtime.
pub struct PlainClient {
    runtime: Runtime,
    client: Client,
    parallel_runtime: Runtime,
    parallel_client: Client,
}

/// One object to put.
struct Upload {
    key: String,
    body: Body,
}

enum Body {
    Bytes(Bytes),
    /// `pseudo_random_bytes(seed, size)`, generated when its turn comes.
    Random {
        seed: u64,
        size: usize,
    },
}

impl PlainClient {
    pub fn new(server: &OriginServer) -> Result<PlainClient> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the client runtime")?;
        let parallel_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(PARALLEL_WORKERS)
            .thread_name("plain-parallel")
            .enable_all()
            .build()
            .context("building the parallel client runtime")?;
        Ok(PlainClient {
            runtime,
            client: server.client(),
            parallel_runtime,
            parallel_client: server.client(),
        })
    }

    /// A client of `server` whose requests go to `endpoint` instead (a proxy in front of it).
    pub fn at(server: &OriginServer, endpoint: &str) -> Result<PlainClient> {
        let mut c = PlainClient::new(server)?;
        let redirect = |client: &Client| {
            Client::from_conf(client.config().to_builder().endpoint_url(endpoint).build())
        };
        c.client = redirect(&c.client);
        c.parallel_client = redirect(&c.parallel_client);
        Ok(c)
    }

    /// Creates `bucket`: with the server's admin tool when it has one, else through S3.
    pub fn create_bucket(&self, server: &OriginServer, bucket: &str) -> Result<()> {
        if server.admin_create_bucket(bucket)? {
            return Ok(());
        }
        let req = self.client.create_bucket().bucket(bucket);
        self.runtime
            .block_on(req.send())
            .map_err(DisplayErrorContext)
            .with_context(|| format!("creating bucket {bucket}"))?;
        Ok(())
    }

    /// Creates the bucket and puts every object of `plan`; writes the large
    /// object to `local_copy` too (the local-file baseline).
    pub fn create_objects(
        &self,
        server: &OriginServer,
        plan: &Plan,
        local_copy: &Path,
    ) -> Result<Dataset> {
        self.create_bucket(server, BUCKET)?;
        let main = Bytes::from(pseudo_random_bytes(1, to_usize(plan.main_size)?));
        std::fs::write(local_copy, &main)
            .with_context(|| format!("writing the local copy {}", local_copy.display()))?;
        let main_sha256 = crate::reads::sha256_hex(&main);
        let mut large = vec![Upload {
            key: MAIN_KEY.into(),
            body: Body::Bytes(main),
        }];
        let ttfb_keys = series(&mut large, "ttfb", 10, plan.ttfb_objects, plan.ttfb_size)?;
        let ttfb_big_dir_keys = series(&mut large, BIG_DIR, 50, plan.ttfb_objects, plan.ttfb_size)?;
        let rss_keys = series(&mut large, "rss", 100, plan.rss_objects, plan.rss_size)?;
        self.put_all(large, LARGE_PARALLEL)?;
        let dir_objects = small_objects(plan);
        let mut small: Vec<Upload> = dir_objects
            .iter()
            .map(|(key, body)| Upload {
                key: key.clone(),
                body: Body::Bytes(body.clone()),
            })
            .collect();
        small.extend((0..BIG_DIR_FILLERS).map(|i| Upload {
            key: format!("{BIG_DIR}/filler-{i:04}"),
            body: Body::Bytes(Bytes::from_static(b"f")),
        }));
        crate::progress(&format!("putting {} small objects", small.len()));
        self.put_all(small, SMALL_PARALLEL)?;
        Ok(Dataset {
            main_size: plan.main_size,
            main_sha256,
            ttfb_keys,
            ttfb_big_dir_keys,
            rss_keys,
            rss_size: plan.rss_size,
            dir_objects,
            dir_large: plan.dir_large,
            dir_page: plan.dir_page,
            tree: plan.tree,
        })
    }

    /// Puts every upload, `parallel` at a time, on a runtime of its own (the plain client's is
    /// single-threaded on purpose); the first error ends it.
    fn put_all(&self, uploads: Vec<Upload>, parallel: usize) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the upload runtime")?;
        let client = self.client.clone();
        runtime.block_on(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
            let mut tasks = tokio::task::JoinSet::new();
            for upload in uploads {
                let slot = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .context("upload slots closed")?;
                let client = client.clone();
                tasks.spawn(async move {
                    let result = put(&client, upload).await;
                    drop(slot);
                    result
                });
                while let Some(done) = tasks.try_join_next() {
                    done.context("upload task")??;
                }
            }
            while let Some(done) = tasks.join_next().await {
                done.context("upload task")??;
            }
            Ok(())
        })
    }

    /// One GetObject of `key` read to its end and dropped: puts the object's files in the
    /// server's page cache, so the next reader is served from memory like a remote server's.
    pub fn get_discard(&self, key: &str) -> Result<u64> {
        let req = self.client.get_object().bucket(BUCKET).key(key);
        self.runtime
            .block_on(async move {
                let out = req
                    .send()
                    .await
                    .map_err(DisplayErrorContext)
                    .context("sending")?;
                let mut body = out.body;
                let mut n = 0u64;
                while let Some(chunk) = body.next().await {
                    n += chunk.context("reading the body")?.len() as u64;
                }
                Ok::<u64, crate::error::Error>(n)
            })
            .with_context(|| format!("GET of {BUCKET}/{key}"))
    }

    /// Paginated ListObjectsV2 of `prefix` with delimiter `/` (what listing one directory
    /// costs a plain client): the time of all pages and the entries (keys and subdirectories).
    pub fn list_dir(&self, prefix: &str) -> Result<(Duration, Vec<String>)> {
        self.runtime
            .block_on(list_dir(&self.client, prefix, None))
            .with_context(|| format!("listing {BUCKET}/{prefix}"))
    }

    /// One ListObjectsV2 page of at most `max_keys` entries of `prefix`: its time.
    pub fn list_page(&self, prefix: &str, max_keys: i32) -> Result<Duration> {
        self.runtime
            .block_on(list_dir(&self.client, prefix, Some(max_keys)))
            .map(|(t, _)| t)
            .with_context(|| format!("listing a page of {BUCKET}/{prefix}"))
    }

    /// One GetObject of the whole `key`, its body copied into `buf` (which
    /// must be exactly the object's size). Returns the time from sending the
    /// request to the last byte.
    pub fn get_into(&self, key: &str, buf: &mut [u8]) -> Result<Duration> {
        self.runtime
            .block_on(get_into(&self.client, key, buf))
            .with_context(|| format!("plain GET of {BUCKET}/{key}"))
    }

    /// The whole `key` as `parts` ranged GetObjects of contiguous ranges, all at once, each
    /// body copied into its own part of `buf` (which must be exactly the object's size), on
    /// `parts` connections opened beforehand. Returns the time from sending the requests to
    /// the last byte of the last one.
    pub fn get_ranges_into(&self, key: &str, buf: &mut [u8], parts: usize) -> Result<Duration> {
        let parts = parts.max(1);
        let handle = self.parallel_runtime.handle();
        let client = &self.parallel_client;
        // Warm connections: `parts` one-byte ranged GETs at once leave `parts` open
        // connections in the pool.
        std::thread::scope(|s| {
            let tasks: Vec<_> = (0..parts)
                .map(|_| s.spawn(|| handle.block_on(get_range(client, key, 0, 1))))
                .collect();
            for t in tasks {
                t.join()
                    .map_err(|_| crate::error::Error::msg("a GET thread panicked"))??;
            }
            Ok::<(), crate::error::Error>(())
        })
        .with_context(|| format!("opening {parts} connections"))?;
        let part_len = buf.len().div_ceil(parts).max(1);
        let chunks: Vec<&mut [u8]> = buf.chunks_mut(part_len).collect();
        let barrier = std::sync::Barrier::new(chunks.len() + 1);
        let (started, results) = std::thread::scope(|s| {
            let tasks: Vec<_> = chunks
                .into_iter()
                .enumerate()
                .map(|(i, part)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        let start = (i * part_len) as u64;
                        handle.block_on(get_range_into(client, key, start, part))?;
                        Ok::<Instant, crate::error::Error>(Instant::now())
                    })
                })
                .collect();
            barrier.wait();
            let started = Instant::now();
            let results: Vec<Result<Instant>> = tasks
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(crate::error::Error::msg("a GET thread panicked")))
                })
                .collect();
            (started, results)
        });
        let mut last = started;
        for r in results {
            last = last.max(r.with_context(|| format!("ranged GET of {BUCKET}/{key}"))?);
        }
        Ok(last - started)
    }

    /// A ranged GetObject of `len` bytes at each offset of `key`, one at a time on this
    /// client's one keep-alive connection (call [`PlainClient::warm_up`] first so that it is
    /// open), each body read whole and its length checked. Returns the time of all of them.
    pub fn get_ranges_one_at_a_time(
        &self,
        key: &str,
        offsets: &[u64],
        len: u64,
    ) -> Result<Duration> {
        self.runtime
            .block_on(async {
                let started = Instant::now();
                for &off in offsets {
                    get_range(&self.client, key, off, len)
                        .await
                        .with_context(|| format!("{len} bytes at {off}"))?;
                }
                Ok::<Duration, crate::error::Error>(started.elapsed())
            })
            .with_context(|| format!("ranged GETs of {BUCKET}/{key}"))
    }

    /// Time from sending a GetObject of `key` to receiving its first body bytes.
    pub fn first_bytes(&self, key: &str) -> Result<(Duration, Duration)> {
        self.runtime
            .block_on(first_bytes(&self.client, key))
            .with_context(|| format!("plain GET first bytes of {BUCKET}/{key}"))
    }

    /// A HeadObject, so the next request finds an open connection (orcafs
    /// has one open too once it has listed or looked something up).
    pub fn warm_up(&self, key: &str) -> Result<()> {
        let req = self.client.head_object().bucket(BUCKET).key(key);
        self.runtime
            .block_on(req.send())
            .map_err(DisplayErrorContext)
            .with_context(|| format!("head of {BUCKET}/{key}"))?;
        Ok(())
    }
}

/// `count` objects `PREFIX/NNN.bin` of `size` bytes, each with its own content (seed
/// `first_seed + i`), added to `uploads`; returns their keys.
fn series(
    uploads: &mut Vec<Upload>,
    prefix: &str,
    first_seed: u64,
    count: usize,
    size: u64,
) -> Result<Vec<String>> {
    let size = to_usize(size)?;
    let keys: Vec<String> = (0..count).map(|i| format!("{prefix}/{i:03}.bin")).collect();
    uploads.extend(keys.iter().enumerate().map(|(i, key)| Upload {
        key: key.clone(),
        body: Body::Random {
            seed: first_seed + i as u64,
            size,
        },
    }));
    Ok(keys)
}

/// The small objects of the directory phases: `DIR_LARGE/o-NNNNN`, `DIR_PAGE/o-NNNN` and
/// `TREE/dNNN/o-NNN`, each a few hundred bytes to a few KiB (sizes vary, as real files do).
fn small_objects(plan: &Plan) -> Vec<(String, Bytes)> {
    let body = |i: usize| {
        let size = 100 + (i * 7919) % 4000;
        Bytes::from(vec![b'a' + (i % 26) as u8; size])
    };
    let mut out = Vec::new();
    out.extend((0..plan.dir_large).map(|i| (format!("{DIR_LARGE}/o-{i:05}"), body(i))));
    out.extend((0..plan.dir_page).map(|i| (format!("{DIR_PAGE}/o-{i:04}"), body(i))));
    let (dirs, per_dir) = plan.tree;
    for d in 0..dirs {
        out.extend(
            (0..per_dir).map(|i| (format!("{TREE}/d{d:03}/o-{i:03}"), body(d * per_dir + i))),
        );
    }
    out
}

async fn put(client: &Client, upload: Upload) -> Result<()> {
    let body = match upload.body {
        Body::Bytes(b) => b,
        Body::Random { seed, size } => {
            tokio::task::spawn_blocking(move || Bytes::from(pseudo_random_bytes(seed, size)))
                .await
                .context("generating an object")?
        }
    };
    let len = body.len();
    client
        .put_object()
        .bucket(BUCKET)
        .key(&upload.key)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(DisplayErrorContext)
        .with_context(|| format!("putting {BUCKET}/{} ({} KiB)", upload.key, len >> 10))?;
    Ok(())
}

/// All pages (or only the first `max_keys`) of a delimited listing of `prefix`.
async fn list_dir(
    client: &Client,
    prefix: &str,
    max_keys: Option<i32>,
) -> Result<(Duration, Vec<String>)> {
    let started = Instant::now();
    let mut entries = Vec::new();
    let mut token: Option<String> = None;
    // Bounded: a 30,000-object prefix is 30 pages.
    for _ in 0..10_000 {
        let out = client
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(prefix)
            .delimiter("/")
            .set_max_keys(max_keys)
            .set_continuation_token(token.take())
            .send()
            .await
            .map_err(DisplayErrorContext)
            .context("ListObjectsV2")?;
        entries.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        entries.extend(
            out.common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(str::to_owned)),
        );
        token = out.next_continuation_token().map(str::to_owned);
        if max_keys.is_some() || !out.is_truncated().unwrap_or(false) || token.is_none() {
            return Ok((started.elapsed(), entries));
        }
    }
    bail!("more than 10,000 pages")
}

async fn get_into(client: &Client, key: &str, buf: &mut [u8]) -> Result<Duration> {
    let started = Instant::now();
    let out = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .map_err(DisplayErrorContext)
        .context("sending")?;
    let mut body = out.body;
    let mut filled = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the body")?;
        let end = filled + chunk.len();
        if end > buf.len() {
            bail!("body longer than the expected {} bytes", buf.len());
        }
        buf[filled..end].copy_from_slice(&chunk);
        filled = end;
    }
    if filled != buf.len() {
        bail!("body ended at {filled} of {} bytes", buf.len());
    }
    Ok(started.elapsed())
}

/// A GetObject of `len` bytes at `start`, its body read whole and counted.
async fn get_range(client: &Client, key: &str, start: u64, len: u64) -> Result<()> {
    let out = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .range(format!("bytes={start}-{}", start + len - 1))
        .send()
        .await
        .map_err(DisplayErrorContext)
        .context("sending")?;
    let mut body = out.body;
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        got += chunk.context("reading the body")?.len() as u64;
    }
    if got != len {
        bail!("asked for {len} bytes at {start}, got {got}");
    }
    Ok(())
}

/// A GetObject of the `part.len()` bytes at `start`, copied into `part`.
async fn get_range_into(client: &Client, key: &str, start: u64, part: &mut [u8]) -> Result<()> {
    let end = start + part.len() as u64 - 1;
    let out = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .range(format!("bytes={start}-{end}"))
        .send()
        .await
        .map_err(DisplayErrorContext)
        .with_context(|| format!("sending the GET of bytes {start}-{end}"))?;
    let mut body = out.body;
    let mut filled = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("reading bytes {start}-{end}"))?;
        let to = filled + chunk.len();
        if to > part.len() {
            bail!("bytes {start}-{end}: body longer than the range");
        }
        part[filled..to].copy_from_slice(&chunk);
        filled = to;
    }
    if filled != part.len() {
        bail!("bytes {start}-{end}: body ended after {filled} bytes");
    }
    Ok(())
}

/// Time to the first body bytes, and to the first `KERNEL_FIRST_READ` bytes.
async fn first_bytes(client: &Client, key: &str) -> Result<(Duration, Duration)> {
    let started = Instant::now();
    let out = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .map_err(DisplayErrorContext)
        .context("sending")?;
    let mut body = out.body;
    let (mut first, mut got) = (None, 0);
    while got < KERNEL_FIRST_READ {
        match body.next().await {
            Some(Ok(chunk)) if !chunk.is_empty() => {
                first.get_or_insert(started.elapsed());
                got += chunk.len();
            }
            Some(Ok(_)) => {}
            None => bail!("body ended after {got} bytes"),
            Some(Err(e)) => bail!("reading the body: {e}"),
        }
    }
    Ok((first.unwrap_or_default(), started.elapsed()))
}

/// What the kernel asks a FUSE filesystem for when a program reads the first 4 KiB of a file
/// (its initial readahead window).
pub const KERNEL_FIRST_READ: usize = 16 << 10;

fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).context("object size does not fit in memory")
}
