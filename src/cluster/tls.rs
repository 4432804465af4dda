//! tls: who may serve bytes to a peer, and the encryption of internal traffic.
//!
//! Every cluster listener speaks TLS 1.3 (AES-GCM suites only: hardware accelerated), with the
//! aws-lc-rs provider named explicitly, so no process-wide default provider is ever consulted.
//! Two ways to know a peer:
//!
//! * **Derived from the secret** (the default, no PKI): HKDF-SHA256 of the secret with a fixed
//!   salt and label gives an Ed25519 seed; every member presents the same self-signed certificate
//!   for that key (name [`DERIVED_SERVER_NAME`]), and a client accepts only a server presenting
//!   exactly that public key ([`PinnedKey`]), whose handshake signature rustls then checks with
//!   it. Who lacks the secret cannot finish a handshake, so none of its bytes is ever read.
//! * **Operator certificates** (`tls_cert`, `tls_key`, `tls_ca`): the server presents that chain;
//!   the client verifies it against `tls_ca` (webpki) for the name `tls_server_name`, or, without
//!   it, for the peer's own host (DNS name or IP address, as written in the peer set).
//!
//! Either way a 200 answer must also carry the secret's proof (`auth::response_proof`), checked
//! by `client` before any byte is released. No client certificates: requests are signed.
//!
//! Owns the identities, the rustls configs and the client connector. Must not touch HTTP, the
//! peer set, or the request signature.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
};
use sha2::{Digest as _, Sha256};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use zeroize::Zeroize as _;

use super::auth::Secret;
use super::ClusterError;
use crate::config::cluster::ClusterConfig;
use crate::peer::PeerAddr;

/// The name in the secret-derived certificate, and the name its clients ask for.
pub const DERIVED_SERVER_NAME: &str = "orcafs-cluster";
/// Domain separation: the TLS key is never the HMAC key, nor derived like anything else.
const DERIVE_SALT: &[u8] = b"orcafs cluster tls v1";
const DERIVE_INFO: &[u8] = b"ed25519 server identity";

/// The TLS side of one cluster member: what its listener presents, how its client checks peers.
#[derive(Clone)]
pub(crate) struct Tls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// What `client` checks a server's certificate with.
    verifier: Arc<dyn ServerCertVerifier>,
    /// The name the client checks: fixed, or None for the peer's own host.
    server_name: Option<ServerName<'static>>,
    /// SHA-256 of the server's public key (public, safe to log): equal on hosts that share the
    /// secret, in derived mode.
    pub fingerprint: String,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// aws-lc-rs with the TLS 1.3 AES-GCM suites only (AES-128 first: the faster of the two).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384,
    };
    Arc::new(CryptoProvider {
        cipher_suites: vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

fn tls_err(what: &'static str) -> impl FnOnce(rustls::Error) -> ClusterError {
    move |e| ClusterError::Tls {
        what,
        reason: e.to_string(),
    }
}

impl Tls {
    /// The configured identity: operator certificates when `tls_cert` is set, else the one
    /// derived from the secret. `me` is this host's name in the peer set: an operator
    /// certificate must pass the check its peers will make, or the host does not start.
    pub(crate) fn from_config(
        cfg: &ClusterConfig,
        secret: &Secret,
        me: &PeerAddr,
    ) -> Result<Tls, ClusterError> {
        match (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca) {
            (None, None, None) => {
                if let Some(name) = &cfg.tls_server_name {
                    return Err(super::config_err(
                        "tls_server_name",
                        name.as_str(),
                        "only checked with operator certificates; set tls_cert, tls_key and tls_ca",
                    ));
                }
                Tls::derived(secret)
            }
            (Some(cert), Some(key), Some(ca)) => {
                let name = cfg.tls_server_name.as_ref().map(|n| n.to_server_name());
                Tls::operator(cert, key, ca, name, me)
            }
            _ => Err(super::config_err(
                "tls_cert",
                cfg.tls_cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                "give tls_cert, tls_key and tls_ca together, or none of them",
            )),
        }
    }

    /// The identity every holder of `secret` shares.
    pub(crate) fn derived(secret: &Secret) -> Result<Tls, ClusterError> {
        let (cert, key, spki) = derived_identity(secret)?;
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = Arc::new(PinnedKey {
            spki: spki.clone(),
            algs: provider.signature_verification_algorithms,
        });
        Ok(Tls {
            client: client_config(provider.clone(), verifier.clone())?,
            server: server_config(provider, vec![cert], key)?,
            verifier,
            server_name: Some(ServerName::try_from(DERIVED_SERVER_NAME).map_err(|e| {
                ClusterError::Tls {
                    what: "server name",
                    reason: e.to_string(),
                }
            })?),
            fingerprint: fingerprint(&spki),
        })
    }

    fn operator(
        cert_path: &Path,
        key_path: &Path,
        ca_path: &Path,
        server_name: Option<ServerName<'static>>,
        me: &PeerAddr,
    ) -> Result<Tls, ClusterError> {
        let file_err = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |e: &dyn fmt::Display| ClusterError::TlsFile {
                what,
                path,
                reason: e.to_string(),
            }
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| file_err("tls_cert", cert_path)(&e))?;
        if chain.is_empty() {
            return Err(file_err("tls_cert", cert_path)(&"no certificate in it"));
        }
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| file_err("tls_key", key_path)(&e))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in
            CertificateDer::pem_file_iter(ca_path).map_err(|e| file_err("tls_ca", ca_path)(&e))?
        {
            let ca = ca.map_err(|e| file_err("tls_ca", ca_path)(&e))?;
            roots.add(ca).map_err(|e| file_err("tls_ca", ca_path)(&e))?;
        }
        if roots.is_empty() {
            return Err(file_err("tls_ca", ca_path)(&"no certificate in it"));
        }
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| file_err("tls_ca", ca_path)(&e))?;
        let spki = ParsedCertificate::try_from(&chain[0])
            .map_err(|e| file_err("tls_cert", cert_path)(&e))?
            .subject_public_key_info();
        let tls = Tls {
            client: client_config(provider.clone(), verifier.clone())?,
            server: server_config(provider, chain.clone(), key)
                .map_err(|e| file_err("tls_key", key_path)(&e))?,
            verifier,
            server_name,
            fingerprint: fingerprint(&spki),
        };
        // The check every peer will make of this host, made first here.
        let name = tls
            .name_for(me)
            .map_err(|e| file_err("tls_cert", cert_path)(&e))?;
        tls.verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| {
                let why = format!("peers will refuse it as {name:?}: {e}");
                file_err("tls_cert", cert_path)(&why)
            })?;
        Ok(tls)
    }

    /// The name checked in `peer`'s certificate.
    fn name_for(&self, peer: &PeerAddr) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = match peer.as_str().rsplit_once(':') {
            Some((host, _port)) => host,
            None => peer.as_str(),
        };
        host_name(host)
    }

    /// An HTTPS connector for hyper's client that speaks this TLS over `tcp`.
    pub(crate) fn connector(&self, tcp: HttpConnector) -> TlsConnector {
        TlsConnector {
            tcp,
            tls: tokio_rustls::TlsConnector::from(self.client.clone()),
            tls_self: self.clone(),
        }
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }
}

/// A host as written in a URI or a peer address (`[::1]` included) as a TLS server name.
fn host_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(bare.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

fn client_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<Arc<ClientConfig>, ClusterError> {
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("client"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn server_config(
    provider: Arc<CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, ClusterError> {
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("server"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls_err("server key"))?;
    Ok(Arc::new(config))
}

fn fingerprint(spki: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(spki)))
}

/// The secret's certificate, private key and public key (SPKI DER). Deterministic: the same
/// secret gives the same bytes on every host.
fn derived_identity(
    secret: &Secret,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>, Vec<u8>), ClusterError> {
    use aws_lc_rs::hkdf;
    let derive_err = |what: &'static str| ClusterError::Tls {
        what,
        reason: "key derivation failed".into(),
    };
    let mut seed = [0u8; 32];
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, DERIVE_SALT).extract(secret.bytes());
    let okm = prk
        .expand(&[DERIVE_INFO], hkdf::HKDF_SHA256)
        .map_err(|_| derive_err("hkdf"))?;
    okm.fill(&mut seed).map_err(|_| derive_err("hkdf"))?;
    let pair = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&seed);
    seed.zeroize();
    let pkcs8 = pair
        .map_err(|_| derive_err("ed25519 key"))?
        .to_pkcs8v1()
        .map_err(|_| derive_err("ed25519 key"))?;
    let pkcs8 = PrivatePkcs8KeyDer::from(pkcs8.as_ref().to_vec());
    let rcgen_err = |e: rcgen::Error| ClusterError::Tls {
        what: "certificate",
        reason: e.to_string(),
    };
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
        .map_err(rcgen_err)?;
    let mut params =
        rcgen::CertificateParams::new(vec![DERIVED_SERVER_NAME.to_string()]).map_err(rcgen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "orcafs cluster");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).map_err(rcgen_err)?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8), spki))
}

/// Why a pinned check failed: worth one clear line in the log.
#[derive(Debug, thiserror::Error)]
#[error("not the key derived from the cluster secret (another secret, or not a member)")]
struct NotTheClusterKey;

/// Accepts exactly one public key, whatever the certificate around it says (name, dates,
/// issuer): the key is the identity, and only holders of the secret have its private half.
#[derive(Debug)]
struct PinnedKey {
    spki: Vec<u8>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        if cert.subject_public_key_info().as_ref() == self.spki.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(NotTheClusterKey)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only; never reached.
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// ------------------------------------------------------------------ client connector

/// hyper's connector for `https://peer/…`: TCP (nodelay, connect timeout) then a TLS handshake
/// checked by [`Tls`]. Its errors say which of the two failed ([`ConnectError`]).
#[derive(Clone)]
pub(crate) struct TlsConnector {
    tcp: HttpConnector,
    tls: tokio_rustls::TlsConnector,
    tls_self: Tls,
}

/// Why a connection to a peer was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("{0}")]
    Tcp(Box<dyn std::error::Error + Send + Sync>),
    /// The peer is there but did not prove the cluster's identity (or closed the handshake).
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("no TLS server name for {0}")]
    Name(String),
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TlsConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        self.tcp
            .poll_ready(cx)
            .map_err(|e| ConnectError::Tcp(Box::new(e)))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let name = match &self.tls_self.server_name {
            Some(name) => Ok(name.clone()),
            None => uri
                .host()
                .ok_or_else(|| uri.to_string())
                .and_then(host_name),
        };
        let tcp = self.tcp.call(uri);
        let tls = self.tls.clone();
        Box::pin(async move {
            let name = name.map_err(ConnectError::Name)?;
            let tcp = tcp
                .await
                .map_err(|e| ConnectError::Tcp(Box::new(e)))?
                .into_inner();
            // rustls reads the socket 4 KiB at a time: a buffer below it makes that one read
            // per 256 KiB of a fill's body.
            let tcp = tokio::io::BufReader::with_capacity(READ_BUFFER, tcp);
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(ConnectError::Handshake)?;
            Ok(TlsConn(TokioIo::new(stream)))
        })
    }
}

/// A TLS connection to a peer, as hyper's client reads and writes it.
pub(crate) struct TlsConn(TokioIo<tokio_rustls::client::TlsStream<BufReader<TcpStream>>>);

/// What a peer connection reads from its socket at once.
const READ_BUFFER: usize = 256 << 10;

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::from_bytes(text.as_bytes())
    }

    #[test]
    fn the_derived_identity_is_a_function_of_the_secret() {
        let (cert_a, _, spki_a) = derived_identity(&secret("0123456789abcdef-one")).unwrap();
        let (cert_b, _, spki_b) = derived_identity(&secret("0123456789abcdef-one")).unwrap();
        let (_, _, spki_c) = derived_identity(&secret("0123456789abcdef-two")).unwrap();
        assert_eq!(spki_a, spki_b);
        assert_eq!(
            cert_a, cert_b,
            "the certificate too is the same on every host"
        );
        assert_ne!(spki_a, spki_c);
        // The certificate carries the derived key.
        let parsed = ParsedCertificate::try_from(&cert_a).unwrap();
        assert_eq!(parsed.subject_public_key_info().as_ref(), spki_a.as_slice());
    }

    #[test]
    fn the_pin_accepts_only_the_secrets_key() {
        let tls = Tls::derived(&secret("0123456789abcdef-one")).unwrap();
        let (own, _, _) = derived_identity(&secret("0123456789abcdef-one")).unwrap();
        let (other, _, _) = derived_identity(&secret("0123456789abcdef-two")).unwrap();
        let stranger = rcgen::generate_simple_self_signed(vec![DERIVED_SERVER_NAME.into()])
            .unwrap()
            .cert;
        let name = ServerName::try_from(DERIVED_SERVER_NAME).unwrap();
        let check = |cert: &CertificateDer<'_>| {
            tls.verifier
                .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
                .is_ok()
        };
        assert!(check(&own));
        assert!(!check(&other));
        assert!(!check(stranger.der()));
        assert!(tls.fingerprint.starts_with("sha256:"));
    }

    #[test]
    fn server_names_of_peer_hosts() {
        assert_eq!(
            host_name("10.0.0.1").unwrap(),
            ServerName::IpAddress("10.0.0.1".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            host_name("[::1]").unwrap(),
            ServerName::IpAddress("::1".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            host_name("peer.example").unwrap(),
            ServerName::try_from("peer.example").unwrap()
        );
        assert!(host_name("bad name").is_err());
    }
}
