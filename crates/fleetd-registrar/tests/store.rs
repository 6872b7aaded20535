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
    check_crl
);
