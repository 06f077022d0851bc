//! TLS. Inbound: the public listener's certificate and key (PEM), HTTP/2 and HTTP/1.1 by ALPN,
//! rustls with the ring provider. The server configuration sits behind an atomic pointer so a
//! reload (SIGHUP) swaps in new certificates for new connections without touching open ones.
//!
//! With `tls_client_ca_file`, clients may present a certificate signed by that CA; its
//! subject CN and DNS SANs are handed to authentication ([`PeerCertificate`]), which maps them
//! to a `[[clients]]` entry with that `cert_subject`. A certificate is optional: clients
//! without one authenticate with their key as usual; a certificate that does not verify
//! fails the handshake.
//!
//! Outbound: [`upstream_client_config`], the roots Graph's certificate is checked against.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::config::TlsConfig;
use crate::metrics::{Listener, Metrics};

/// How often the certificate, key and client CA files are checked for changes.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(3);

/// The current rustls server configuration and the files it was read from; replaced on
/// reload (SIGHUP) and when the files change ([`Reloadable::watch_files`]).
pub struct Reloadable {
    current: ArcSwap<ServerConfig>,
    files: Mutex<TlsConfig>,
}

impl Reloadable {
    pub fn load(cfg: &TlsConfig) -> Result<Reloadable, String> {
        Ok(Reloadable {
            current: ArcSwap::new(server_config(cfg)?),
            files: Mutex::new(cfg.clone()),
        })
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Swaps in `config`, read from `files`.
    pub fn replace(&self, config: Arc<ServerConfig>, files: &TlsConfig) {
        self.current.store(config);
        *self.files.lock().unwrap_or_else(|e| e.into_inner()) = files.clone();
    }

    fn files(&self) -> TlsConfig {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Keeps the certificate current without a SIGHUP: every [`FILE_CHECK_INTERVAL`] the
    /// files' modification times and sizes are compared with the last seen, and on a change
    /// they are read again (cert-manager and Kubernetes Secret volumes replace files in
    /// place). Files that do not load (a half-written pair) leave the current certificate
    /// in use and are tried again on their next change. Sets the leaf certificate's expiry in
    /// `graphgate_tls_cert_expiry_timestamp_seconds`. Stops when the server drops `self`.
    pub fn watch_files(self: &Arc<Self>, metrics: Arc<Metrics>) {
        let files = self.files();
        record_expiry(&metrics, &files);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = Arc::downgrade(self);
        let mut seen = (stamps(&files), files);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(FILE_CHECK_INTERVAL).await;
                let Some(tls) = me.upgrade() else { return };
                let files = tls.files();
                let now = (stamps(&files), files);
                if now == seen {
                    continue;
                }
                seen = now;
                let files = &seen.1;
                match server_config(files) {
                    Ok(config) => {
                        tls.current.store(config);
                        record_expiry(&metrics, files);
                        tracing::info!("TLS certificate files changed: reloaded");
                    }
                    Err(why) => tracing::error!(
                        reason = why,
                        "TLS certificate files changed but do not load; keeping the current certificate"
                    ),
                }
            }
        });
    }
}

/// Modification time and size of each file (`None` where it cannot be read).
type FileStamp = Option<(SystemTime, u64)>;

fn stamps(cfg: &TlsConfig) -> Vec<FileStamp> {
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let mut out = vec![stamp(&cfg.cert_file), stamp(&cfg.key_file)];
    if let Some(ca) = &cfg.client_ca_file {
        out.push(stamp(ca));
    }
    out
}

/// Sets the expiry gauge from the first (leaf) certificate of the chain.
fn record_expiry(metrics: &Metrics, cfg: &TlsConfig) {
    match leaf_not_after(&cfg.cert_file) {
        Ok(t) => metrics
            .tls
            .cert_expiry
            .with_label_values(&[Listener::Public.as_str()])
            .set(t),
        Err(why) => tracing::warn!(reason = why, "cannot read the certificate's expiry"),
    }
}

/// notAfter of the leaf certificate in a PEM chain, as Unix time.
pub fn leaf_not_after(path: &Path) -> Result<i64, String> {
    let certs = read_certs(path, "server.tls_cert_file")?;
    let leaf = certs.first().ok_or("no certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("server.tls_cert_file {}: {e}", path.display()))?;
    Ok(cert.validity().not_after.timestamp())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The client configuration for calls to Graph: the public web PKI roots plus, with
/// `upstream.ca_file`, the CAs in that PEM file. ALPN is set by the connector.
pub fn upstream_client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for c in read_certs(path, "upstream.ca_file")? {
            roots
                .add(c)
                .map_err(|e| format!("upstream.ca_file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Reads the PEM files and builds a rustls server configuration.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(&cfg.cert_file, "server.tls_cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| {
        format!(
            "server.tls_key_file {}: {}",
            cfg.key_file.display(),
            describe_pem_error(&e)
        )
    })?;
    let verifier = match &cfg.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca, "server.tls_client_ca_file")? {
                roots
                    .add(c)
                    .map_err(|e| format!("server.tls_client_ca_file {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("server.tls_client_ca_file {}: {e}", ca.display()))?;
            Some(verifier)
        }
        None => None,
    };
    alpn_server_config(certs, key, verifier)
        .map_err(|e| format!("server.tls_cert_file/tls_key_file: {e}"))
}

/// A server configuration from a PEM certificate chain and key held in memory, without client
/// certificates: the simulated Graph API's TLS, and test servers.
pub fn server_config_from_pem(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("key: {}", describe_pem_error(&e)))?;
    alpn_server_config(certs, key, None).map_err(|e| format!("certificate/key: {e}"))
}

/// A PEM error without the file's content. The parser's own messages quote the section's
/// first line (a malformed start, or the label of a section that never ends), and in a key
/// file flattened onto one line that line is the whole private key.
fn describe_pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    const NOT_SHOWN: &str = "not shown: it may hold key material";
    match e {
        Error::IllegalSectionStart { .. } => {
            format!("a line starts like a PEM section but is not one ({NOT_SHOWN})")
        }
        Error::MissingSectionEnd { end_marker } => {
            let label = std::str::from_utf8(end_marker).ok().filter(|l| {
                l.len() <= 32 && l.bytes().all(|b| b.is_ascii_uppercase() || b == b' ')
            });
            match label {
                Some(l) => format!("the {l} section has no -----END {l}----- line"),
                None => format!("a section has no end line ({NOT_SHOWN})"),
            }
        }
        other => other.to_string(),
    }
}

/// rustls (ring, default protocol versions) serving HTTP/2 and HTTP/1.1 by ALPN; with a
/// verifier, clients may present a certificate.
fn alpn_server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?;
    let builder = match client_verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The names of a verified TLS client certificate (subject CN first, then DNS SANs), put
/// into each request's extensions by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    pub names: Vec<String>,
}

/// The names of the verified client certificate of a connection, if it presented one: the
/// subject's common names, then the DNS subject alternative names.
pub fn peer_certificate(conn: &ServerConnection) -> Option<PeerCertificate> {
    let cert = conn.peer_certificates()?.first()?;
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut names = common_names(parsed.subject());
    names.extend(parsed.valid_dns_names().map(str::to_string));
    Some(PeerCertificate { names })
}

/// Common names (OID 2.5.4.3) in the contents of a DER `Name` (a SEQUENCE OF RDN SETs of
/// AttributeTypeAndValue SEQUENCEs). Anything unexpected is skipped, never panics.
fn common_names(mut name: &[u8]) -> Vec<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let mut out = Vec::new();
    while let Some((tag, rdn, rest)) = der_next(name) {
        name = rest;
        if tag != 0x31 {
            continue;
        }
        let mut set = rdn;
        while let Some((tag, atv, rest)) = der_next(set) {
            set = rest;
            if tag != 0x30 {
                continue;
            }
            let Some((0x06, oid, value)) = der_next(atv) else {
                continue;
            };
            if oid != CN_OID {
                continue;
            }
            // UTF8String, PrintableString, TeletexString, IA5String.
            if let Some((0x0c | 0x13 | 0x14 | 0x16, v, _)) = der_next(value) {
                if let Ok(s) = std::str::from_utf8(v) {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

/// One DER TLV: (tag, contents, rest). Definite lengths up to 4 bytes.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (usize::from(len0), rest)
    } else {
        let n = usize::from(len0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_from_der() {
        // SET { SEQ { OID 2.5.4.6, PrintableString "NL" } }, SET { SEQ { OID 2.5.4.3, UTF8 "svc-a" } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'N', b'L', 0x31,
            0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b's', b'v', b'c', b'-',
            b'a',
        ];
        assert_eq!(common_names(&name), vec!["svc-a".to_string()]);
    }

    #[test]
    fn malformed_der_yields_nothing() {
        assert!(common_names(&[0x31, 0x7f, 0x30]).is_empty());
        assert!(common_names(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]).is_empty());
        assert!(common_names(&[]).is_empty());
    }
}
