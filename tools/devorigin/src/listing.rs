//! ETags in listings. S3 (and Garage, MinIO, …) list every object with its ETag; s3s-fs leaves
//! the ETag out of ListObjects responses. A client that trusts listed ETags (orcafs opens a file
//! it has seen in a listing without a HEAD) would take a different path against this server
//! than against a real one, so the ETag s3s-fs keeps beside each object is put back into the
//! listing's XML here.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The listing body with `<ETag>` added to each `<Contents>` whose object has a stored ETag.
pub(crate) fn with_etags(root: &Path, bucket: &str, xml: &str) -> String {
    let mut out = String::with_capacity(xml.len() + xml.len() / 4);
    let mut rest = xml;
    while let Some(at) = rest.find("<Contents>") {
        let (before, contents) = rest.split_at(at);
        out.push_str(before);
        let Some(end) = contents.find("</Contents>") else {
            break;
        };
        let (entry, after) = contents.split_at(end);
        out.push_str(&entry_with_etag(root, bucket, entry));
        rest = after;
    }
    out.push_str(rest);
    out
}

fn entry_with_etag(root: &Path, bucket: &str, entry: &str) -> String {
    if entry.contains("<ETag>") {
        return entry.to_string();
    }
    let key = between(entry, "<Key>", "</Key>").map(unescape);
    match key.and_then(|k| stored_etag(root, bucket, &k)) {
        Some(etag) => format!(
            "{entry}<ETag>&quot;{}&quot;</ETag>",
            escape(etag.trim_matches('"'))
        ),
        None => entry.to_string(),
    }
}

/// The ETag s3s-fs saved when the object was written (its "internal info" file).
fn stored_etag(root: &Path, bucket: &str, key: &str) -> Option<String> {
    let name = format!(
        ".bucket-{}.object-{}.internal.json",
        URL_SAFE_NO_PAD.encode(bucket),
        URL_SAFE_NO_PAD.encode(key)
    );
    let text = std::fs::read_to_string(root.join(name)).ok()?;
    let info: serde_json::Value = serde_json::from_str(&text).ok()?;
    info.get("e_tag")?.as_str().map(str::to_string)
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = s.find(open)? + open.len();
    let len = s[start..].find(close)?;
    Some(&s[start..start + len])
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_stored_etag_after_each_listed_key() {
        let dir = tempfile::tempdir().unwrap();
        let info = format!(
            ".bucket-{}.object-{}.internal.json",
            URL_SAFE_NO_PAD.encode("b"),
            URL_SAFE_NO_PAD.encode("a&b")
        );
        std::fs::write(dir.path().join(info), r#"{"e_tag":"abc-2"}"#).unwrap();
        let xml = "<R><Contents><Key>a&amp;b</Key><Size>1</Size></Contents>\
                   <Contents><Key>none</Key></Contents><Prefix>x</Prefix></R>";
        assert_eq!(
            with_etags(dir.path(), "b", xml),
            "<R><Contents><Key>a&amp;b</Key><Size>1</Size><ETag>&quot;abc-2&quot;</ETag></Contents>\
             <Contents><Key>none</Key></Contents><Prefix>x</Prefix></R>"
        );
    }
}
