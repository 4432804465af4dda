//! secret: a fleet secret read from a file (`[cluster] secret_file`, `[shared_cache]
//! secret_file`), and the keys derived from it.
//!
//! Owns reading the file (trimmed of surrounding whitespace, refused when empty, a warning when
//! short or world-readable) and [`Secret::derive`], so that each use of a secret (cluster request
//! signatures, shared store objects) can have a key of its own. Neither the secret nor a derived
//! key is ever logged: their Debug is redacted. Must not know who uses them: `cluster` and
//! `cachestore` import this, never the other way.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a secret file could not be used (safe to log: names the file, never its content).
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret file {path} is empty")]
    Empty { path: PathBuf },
}

/// A shared secret. Its Debug never shows it.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Secret {
    /// The file's content without surrounding whitespace (so `echo … > file` works).
    pub fn read(path: &Path) -> Result<Secret, SecretError> {
        let raw = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
        let trimmed = raw.trim_ascii();
        if trimmed.is_empty() {
            return Err(SecretError::Empty {
                path: path.to_owned(),
            });
        }
        if trimmed.len() < 16 {
            tracing::warn!(path = %path.display(), "the secret in this file is shorter than 16 bytes");
        }
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o004 != 0 {
                    tracing::warn!(path = %path.display(), "the secret file is readable by every user");
                }
            }
        }
        Ok(Secret(trimmed.into()))
    }

    /// A secret given as bytes (tests, and callers that hold one already).
    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret(bytes.into())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// A 32-byte key for one use of the secret: HMAC-SHA256 keyed with the secret over `label`
    /// (the one-block HKDF-Expand with the secret as pseudorandom key), so that a key leaked
    /// from one use reveals neither the secret nor the keys of other uses.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        // HMAC takes keys of any length.
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        m.update(label.as_bytes());
        m.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_trims_refuses_empty_and_derives_distinct_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "  0123456789abcdef\n").unwrap();
        let s = Secret::read(&path).unwrap();
        assert_eq!(s.bytes(), b"0123456789abcdef");
        assert_eq!(format!("{s:?}"), "Secret(redacted)");
        assert_ne!(s.derive("a"), s.derive("b"));
        assert_eq!(
            s.derive("a"),
            Secret::from_bytes(b"0123456789abcdef").derive("a")
        );
        assert_ne!(s.derive("a"), Secret::from_bytes(b"another").derive("a"));

        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            Secret::read(&path),
            Err(SecretError::Empty { .. })
        ));
        let e = Secret::read(&dir.path().join("absent")).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
