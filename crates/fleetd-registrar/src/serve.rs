//! `fleetctl registrar serve`: the App (database, CA, settings), the accept
//! loop (plain HTTP on loopback only, else TLS with rustls/ring), bounded
//! waits, the daily CRL, and a graceful end on the shutdown future.

use crate::app::App;
use crate::config::{Config, TlsConfig};
use crate::db;
use crate::error::{RegistrarError, Result};
use crate::files::read_text;
use crate::http::{self, Peer};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// The request header must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(300);
pub const MAX_CONNECTIONS: usize = 512;
/// In-flight requests get this long after the shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The CRL is made again at least this often (it promises a week).
pub const CRL_PERIOD: Duration = Duration::from_secs(12 * 3600);

/// The TLS acceptor for `[tls]` (rustls with ring; ES256/P-256 or RSA certificates).
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| RegistrarError::TlsInvalid(format!("{what}: {e}"));
    let cert_pem = read_text(&tls.cert)?;
    let key_pem = crate::files::read_private_key(&tls.key)?;
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(&tls.cert.display().to_string(), &e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| invalid(&tls.key.display().to_string(), &e))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("protocol versions", &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| invalid("certificate and key", &e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Everything `fleetctl registrar serve` does: connect, make the CRL,
/// listen, print `registrar: listening on ADDR` on stderr, serve until
/// `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let app = Arc::new(App::new(&config).await?);
    app.regenerate_crl().await?;
    let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
    let addr = config.listen_addr();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RegistrarError::File { path: PathBuf::from(&config.listen), source })?;
    let local = listener
        .local_addr()
        .map_err(|source| RegistrarError::File { path: PathBuf::from(&config.listen), source })?;
    eprintln!("registrar: listening on {local}");
    let crl_worker = tokio::spawn(app.clone().crl_worker());
    let timer = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CRL_PERIOD).await;
                if let Err(e) = app.regenerate_crl().await {
                    eprintln!("registrar: the periodic CRL: {e}");
                }
                if let Err(e) = crate::claims::forget_expired(&app.db, db::now()).await {
                    eprintln!("registrar: forgetting expired tokens and claims: {e}");
                }
            }
        })
    };
    serve(app, listener, tls, shutdown).await;
    timer.abort();
    // A CRL still pending is made at the next start (the database holds
    // the revocations).
    crl_worker.abort();
    eprintln!("registrar: stopped");
    Ok(())
}

/// The accept loop. A connection's failure is logged inside it and never
/// ends the loop.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let router = http::router(app);
    let mut tasks = JoinSet::new();
    // At most MAX_CONNECTIONS at once: beyond that the loop stops accepting
    // and the kernel's backlog holds the rest (as mini-redis does), rather
    // than accepting and resetting them.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("registrar: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (router, tls) = (router.clone(), tls.clone());
        tasks.spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(CONNECTION_LIMIT, connection(stream, peer, router, tls)).await;
        });
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

async fn connection(stream: TcpStream, peer: SocketAddr, router: axum::Router, tls: Option<TlsAcceptor>) {
    use tower::ServiceExt;
    let service = router.map_request(move |mut request: axum::http::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(Peer(peer.ip()));
        request
    });
    let service = TowerToHyperService::new(service);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let result = match tls {
        Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => builder.serve_connection(TokioIo::new(stream), service).await,
            _ => return,
        },
        None => builder.serve_connection(TokioIo::new(stream), service).await,
    };
    if let Err(e) = result {
        if !e.is_incomplete_message() {
            tracing::debug!("registrar: connection from {peer}: {e}");
        }
    }
}
