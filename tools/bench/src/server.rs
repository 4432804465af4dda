//! The S3 server the mounts read from: a single-node Garage started for the run (the default: a
//! real, fast S3 engine) or s3s-fs in this process (`--origin s3s-fs`, whose 4 KiB body
//! streaming is slow), and the origin-side counters the phases report: requests by kind, and
//! GetObject body bytes.
//!
//! s3s-fs counts for itself. Garage (built without its metrics feature) is counted from outside,
//! at no cost to it: requests from its access log (one INFO line per request), bytes from an
//! nftables counter on its S3 port. That rule is only ever added inside a network namespace of
//! the bench's own (`scripts/bench` runs everything under `unshare --net`), never on the host.

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use orcafs_devorigin::{DevOrigin, Garage, ACCESS_KEY, SECRET_KEY};

use crate::bail;
use crate::error::{Context, Result};
use crate::origin::BUCKET;
use crate::sys;

/// Which S3 server to measure against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OriginKind {
    /// A single-node Garage started by the bench (needs `garage` and `nft`).
    Garage,
    /// s3s-fs inside the bench process (slow 4 KiB body streaming: flatters every ratio).
    S3sFs,
}

/// Origin-side counts of requests to the benchmark bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every request to the bucket.
    pub requests: u64,
    pub get_requests: u64,
    pub head_requests: u64,
    pub list_requests: u64,
    /// Bytes the origin sent: s3s-fs counts GetObject body bytes; Garage every byte its S3 port
    /// sent (all responses, HTTP headers included; IP and TCP headers subtracted), which for a
    /// data read is its bodies give or take a few hundred bytes a response.
    pub get_bytes: u64,
}

impl Counts {
    fn minus(self, earlier: Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            get_requests: self.get_requests.saturating_sub(earlier.get_requests),
            head_requests: self.head_requests.saturating_sub(earlier.head_requests),
            list_requests: self.list_requests.saturating_sub(earlier.list_requests),
            get_bytes: self.get_bytes.saturating_sub(earlier.get_bytes),
        }
    }
}

/// A running S3 server with counters that can be zeroed.
pub struct OriginServer {
    inner: Inner,
    /// Totals when the counters were last zeroed.
    zero: Mutex<Counts>,
}

enum Inner {
    Garage(Box<GarageOrigin>),
    S3sFs(DevOrigin),
}

struct GarageOrigin {
    garage: Garage,
    log: Mutex<AccessLog>,
    version: String,
}

impl OriginServer {
    /// Starts the server with its files under `dir`.
    pub fn start(kind: OriginKind, dir: &Path) -> Result<OriginServer> {
        let inner = match kind {
            OriginKind::S3sFs => Inner::S3sFs(
                DevOrigin::start(&dir.join("s3")).context("starting the s3s-fs origin")?,
            ),
            OriginKind::Garage => {
                Inner::Garage(Box::new(GarageOrigin::start(&dir.join("garage"))?))
            }
        };
        Ok(OriginServer {
            inner,
            zero: Mutex::new(Counts::default()),
        })
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Garage(g) => format!(
                "Garage {} (single node, LMDB metadata, replication 1, data on the work \
                 directory's disk), a separate process on 127.0.0.1",
                g.version
            ),
            Inner::S3sFs(_) => "s3s-fs (`orcafs-devorigin`) inside the bench process on \
                 127.0.0.1; it streams bodies in 4 KiB pieces and is CPU-bound, so it flatters \
                 every ratio against it"
                .into(),
        }
    }

    /// The server's own process (None when it runs inside the bench).
    pub fn pid(&self) -> Option<u32> {
        match &self.inner {
            Inner::Garage(g) => Some(g.garage.pid()),
            Inner::S3sFs(_) => None,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        match &self.inner {
            Inner::Garage(g) => g.garage.endpoint(),
            Inner::S3sFs(o) => o.endpoint(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match &self.inner {
            Inner::Garage(g) => g.garage.s3_addr(),
            Inner::S3sFs(o) => o.addr(),
        }
    }

    pub fn access_key(&self) -> String {
        match &self.inner {
            Inner::Garage(g) => g.garage.access_key().to_owned(),
            Inner::S3sFs(_) => ACCESS_KEY.to_owned(),
        }
    }

    pub fn secret_key(&self) -> String {
        match &self.inner {
            Inner::Garage(g) => g.garage.secret_key().to_owned(),
            Inner::S3sFs(_) => SECRET_KEY.to_owned(),
        }
    }

    /// A new SDK client with the server's key.
    pub fn client(&self) -> aws_sdk_s3::Client {
        match &self.inner {
            Inner::Garage(g) => g.garage.client(),
            Inner::S3sFs(o) => o.client(),
        }
    }

    /// Creates `bucket` with the server's admin tool and grants our key (Garage); false when
    /// the server has none and the bucket is created through the S3 API instead (s3s-fs).
    pub fn admin_create_bucket(&self, bucket: &str) -> Result<bool> {
        match &self.inner {
            Inner::Garage(g) => g
                .garage
                .try_create_bucket(bucket)
                .map(|()| true)
                .with_context(|| format!("creating bucket {bucket}")),
            Inner::S3sFs(_) => Ok(false),
        }
    }

    /// The file holding `key` of the benchmark bucket, when the server keeps objects as files.
    pub fn object_file(&self, key: &str) -> Option<PathBuf> {
        match &self.inner {
            Inner::Garage(_) => None,
            Inner::S3sFs(o) => Some(o.root().join(BUCKET).join(key)),
        }
    }

    /// Counts since the last [`OriginServer::zero_counts`].
    pub fn counts(&self) -> Result<Counts> {
        let total = self.totals()?;
        let zero = *self.zero.lock().map_err(|_| poisoned())?;
        Ok(total.minus(zero))
    }

    /// Zeroes the counters.
    pub fn zero_counts(&self) -> Result<()> {
        let total = self.totals()?;
        *self.zero.lock().map_err(|_| poisoned())? = total;
        Ok(())
    }

    fn totals(&self) -> Result<Counts> {
        match &self.inner {
            Inner::Garage(g) => {
                let mut counts = g.log.lock().map_err(|_| poisoned())?.read_new()?;
                counts.get_bytes = s3_port_payload_bytes()?;
                Ok(counts)
            }
            Inner::S3sFs(o) => {
                let s = o.stats();
                Ok(Counts {
                    requests: s.requests,
                    get_requests: s.get_requests,
                    head_requests: s.head_requests,
                    list_requests: s.list_requests,
                    get_bytes: s.get_bytes,
                })
            }
        }
    }
}

fn poisoned() -> crate::error::Error {
    crate::error::Error::msg("origin counter lock poisoned")
}

impl GarageOrigin {
    fn start(dir: &Path) -> Result<GarageOrigin> {
        if !sys::in_private_net_namespace() {
            bail!(
                "Garage is counted with an nftables rule, which the bench adds only in a network \
                 namespace of its own: run it through scripts/bench (unshare --net), or use \
                 --origin s3s-fs"
            );
        }
        let bin = Garage::binary()
            .context("no garage binary (set ORCAFS_GARAGE_BIN or put garage on PATH)")?;
        let version = sys::command_output(&bin.to_string_lossy(), &["--version"])
            // `garage cargo:2.5.0 [features: …]`
            .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
            .map(|v| format!("v{}", v.trim_start_matches("cargo:")))
            .unwrap_or_else(|| "(unknown version)".into());
        let garage = Garage::start(dir).context("starting Garage")?;
        add_s3_port_counter(garage.s3_addr().port())?;
        let log = AccessLog::new(garage.log_path().to_owned());
        Ok(GarageOrigin {
            garage,
            log: Mutex::new(log),
            version,
        })
    }
}

/// The nftables table of the counter (in the bench's own network namespace).
const NFT_TABLE: &str = "orcafs_bench";
/// Bytes of IPv4 and TCP headers (with timestamps) in each packet counted.
const IP_TCP_HEADERS: u64 = 20 + 32;

/// Counts every packet leaving Garage's S3 port.
fn add_s3_port_counter(port: u16) -> Result<()> {
    let script = format!(
        "add table inet {NFT_TABLE}\n\
         add counter inet {NFT_TABLE} s3_sent\n\
         add chain inet {NFT_TABLE} out {{ type filter hook output priority 0; policy accept; }}\n\
         add rule inet {NFT_TABLE} out tcp sport {port} counter name s3_sent\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (apt-get install nftables)")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        stdin
            .write_all(script.as_bytes())
            .context("writing to nft")?;
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft could not add the byte counter: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Payload bytes Garage's S3 port has sent so far.
fn s3_port_payload_bytes() -> Result<u64> {
    let out = Command::new("nft")
        .args(["list", "counter", "inet", NFT_TABLE, "s3_sent"])
        .output()
        .context("running nft list counter")?;
    if !out.status.success() {
        bail!(
            "nft list counter failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (packets, bytes) = parse_nft_counter(&text).context("no counter in nft's output")?;
    Ok(bytes.saturating_sub(packets * IP_TCP_HEADERS))
}

/// `packets N bytes M` of `nft list counter`.
fn parse_nft_counter(text: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |name: &str| {
        let i = words.iter().position(|w| *w == name)?;
        words.get(i + 1)?.parse::<u64>().ok()
    };
    Some((after("packets")?, after("bytes")?))
}

/// Garage's log read incrementally: one `ADDR METHOD PATH` line per S3 request.
struct AccessLog {
    path: PathBuf,
    offset: u64,
    counts: Counts,
}

impl AccessLog {
    fn new(path: PathBuf) -> AccessLog {
        AccessLog {
            path,
            offset: 0,
            counts: Counts::default(),
        }
    }

    /// Counts the complete lines written since the last call; returns the totals.
    fn read_new(&mut self) -> Result<Counts> {
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))
            .context("seeking in the Garage log")?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .context("reading the Garage log")?;
        // Only whole lines: the server may be writing the next one.
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
            return Ok(self.counts);
        };
        for line in String::from_utf8_lossy(&bytes[..end]).lines() {
            if let Some((method, path)) = request_of(line) {
                count(&mut self.counts, method, path);
            }
        }
        self.offset += end as u64 + 1;
        Ok(self.counts)
    }
}

/// The method and path of an access log line (`… generic_server: 127.0.0.1:4711 GET /b/k`).
fn request_of(line: &str) -> Option<(&str, &str)> {
    let (_, rest) = line.split_once("generic_server")?;
    let mut words = rest
        .trim_start_matches(|c: char| c == ':' || c.is_whitespace())
        .split_whitespace();
    let addr = words.next()?;
    // Error lines ("error 400 …, in response to ADDR GET /…") repeat a request already counted.
    if !addr.contains(':') || addr.starts_with("error") {
        return None;
    }
    let method = words.find(|w| matches!(*w, "GET" | "HEAD" | "PUT" | "POST" | "DELETE"))?;
    Some((method, words.next()?))
}

fn count(c: &mut Counts, method: &str, path: &str) {
    let path = path.split('?').next().unwrap_or(path);
    let Some(rest) = path.strip_prefix('/').and_then(|p| p.strip_prefix(BUCKET)) else {
        return;
    };
    let object = match rest {
        "" | "/" => false,
        r if r.starts_with('/') => true,
        _ => return, // another bucket whose name starts with ours
    };
    c.requests += 1;
    match (method, object) {
        ("GET", true) => c.get_requests += 1,
        ("HEAD", true) => c.head_requests += 1,
        ("GET", false) => c.list_requests += 1,
        _ => {}
    }
}
