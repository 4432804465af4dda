//! Classification of path-style S3 requests from method, path and query alone.

use http::{Method, Uri};

/// What a request is, as far as counters and fault injection care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    GetObject,
    HeadObject,
    List,
    Put,
    Other,
}

/// Query parameters that turn a GET on an object key into something other
/// than GetObject (a listing, or a sub-resource such as tags or parts).
const NON_GET_OBJECT_QUERY: &[&str] = &[
    "list-type",
    "uploadId",
    "tagging",
    "acl",
    "attributes",
    "retention",
    "legal-hold",
    "torrent",
];

/// Classifies a path-style request: `/` is the service, `/bucket` and
/// `/bucket/` are bucket-level, `/bucket/key...` is object-level.
pub(crate) fn classify(method: &Method, uri: &Uri) -> RequestKind {
    let scope = Scope::of(uri.path());
    match *method {
        Method::GET if scope == Scope::Object && !has_any_param(uri, NON_GET_OBJECT_QUERY) => {
            RequestKind::GetObject
        }
        Method::GET if scope == Scope::Bucket || has_any_param(uri, &["list-type"]) => {
            RequestKind::List
        }
        Method::HEAD if scope == Scope::Object => RequestKind::HeadObject,
        Method::PUT => RequestKind::Put,
        _ => RequestKind::Other,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Service,
    Bucket,
    Object,
}

impl Scope {
    fn of(path: &str) -> Scope {
        let path = path.strip_prefix('/').unwrap_or(path);
        match path.split_once('/') {
            _ if path.is_empty() => Scope::Service,
            None | Some((_, "")) => Scope::Bucket,
            Some(_) => Scope::Object,
        }
    }
}

/// Whether the query string has a parameter named like one of `names`
/// (with or without a value).
fn has_any_param(uri: &Uri, names: &[&str]) -> bool {
    let Some(query) = uri.query() else {
        return false;
    };
    query
        .split('&')
        .map(|pair| pair.split_once('=').map_or(pair, |(name, _)| name))
        .any(|name| names.contains(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: Method, uri: &str) -> RequestKind {
        classify(&method, &uri.parse().expect("test uri"))
    }

    #[test]
    fn classifies_path_style_requests() {
        use RequestKind::*;
        assert_eq!(kind(Method::GET, "/b/k?x-id=GetObject"), GetObject);
        assert_eq!(kind(Method::GET, "/b/dir/k%20x"), GetObject);
        assert_eq!(kind(Method::GET, "/b?list-type=2&prefix=a"), List);
        assert_eq!(kind(Method::GET, "/b/?list-type=2"), List);
        assert_eq!(kind(Method::GET, "/b/k?list-type=2"), List);
        assert_eq!(kind(Method::GET, "/b/k?tagging"), Other);
        assert_eq!(kind(Method::GET, "/b?location"), List);
        assert_eq!(kind(Method::GET, "/"), Other);
        assert_eq!(kind(Method::HEAD, "/b/k"), HeadObject);
        assert_eq!(kind(Method::HEAD, "/b"), Other);
        assert_eq!(kind(Method::PUT, "/b/k"), Put);
        assert_eq!(kind(Method::PUT, "/b"), Put);
        assert_eq!(kind(Method::DELETE, "/b/k"), Other);
        assert_eq!(kind(Method::POST, "/b?delete"), Other);
    }
}
