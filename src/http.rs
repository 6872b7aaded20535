//! HTTP(S) client plumbing: hyper over rustls with the ring provider. Trust
//! comes from the system roots, or only from a given CA file.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("tls-config: {0}")]
    TlsConfig(String),
    #[error("bad-url: {0}")]
    BadUrl(String),
    #[error("connect: {0}")]
    Connect(String),
    #[error("body: {0}")]
    Body(String),
}

pub type HttpsClient<B> = Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// Where every TLS client in fleetd starts: rustls on the ring provider,
/// with the safe protocol versions.
pub fn ring_client_builder(
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, HttpError> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::TlsConfig(e.to_string()))
}

/// Every certificate of a PEM file, as trust roots; errors name the file.
pub fn roots_from_pem(path: &Path) -> Result<rustls::RootCertStore, HttpError> {
    let named = |e: &dyn std::fmt::Display| HttpError::TlsConfig(format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| named(&e))? {
        roots.add(cert.map_err(|e| named(&e))?).map_err(|e| named(&e))?;
    }
    Ok(roots)
}

/// A rustls client configuration trusting `ca_file` alone, or else the system roots.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, HttpError> {
    let roots = match ca_file {
        Some(path) => roots_from_pem(path)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            roots
        }
    };
    if roots.is_empty() {
        return Err(HttpError::TlsConfig("no trusted CA certificates".into()));
    }
    Ok(ring_client_builder()?.with_root_certificates(roots).with_no_client_auth())
}

/// A configuration for plain-http use, where no certificate is ever checked.
pub fn plain_tls_config() -> Result<rustls::ClientConfig, HttpError> {
    Ok(ring_client_builder()?.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth())
}

/// The most a connection buffers from the socket at once.
pub const MAX_READ_BUFFER: usize = 64 << 10;

pub fn client<B>(tls: rustls::ClientConfig) -> HttpsClient<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    // hyper's read buffer grows to 400 KiB on a fast stream; 64 KiB reads
    // keep the install's memory down at no measurable cost in speed.
    Client::builder(TokioExecutor::new()).http1_max_buf_size(MAX_READ_BUFFER).build(connector)
}
