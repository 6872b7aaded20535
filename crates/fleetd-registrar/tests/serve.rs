//! The server over real sockets: TLS with a P-256 certificate, and a 10 MB
//! body refused by name without being stored.

use fleetd_registrar::config::TlsConfig;
use fleetd_registrar::testing::{sqlite_url, Fixture, TempDir};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn server_cert(dir: &std::path::Path) -> (TlsConfig, String) {
    use std::os::unix::fs::PermissionsExt;
    let (ca_cert, ca_key) = fleetd_registrar::ca::test_ca::make_ca();
    let ca_key = rcgen::KeyPair::from_pem(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let tls = TlsConfig { cert: dir.join("tls.pem"), key: dir.join("tls.key.pem") };
    std::fs::write(&tls.cert, cert.pem()).unwrap();
    std::fs::write(&tls.key, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&tls.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (tls, ca_cert)
}

async fn read_all(mut stream: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_and_a_huge_body_is_refused_by_name() {
    let dir = TempDir::new();
    let f = Fixture::new(&sqlite_url(&dir.0)).await;
    let (tls, ca_pem) = server_cert(&dir.0);
    let acceptor = fleetd_registrar::serve::tls_acceptor(&tls).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fleetd_registrar::serve::serve(
        f.app.clone(),
        listener,
        Some(acceptor),
        std::future::pending(),
    ));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    stream.write_all(b"GET /v1/crl HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let answer = read_all(stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("-----BEGIN X509 CRL-----"), "{answer}");

    // Plain HTTP on the same TLS port gets nothing.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET /v1/crl HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(!read_all(plain).await.contains("BEGIN X509 CRL"));

    // A 10 MB body over plain HTTP (a second server, loopback).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(fleetd_registrar::serve::serve(f.app.clone(), listener, None, std::future::pending()));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let size = 10 << 20;
    let head = format!(
        "POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The answer comes before the body is sent.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""error":"body-too-large""#), "{answer}");
    let certificates: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT COUNT(*) FROM certificates").fetch_one(&f.db().pool).await.unwrap(),
        0,
    )
    .unwrap();
    assert_eq!(certificates, 0);
}
