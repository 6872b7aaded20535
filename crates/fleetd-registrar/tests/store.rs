//! The store's checks (`fleetd_registrar::testing`) on SQLite; the same
//! functions take a PostgreSQL URL.

use fleetd_registrar::testing::{self, sqlite_url, TempDir};

macro_rules! on_sqlite {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let dir = TempDir::new();
            testing::$name(&sqlite_url(&dir.0)).await;
        }
    )*};
}

on_sqlite!(
    check_import,
    check_claims,
    check_enroll,
    check_renew,
    check_login,
    check_bad_input,
    check_audit,
    check_crl,
    check_rollouts
);

fn this_update(pem: &str) -> i64 {
    use x509_parser::prelude::FromDer;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&pem.contents).unwrap();
    crl.last_update().timestamp()
}

/// A broker that reloads its CRL file (mosquitto on SIGHUP) keeps the CRLs
/// it loaded and trusts the one with the latest thisUpdate, to the second:
/// CRLs made in one second must still be ordered, and none may be dated in
/// the future when it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crls_in_quick_succession_have_increasing_this_update_never_ahead() {
    let dir = TempDir::new();
    let f = testing::Fixture::new(&sqlite_url(&dir.0)).await;
    let mut last = 0;
    for _ in 0..3 {
        f.app.regenerate_crl().await.unwrap();
        let written = this_update(&std::fs::read_to_string(&f.config.crl_file).unwrap());
        assert!(written > last, "{written} after {last}");
        assert!(written <= fleetd_registrar::db::now(), "dated ahead of the clock");
        last = written;
    }
}
