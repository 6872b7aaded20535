//! The store's checks, written once and run against any database URL: the
//! crate's tests run them on SQLite; an integration test elsewhere may run
//! them on PostgreSQL (`check_*(url)`). Every check uses serials and user
//! names of its own, so they can share one database. Each panics on failure.

use crate::app::App;
use crate::ca::test_ca::{make_ca, make_csr};
use crate::config::Config;
use crate::db::{self, Db};
use crate::names::Role;
use crate::{audit, claims, devices, enroll, import, users};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetd_core::provision::enroll::{sign_renewal, ClaimCode, EnrollmentKey};
use fleetd_core::provision::identity::DeviceKey;
use fleetd_core::provision::pop::{Pop, POP_BYTES};
use serde_json::{json, Value};
use sqlx::Row;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("fleetd-registrar-{}", unique("t")));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `prefix` and 12 random hex digits.
pub fn unique(prefix: &str) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 6];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("random");
    format!("{prefix}-{}", crate::ca::hex(&bytes))
}

/// A SQLite URL for a file in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("registrar.db").display())
}

/// A registrar on `db_url` with a fresh CA, its files in a temporary
/// directory, its config loaded as `registrar serve` would.
pub struct Fixture {
    pub dir: TempDir,
    pub config: Config,
    pub app: Arc<App>,
    pub ca_cert_pem: String,
}

impl Fixture {
    pub async fn new(db_url: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let (ca_cert, ca_key) = make_ca();
        std::fs::write(dir.0.join("ca.pem"), &ca_cert).unwrap();
        std::fs::write(dir.0.join("ca.key.pem"), &ca_key).unwrap();
        std::fs::set_permissions(dir.0.join("ca.key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(dir.0.join("mqtt-ca.pem"), "MQTT CA PEM\n").unwrap();
        let config = format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"{db_url}\"\npublic_url = \"http://127.0.0.1\"\n\
             crl_file = \"crl.pem\"\n[ca]\ncert = \"ca.pem\"\nkey = \"ca.key.pem\"\n\
             [mqtt]\nhost = \"broker.test\"\nport = 8883\nca_file = \"mqtt-ca.pem\"\n"
        );
        std::fs::write(dir.0.join("registrar.toml"), config).unwrap();
        let config = Config::load(&dir.0.join("registrar.toml")).expect("config");
        let app = Arc::new(App::new(&config).await.expect("app"));
        app.regenerate_crl().await.expect("crl");
        tokio::spawn(app.clone().crl_worker());
        Fixture { dir, config, app, ca_cert_pem: ca_cert }
    }

    pub fn db(&self) -> &Db {
        &self.app.db
    }

    /// Imports `rows` (without header); panics unless all are valid.
    pub async fn import(&self, rows: &[String]) -> Vec<import::RowResult> {
        let text = format!("{}\n{}\n", import::HEADER, rows.join("\n"));
        let parsed = import::parse_csv(&text).unwrap();
        import::apply(self.db(), "test", &parsed, false, db::now()).await.unwrap()
    }

    /// A new device (no pop_key): its serial.
    pub async fn device(&self) -> String {
        let serial = unique("gw");
        self.import(&[format!("{serial},proj,hw,g1;g2,")]).await;
        serial
    }

    /// A new user with `role`: (name, bearer token).
    pub async fn user(&self, role: Role) -> (String, String) {
        let name = unique("user");
        users::add_user(self.db(), &name, role, "password1", db::now()).await.unwrap();
        let answer = users::login(self.db(), &name, "password1", 3600, db::now(), "test").await.unwrap();
        (name, answer.token)
    }

    /// A claim code for `serial`.
    pub async fn claim(&self, serial: &str) -> String {
        claims::create_claim(self.db(), "test", serial, 600, db::now()).await.unwrap().claim.claim
    }

    /// One request through the router: (status, JSON body or Null).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes) = self.call_raw(method, path, token, "application/json", body).await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn call_raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Vec<u8>) {
        use tower::ServiceExt;
        let mut request = Request::builder().method(method).uri(path).header("content-type", content_type);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(body.map(Body::from).unwrap_or_else(Body::empty)).unwrap();
        let response = crate::http::router(self.app.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, bytes.to_vec())
    }

    /// The device's certificates: (serial_hex, state).
    pub async fn certificates(&self, serial: &str) -> Vec<(String, String)> {
        devices::view(self.db(), serial)
            .await
            .unwrap()
            .certificates
            .into_iter()
            .map(|c| (c.serial, c.state))
            .collect()
    }
}

fn error_name(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("<no error>")
}

/// created / unchanged / conflict / invalid; a dry run writes nothing;
/// 10,000 rows in one transaction.
pub async fn check_import(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let (a, b) = (unique("gw"), unique("gw"));
    let key = EnrollmentKey::derive(&Pop::from_bytes([3; POP_BYTES]), &a).to_text();
    let text = format!(
        "{}\n{a},proj,hw,g1;g2,{key}\n{b},proj,hw,,\n{b},proj,hw,,\n{b},proj,other,,\n{b}';DROP TABLE devices;--,p,h,,\n{a},p,h\n",
        import::HEADER
    );
    let parsed = import::parse_csv(&text).unwrap();
    // A dry run: the same answers, nothing written.
    let dry = import::apply(f.db(), "test", &parsed, true, db::now()).await.unwrap();
    for serial in [&a, &b] {
        assert_eq!(
            devices::view(f.db(), serial).await.unwrap_err().name(),
            "serial-unknown",
            "dry run wrote {serial}"
        );
    }
    let results = import::apply(f.db(), "test", &parsed, false, db::now()).await.unwrap();
    assert_eq!(dry, results);
    let lines: Vec<String> = results.iter().map(|r| r.to_string()).collect();
    assert_eq!(lines[0], format!("2 {a} created"));
    assert_eq!(lines[1], format!("3 {b} created"));
    assert_eq!(lines[2], format!("4 {b} unchanged"));
    assert_eq!(lines[3], format!("5 {b} conflict"));
    assert!(lines[4].starts_with("6 - invalid: serial"), "{}", lines[4]);
    assert!(lines[5].starts_with(&format!("7 {a} invalid: 3 columns")), "{}", lines[5]);
    // Not overwritten by the conflict; the same file again is all unchanged.
    assert_eq!(devices::view(f.db(), &b).await.unwrap().hardware, "hw");
    let again = import::apply(f.db(), "test", &parsed, false, db::now()).await.unwrap();
    let outcomes: Vec<_> = again.iter().map(|r| r.outcome).collect();
    use import::Outcome::*;
    assert_eq!(outcomes, [Unchanged, Unchanged, Unchanged, Conflict, Invalid, Invalid]);

    // 10,000 rows: one transaction, one audit row.
    let imports_before = audit_actions(f.db(), "import").await;
    let prefix = unique("bulk");
    let mut big = String::from(import::HEADER);
    for i in 0..10_000 {
        big.push_str(&format!("\n{prefix}-{i},proj,hw,g,"));
    }
    let parsed = import::parse_csv(&big).unwrap();
    let started = std::time::Instant::now();
    let results = import::apply(f.db(), "test", &parsed, false, db::now()).await.unwrap();
    assert!(results.iter().all(|r| r.outcome == Created));
    assert_eq!(results.len(), 10_000);
    assert_eq!(audit_actions(f.db(), "import").await, imports_before + 1);
    let count: i64 = sqlx::query("SELECT COUNT(*) FROM devices WHERE serial LIKE $1")
        .bind(format!("{prefix}-%"))
        .fetch_one(&f.db().pool)
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(count, 10_000);
    eprintln!("10,000 rows imported in {:?}", started.elapsed());
}

async fn audit_actions(db: &Db, action: &str) -> usize {
    audit::list(db).await.unwrap().iter().filter(|e| e.action == action).count()
}

/// Claims: unknown serial 403, retired 409, no token 401, single use, expiry.
pub async fn check_claims(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let (_, token) = f.user(Role::Installer).await;
    let serial = f.device().await;
    let cases: [(Option<&str>, Value, StatusCode, &str); 4] = [
        (Some(&token), json!({"serial": unique("nope")}), StatusCode::FORBIDDEN, "serial-unknown"),
        (None, json!({"serial": serial}), StatusCode::UNAUTHORIZED, "unauthorized"),
        (Some("bogus"), json!({"serial": serial}), StatusCode::UNAUTHORIZED, "unauthorized"),
        (Some(&token), json!({"serial": "x' OR '1'='1"}), StatusCode::BAD_REQUEST, "serial-invalid"),
    ];
    for (token, body, status, name) in cases {
        let (got, answer) = f.call("POST", "/v1/claims", token, Some(body.clone())).await;
        assert_eq!((got, error_name(&answer)), (status, name), "{body}");
    }
    let (status, answer) = f.call("POST", "/v1/claims", Some(&token), Some(json!({"serial": serial}))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let code = answer["claim"].as_str().unwrap().to_string();
    assert!(ClaimCode::parse(&code).is_ok(), "{code}");
    assert!(answer["qr_svg"].as_str().unwrap().contains("<svg"));
    let expires_at = answer["expires_at"].as_i64().unwrap();
    assert!(expires_at > db::now() && expires_at <= db::now() + 1800);
    // Stored by digest only.
    let stored: i64 = sqlx::query("SELECT COUNT(*) FROM claims WHERE digest = $1 OR digest = $2")
        .bind(&code)
        .bind(code.replace('-', ""))
        .fetch_one(&f.db().pool)
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(stored, 0);

    // Single use.
    let (csr, _) = make_csr(&serial);
    let enroll = |claim: String| json!({"claim": claim, "csr_pem": csr});
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(enroll(code.clone()))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(enroll(code.clone()))).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "claim-invalid"), "second use");

    // Expired: made two hours ago.
    let old = claims::create_claim(f.db(), "test", &serial, 600, db::now() - 7200).await.unwrap().claim.claim;
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(enroll(old))).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "claim-invalid"), "expired");
    // Unknown claim.
    let unknown = ClaimCode::generate().unwrap().display_code();
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(enroll(unknown))).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "claim-invalid"), "unknown");

    // Retired: no claim, and a claim made before is void.
    let pending = f.claim(&serial).await;
    devices::revoke(f.db(), "test", &serial, true, "unspecified", db::now()).await.unwrap();
    let (status, answer) = f.call("POST", "/v1/claims", Some(&token), Some(json!({"serial": serial}))).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::CONFLICT, "device-retired"));
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(enroll(pending))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(f.certificates(&serial).await.iter().filter(|c| c.1 == "active").count(), 0);
}

/// Enrollment: the MAC when the row has a pop_key (missing or wrong: refused,
/// nothing issued), CN mismatch refused, a second enrollment supersedes the
/// first, exactly one active certificate, the answer's contents.
pub async fn check_enroll(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let serial = unique("gw");
    let key = EnrollmentKey::derive(&Pop::from_bytes([9; POP_BYTES]), &serial);
    f.import(&[format!("{serial},proj,hw,g1;g2,{}", key.to_text())]).await;
    let (csr, _) = make_csr(&serial);
    let code = f.claim(&serial).await;
    let claim = ClaimCode::parse(&code).unwrap();
    let other_key = EnrollmentKey::derive(&Pop::from_bytes([8; POP_BYTES]), &serial);
    let (other_csr, _) = make_csr(&serial);
    let refusals: [(Option<String>, &str); 4] = [
        (None, "no MAC"),
        (Some(other_key.mac(&claim, &csr)), "another device's key"),
        (Some(key.mac(&claim, &other_csr)), "a MAC over another CSR"),
        (Some("garbage".into()), "garbage"),
    ];
    for (mac, why) in refusals {
        let body = json!({"claim": code, "csr_pem": csr, "mac": mac});
        let (status, answer) = f.call("POST", "/v1/enroll", None, Some(body)).await;
        assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "claim-invalid"), "{why}");
        assert!(f.certificates(&serial).await.is_empty(), "{why}: nothing issued");
    }
    // CN mismatch.
    let (wrong_cn, _) = make_csr(&unique("gw"));
    let body = json!({"claim": code, "csr_pem": wrong_cn, "mac": key.mac(&claim, &wrong_cn)});
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(body)).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "claim-invalid"), "CN mismatch");
    // A bad CSR.
    let body = json!({"claim": code, "csr_pem": "not a CSR"});
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(body)).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::BAD_REQUEST, "csr-invalid"));
    assert!(f.certificates(&serial).await.is_empty());

    // The right MAC: enrolled.
    let body = json!({"claim": code, "csr_pem": csr, "mac": key.mac(&claim, &csr)});
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["chain_pem"], f.ca_cert_pem.as_str());
    assert_eq!(answer["mqtt"], json!({"host": "broker.test", "port": 8883, "ca_pem": "MQTT CA PEM\n"}));
    assert_eq!(answer["groups"], json!(["g1", "g2"]));
    assert!(answer["cert_pem"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    let first = f.certificates(&serial).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, "active");

    // Enrolling again (a new claim) supersedes the first certificate.
    let code2 = f.claim(&serial).await;
    let claim2 = ClaimCode::parse(&code2).unwrap();
    let body = json!({"claim": code2, "csr_pem": other_csr, "mac": key.mac(&claim2, &other_csr)});
    let (status, answer) = f.call("POST", "/v1/enroll", None, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let certs = f.certificates(&serial).await;
    assert_eq!(certs.len(), 2);
    assert_eq!(certs.iter().filter(|c| c.1 == "active").count(), 1, "exactly one active: {certs:?}");
    let superseded = certs.iter().find(|c| c.0 == first[0].0).unwrap();
    assert_eq!(superseded.1, "superseded");
    // The CRL (served and on disk) soon lists the superseded serial.
    let deadline = std::time::Instant::now() + crate::app::CRL_COALESCE * 10;
    while !crl_serials(&std::fs::read_to_string(&f.config.crl_file).unwrap()).contains(&first[0].0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no new CRL within {:?}",
            crate::app::CRL_COALESCE * 10
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let crl = std::fs::read_to_string(&f.config.crl_file).unwrap();
    assert_eq!(crl, *f.app.crl_pem.read().unwrap());
    assert!(crl_serials(&crl).contains(&first[0].0), "{crl}");

    // Concurrent enrollments of one device: still exactly one active.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let code = f.claim(&serial).await;
        let claim = ClaimCode::parse(&code).unwrap();
        let (csr, _) = make_csr(&serial);
        let mac = key.mac(&claim, &csr);
        let app = f.app.clone();
        tasks.push(tokio::spawn(async move {
            enroll::enroll(
                &app.db,
                &app.issuer,
                crate::ca::Validity::days(30),
                &code,
                &csr,
                Some(&mac),
                db::now(),
            )
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("each enrollment succeeds in turn");
    }
    let certs = f.certificates(&serial).await;
    assert_eq!(certs.len(), 6);
    assert_eq!(certs.iter().filter(|c| c.1 == "active").count(), 1, "{certs:?}");
}

/// The serials (lowercase hex, as stored) a CRL lists.
pub fn crl_serials(pem: &str) -> Vec<String> {
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).expect("CRL base64");
    revoked_serials(&der).into_iter().map(|s| crate::ca::hex(&s)).collect()
}

/// The revoked serials of a DER CRL, by a DER walk (TBSCertList's
/// revokedCertificates: the SEQUENCE after the optional nextUpdate).
fn revoked_serials(der: &[u8]) -> Vec<Vec<u8>> {
    use fleetd_core::der::tlv;
    let (_, cert_list, _) = tlv(der).expect("CertificateList");
    let (_, mut tbs, _) = tlv(cert_list).expect("TBSCertList");
    let mut serials = Vec::new();
    while let Some((tag, content, rest)) = tlv(tbs) {
        tbs = rest;
        // revokedCertificates: a SEQUENCE of SEQUENCEs that start with an INTEGER.
        if tag == 0x30 {
            let mut entries = content;
            let mut found = Vec::new();
            while let Some((etag, entry, erest)) = tlv(entries) {
                entries = erest;
                match (etag, tlv(entry)) {
                    (0x30, Some((0x02, serial, _))) => found.push(serial.to_vec()),
                    _ => {
                        found.clear();
                        break;
                    }
                }
            }
            if !found.is_empty() {
                serials = found;
            }
        }
    }
    serials.into_iter().map(|s| s.into_iter().skip_while(|b| *b == 0).collect()).collect()
}

/// Enrolls `serial` by a fresh claim, with a fresh key: the key.
async fn enrolled_with_a_new_key(f: &Fixture, serial: &str) -> DeviceKey {
    let key = DeviceKey::generate().unwrap();
    let code = f.claim(serial).await;
    let csr = key.csr_pem(serial).unwrap();
    enroll::enroll(f.db(), &f.app.issuer, crate::ca::Validity::days(30), &code, &csr, None, db::now())
        .await
        .unwrap();
    key
}

/// Renewal: by the active key ok; by a superseded or revoked key `revoked`;
/// retired `device-retired`.
pub async fn check_renew(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let serial = f.device().await;
    let first_key = enrolled_with_a_new_key(&f, &serial).await;
    let renew = |key: &DeviceKey, new: &DeviceKey| {
        let csr = new.csr_pem(&serial).unwrap();
        json!({"signature": sign_renewal(key, &csr).unwrap(), "csr_pem": csr})
    };
    // By the active key: a new certificate, the old one superseded.
    let second_key = DeviceKey::generate().unwrap();
    let (status, answer) = f.call("POST", "/v1/renew", None, Some(renew(&first_key, &second_key))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut states: Vec<String> = f.certificates(&serial).await.into_iter().map(|c| c.1).collect();
    states.sort();
    assert_eq!(states, ["active", "superseded"]);
    // By the superseded key: revoked.
    let third_key = DeviceKey::generate().unwrap();
    let (status, answer) = f.call("POST", "/v1/renew", None, Some(renew(&first_key, &third_key))).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "revoked"));
    // By a key never certified.
    let (status, answer) = f.call("POST", "/v1/renew", None, Some(renew(&third_key, &third_key))).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "renewal-invalid"));
    // Signed over another CSR.
    let mut body = renew(&second_key, &third_key);
    body["signature"] = json!(sign_renewal(&second_key, "another CSR").unwrap());
    let (status, answer) = f.call("POST", "/v1/renew", None, Some(body)).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "renewal-invalid"));
    assert_eq!(f.certificates(&serial).await.len(), 2, "nothing issued");
    // Revoked: the current key no longer renews.
    devices::revoke(f.db(), "test", &serial, false, "keyCompromise", db::now()).await.unwrap();
    let (status, answer) = f.call("POST", "/v1/renew", None, Some(renew(&second_key, &third_key))).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "revoked"));

    // Retired.
    let serial = f.device().await;
    let key = enrolled_with_a_new_key(&f, &serial).await;
    devices::revoke(f.db(), "test", &serial, true, "unspecified", db::now()).await.unwrap();
    let csr = DeviceKey::generate().unwrap().csr_pem(&serial).unwrap();
    let body = json!({"signature": sign_renewal(&key, &csr).unwrap(), "csr_pem": csr});
    let (status, answer) = f.call("POST", "/v1/renew", None, Some(body)).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "device-retired"));
}

/// Logins: the same refusal for an unknown user and a wrong password, a
/// lock-out after 5 failures (even for the right password), the per-address limit.
pub async fn check_login(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let (name, _) = f.user(Role::Installer).await;
    let db = f.db();
    let unknown = users::login(db, &unique("ghost"), "password1", 60, db::now(), "t").await.unwrap_err();
    assert_eq!(unknown.name(), "login-failed");
    for i in 0..5 {
        let e = users::login(db, &name, "wrong password", 60, db::now(), "t").await.unwrap_err();
        assert_eq!(e.name(), "login-failed", "failure {i}");
    }
    let locked = users::login(db, &name, "password1", 60, db::now(), "t").await.unwrap_err();
    assert_eq!(locked.name(), "locked-out");
    assert_eq!(locked.status(), StatusCode::TOO_MANY_REQUESTS);
    // After the lock: in again.
    let later = db::now() + users::LOCKOUT_S + 1;
    users::login(db, &name, "password1", 60, later, "t").await.unwrap();
    assert!(audit_actions(db, "login-failed").await >= 6);
    // Over HTTP, one address: rate-limited after the burst.
    let mut names = Vec::new();
    for _ in 0..(crate::app::LOGIN_BURST + 2) {
        let body = json!({"user": unique("ghost"), "password": "x"});
        let (status, answer) = f.call("POST", "/v1/login", None, Some(body)).await;
        names.push((status.as_u16(), error_name(&answer).to_string()));
    }
    assert_eq!(names[0], (401, "login-failed".to_string()));
    assert_eq!(names.last().unwrap(), &(429, "rate-limited".to_string()), "{names:?}");
}

/// Bad input: a 10 MB body is 413 `body-too-large` and stores nothing;
/// SQL metacharacters in a serial are `serial-invalid`; axum's own
/// rejections are named JSON too; installers may not read device records.
pub async fn check_bad_input(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let serial = f.device().await;
    let (_, installer) = f.user(Role::Installer).await;
    let (_, admin) = f.user(Role::Admin).await;
    let claims_before: i64 = count(f.db(), "claims").await;
    let huge = format!("{{\"serial\": \"{serial}\", \"pad\": \"{}\"}}", "x".repeat(10 << 20)).into_bytes();
    let (status, body) =
        f.call_raw("POST", "/v1/claims", Some(&installer), "application/json", Some(huge)).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, error_name(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large"));
    assert_eq!(count(f.db(), "claims").await, claims_before, "nothing stored");

    // (method, path, token, content type, body, status, error name)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, &'a [u8], u16, &'a str);
    let cases: [Case<'_>; 8] = [
        ("POST", "/v1/claims", Some(&installer), "text/plain", b"{}", 415, "content-type"),
        ("POST", "/v1/claims", Some(&installer), "application/json", b"{not json", 400, "malformed"),
        (
            "POST",
            "/v1/claims",
            Some(&installer),
            "application/json",
            b"{\"serial\":\"a\",\"x\":1}",
            400,
            "malformed",
        ),
        (
            "POST",
            "/v1/claims",
            Some(&installer),
            "application/json",
            b"{\"serial\":\"a'; DROP TABLE devices;--\"}",
            400,
            "serial-invalid",
        ),
        ("GET", "/nowhere", None, "application/json", b"", 404, "not-found"),
        ("GET", "/v1/login", None, "application/json", b"", 405, "method-not-allowed"),
        ("GET", "/v1/devices/a;b", Some(&admin), "application/json", b"", 400, "serial-invalid"),
        (
            "POST",
            "/v1/login",
            None,
            "application/json",
            b"{\"user\":\"Robert'); DROP TABLE users;--\",\"password\":\"x\"}",
            401,
            "login-failed",
        ),
    ];
    for (method, path, token, content_type, body, status, name) in cases {
        let (got, answer) = f.call_raw(method, path, token, content_type, Some(body.to_vec())).await;
        let answer: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        assert_eq!(
            (got.as_u16(), error_name(&answer)),
            (status, name),
            "{method} {path} {}",
            String::from_utf8_lossy(body)
        );
    }
    // Roles.
    let path = format!("/v1/devices/{serial}");
    let (status, answer) = f.call("GET", &path, Some(&installer), None).await;
    assert_eq!((status, error_name(&answer)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, answer) = f.call("GET", &path, Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["serial"], serial.as_str());
    assert_eq!(answer["state"], "active");
    assert_eq!(answer["groups"], json!(["g1", "g2"]));
    // The page and the CRL.
    let (status, page) = f.call_raw("GET", "/", None, "text/html", None).await;
    assert_eq!(status, StatusCode::OK);
    let page = String::from_utf8(page).unwrap();
    for id in ["user", "password", "login", "serial", "claim-request", "claim-code", "claim-qr", "error"] {
        assert!(page.contains(&format!("id=\"{id}\"")), "#{id}");
    }
    assert!(!page.contains("http://") && !page.contains("https://"), "no external resources");
    let (status, crl) = f.call_raw("GET", "/v1/crl", None, "text/plain", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8(crl).unwrap().starts_with("-----BEGIN X509 CRL-----"));
}

async fn count(db: &Db, table: &str) -> i64 {
    // `table` is one of this module's literals, never input.
    sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

/// The audit trail verifies, and a changed row is found by its id.
/// (Changes the trail: run it last on a shared database.)
pub async fn check_audit(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let serial = f.device().await;
    f.claim(&serial).await;
    assert_eq!(audit::verify(f.db()).await.unwrap(), None);
    let entries = audit::list(f.db()).await.unwrap();
    let victim = entries.iter().rev().find(|e| e.action == "claim" && e.subject == serial).unwrap().id;
    sqlx::query("UPDATE audit SET detail = $1 WHERE id = $2")
        .bind("expires_at=0")
        .bind(victim)
        .execute(&f.db().pool)
        .await
        .unwrap();
    assert_eq!(audit::verify(f.db()).await.unwrap(), Some(victim));
}

/// Revocation lists the device's serials in the CRL file, with its
/// reason; `openssl crl` verifies it against the CA when installed.
pub async fn check_crl(db_url: &str) {
    let f = Fixture::new(db_url).await;
    let serial = f.device().await;
    let code = f.claim(&serial).await;
    let (csr, _) = make_csr(&serial);
    let enrolled =
        enroll::enroll(f.db(), &f.app.issuer, crate::ca::Validity::days(30), &code, &csr, None, db::now())
            .await
            .unwrap();
    assert!(!crl_serials(&std::fs::read_to_string(&f.config.crl_file).unwrap())
        .contains(&enrolled.issued.serial_hex));
    assert_eq!(devices::revoke(f.db(), "test", &serial, false, "keyCompromise", db::now()).await.unwrap(), 1);
    f.app.regenerate_crl().await.unwrap();
    let crl = std::fs::read_to_string(&f.config.crl_file).unwrap();
    assert!(crl_serials(&crl).contains(&enrolled.issued.serial_hex), "{crl}");
    let ca = f.dir.0.join("ca.pem");
    let out = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-text", "-in"])
        .arg(&f.config.crl_file)
        .arg("-CAfile")
        .arg(&ca)
        .output();
    match out {
        Ok(out) => {
            let text =
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "{text}");
            assert!(text.to_lowercase().contains("verify ok"), "{text}");
            assert!(text.to_uppercase().contains(&enrolled.issued.serial_hex.to_uppercase()), "{text}");
            assert!(text.contains("Key Compromise"), "{text}");
        }
        Err(_) => eprintln!("SKIP openssl crl: no openssl"),
    }
}

/// Rollouts: started once (again is harmless), devices' last states
/// upserted, and the first halt stands.
pub async fn check_rollouts(db_url: &str) {
    use crate::rollouts::{self, DeviceRow, Halt, Rollout};
    let db = Db::connect(db_url).await.unwrap();
    let jti = unique("roll");
    let rollout = Rollout {
        jti: jti.clone(),
        project: "acme".into(),
        group: "field".into(),
        version: 9,
        message: "{}".into(),
        started_at: 100,
        halt: None,
    };
    assert_eq!(rollouts::start(&db, &rollout).await.unwrap(), rollout);
    let again = Rollout { started_at: 200, ..rollout.clone() };
    assert_eq!(rollouts::start(&db, &again).await.unwrap().started_at, 100, "the first record stands");
    let row = |device: &str, state: &str| DeviceRow {
        device: device.into(),
        wave: 1,
        state: state.into(),
        bytes_fetched: 7,
        updated_at: 5,
    };
    rollouts::record_devices(&db, &jti, &[row("gw-2", "scheduled"), row("gw-1", "downloading")])
        .await
        .unwrap();
    rollouts::record_devices(&db, &jti, &[row("gw-2", "committed")]).await.unwrap();
    let states: Vec<_> =
        rollouts::devices(&db, &jti).await.unwrap().into_iter().map(|r| (r.device, r.state)).collect();
    assert_eq!(states, [("gw-1".into(), "downloading".into()), ("gw-2".into(), "committed".into())]);
    let first = Halt { message: "h1".into(), at: 300, reason: "by hand".into() };
    assert_eq!(rollouts::record_halt(&db, &jti, &first).await.unwrap(), first);
    let second = Halt { message: "h2".into(), at: 400, reason: "again".into() };
    assert_eq!(rollouts::record_halt(&db, &jti, &second).await.unwrap(), first, "the first halt stands");
    assert_eq!(rollouts::find(&db, &jti).await.unwrap().unwrap().halt, Some(first));
    assert_eq!(rollouts::find(&db, "roll-unknown").await.unwrap(), None);
}
