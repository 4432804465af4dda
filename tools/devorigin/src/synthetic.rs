//! Synthetic prefixes: a prefix whose ListObjectsV2 pages the server makes up instead of reading
//! them from disk, so a test or a benchmark can list a directory of 10 million keys without
//! uploading 10 million objects. Keys are `<prefix>k<index, 10 digits>`, empty, with one fixed
//! ETag; the continuation token is the next index. Only listings of exactly the registered
//! prefix are synthetic; objects under it cannot be read.

use std::sync::Mutex;

use bytes::Bytes;
use http::{header, HeaderValue, Response};

use crate::body::OriginBody;

/// The registered synthetic prefixes: `(bucket, prefix, key count)`.
#[derive(Debug, Default)]
pub struct Synthetic(Mutex<Vec<(String, String, u64)>>);

impl Synthetic {
    pub(crate) fn add(&self, bucket: &str, prefix: &str, count: u64) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|(b, p, _)| !(b == bucket && p == prefix));
        v.push((bucket.to_string(), prefix.to_string(), count));
    }

    fn count(&self, bucket: &str, prefix: &str) -> Option<u64> {
        let v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v.iter()
            .find(|(b, p, _)| b == bucket && p == prefix)
            .map(|(_, _, n)| *n)
    }

    /// The page a ListObjectsV2 `query` on `bucket` asks for, when it lists a synthetic prefix.
    pub(crate) fn page(&self, bucket: &str, query: &str) -> Option<Response<OriginBody>> {
        let q = Query::parse(query);
        let count = self.count(bucket, &q.prefix)?;
        let first: u64 = q.token.as_deref().and_then(|t| t.parse().ok()).unwrap_or(0);
        let end = first.saturating_add(q.max_keys).min(count);
        let xml = page_xml(bucket, &q.prefix, first, end, count, q.max_keys);
        let mut resp = Response::new(OriginBody::fixed(Bytes::from(xml)));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml"),
        );
        Some(resp)
    }
}

struct Query {
    prefix: String,
    token: Option<String>,
    max_keys: u64,
}

impl Query {
    fn parse(query: &str) -> Query {
        let mut q = Query {
            prefix: String::new(),
            token: None,
            max_keys: 1000,
        };
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "prefix" => q.prefix = v,
                "continuation-token" => q.token = Some(v),
                "max-keys" => q.max_keys = v.parse().unwrap_or(1000).clamp(1, 1000),
                _ => {}
            }
        }
        q
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(x) => {
                    out.push(x);
                    i += 3;
                }
                Err(_) => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn page_xml(bucket: &str, prefix: &str, first: u64, end: u64, count: u64, max: u64) -> String {
    let mut x = String::with_capacity(((end - first) as usize) * 200 + 512);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str("<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    x.push_str(&format!(
        "<Name>{bucket}</Name><Prefix>{prefix}</Prefix><KeyCount>{}</KeyCount>\
         <MaxKeys>{max}</MaxKeys><Delimiter>/</Delimiter><IsTruncated>{}</IsTruncated>",
        end - first,
        end < count
    ));
    for i in first..end {
        x.push_str(&format!(
            "<Contents><Key>{prefix}k{i:010}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
             <ETag>&quot;d41d8cd98f00b204e9800998ecf8427e&quot;</ETag><Size>0</Size>\
             <StorageClass>STANDARD</StorageClass></Contents>"
        ));
    }
    if end < count {
        x.push_str(&format!(
            "<NextContinuationToken>{end}</NextContinuationToken>"
        ));
    }
    x.push_str("</ListBucketResult>");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_token_and_end() {
        let s = Synthetic::default();
        s.add("b", "huge/", 2500);
        assert!(s.page("b", "list-type=2&prefix=other%2F").is_none());
        let q = Query::parse("list-type=2&prefix=huge%2F&continuation-token=2000&max-keys=1000");
        assert_eq!(
            (q.prefix.as_str(), q.token.as_deref()),
            ("huge/", Some("2000"))
        );
        let xml = page_xml("b", "huge/", 2000, 2500, 2500, 1000);
        assert!(xml.contains("<Key>huge/k0000002499</Key>"));
        assert!(xml.contains("<IsTruncated>false</IsTruncated>"));
        assert!(!xml.contains("NextContinuationToken"));
        let xml = page_xml("b", "huge/", 0, 1000, 2500, 1000);
        assert!(xml.contains("<NextContinuationToken>1000</NextContinuationToken>"));
    }
}
