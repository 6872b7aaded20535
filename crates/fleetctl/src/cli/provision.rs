//! `fleetctl provision`: what a phone app does at the device's portal.
//! Each call proves the PoP with an HMAC over the request (provision/auth.rs),
//! so the code itself never crosses the network.

use super::{file_error, runtime, CliError};
use bytes::Bytes;
use clap::Args;
use fleetd::provision::auth;
use fleetd::provision::pop::Pop;
use http_body_util::{BodyExt, Full, Limited};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct ProvisionArgs {
    /// The portal, e.g. http://192.168.4.1/ (NetworkManager's hotspot: http://10.42.0.1/).
    #[arg(long)]
    url: String,
    /// The proof-of-possession code from the device's label (or
    /// $FLEETCTL_POP, which keeps it out of the process list).
    #[arg(long, env = "FLEETCTL_POP", hide_env_values = true)]
    pop: String,
    /// The Wi-Fi for the device to join (leave out for a wired device).
    #[arg(long, requires = "psk")]
    ssid: Option<String>,
    /// The Wi-Fi passphrase (or $FLEETCTL_PSK).
    #[arg(long, requires = "ssid", env = "FLEETCTL_PSK", hide_env_values = true)]
    psk: Option<String>,
    /// The MQTT broker, HOST or HOST:PORT (default port 8883).
    #[arg(long, required_unless_present = "registrar", conflicts_with = "registrar")]
    broker: Option<String>,
    /// The broker's CA certificate (PEM); the device's certificate must chain to it.
    #[arg(long, required_unless_present = "registrar", conflicts_with = "registrar")]
    broker_ca: Option<PathBuf>,
    /// Enroll with this registrar instead: log in, get a claim for --serial,
    /// and have the device enroll itself after joining the network (the
    /// password from $FLEETCTL_PASSWORD or the first line of standard input).
    #[arg(long, requires_all = ["user", "serial"], conflicts_with_all = ["ca_cert", "csr_out", "cert"])]
    registrar: Option<String>,
    /// The installer's user name at the registrar.
    #[arg(long, requires = "registrar")]
    user: Option<String>,
    /// The device's serial number in the registry.
    #[arg(long, requires = "registrar")]
    serial: Option<String>,
    /// The registrar's CA certificate (PEM), for fleetctl and the device.
    #[arg(long, requires = "registrar")]
    registrar_ca: Option<PathBuf>,
    /// Sign the device's CSR with this CA (the device makes its key).
    #[arg(long, requires = "ca_key", conflicts_with_all = ["csr_out", "cert"])]
    ca_cert: Option<PathBuf>,
    /// That CA's private key (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Days the signed certificate is valid.
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Save the device's CSR here for an external CA, and stop.
    #[arg(long, conflicts_with = "cert")]
    csr_out: Option<PathBuf>,
    /// The certificate (for the device's CSR key, or for --key).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// A key made elsewhere, for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// How long to wait for the device to report the outcome (longer than
    /// fleetd's 60 s bound on joining the Wi-Fi).
    #[arg(long, default_value_t = 90)]
    wait_s: u64,
}

/// 0 provisioned, 1 refused or failed, 2 usage.
pub fn command(args: &ProvisionArgs) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(provision(args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ CliError::Usage(_)) => {
            eprintln!("fleetctl provision: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("fleetctl provision: {e}");
            ExitCode::from(1)
        }
    }
}

struct Portal {
    base: String,
    pop: Pop,
    client: fleetd::http::HttpsClient<Full<Bytes>>,
}

/// An answer from the portal: status and JSON body.
struct Answer {
    status: u16,
    body: serde_json::Value,
}

impl Answer {
    fn refusal(&self) -> CliError {
        let name = self.body["error"].as_str().unwrap_or("refused");
        let detail = self.body["detail"].as_str().unwrap_or("");
        CliError::Portal(format!("refused ({}): {name}: {detail}", self.status))
    }
}

/// One call to the portal, answer included; a portal that went away with
/// its access point must not hold the command up.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Portal {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, CliError> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_once(method, path, body)).await.map_err(|_| {
            CliError::Portal(format!("{}{path}: no answer within {} s", self.base, CALL_TIMEOUT.as_secs()))
        })?
    }

    /// Authenticated calls (all but info) prove the PoP, and their
    /// successful answers must carry the device's MAC: a CSR or an
    /// "accepted" from anything else is refused.
    async fn call_once(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer, CliError> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let mut request = hyper::Request::builder().method(method).uri(format!("{}{path}", self.base));
        let mut signed = None;
        if path != "/api/v1/info" {
            let info = Box::pin(self.call_once("GET", "/api/v1/info", None)).await?;
            let nonce = info.body["nonce"].as_str().unwrap_or_default().to_string();
            let device = info.body["device"].as_str().unwrap_or_default().to_string();
            let key = self.pop.request_key(&device);
            request =
                request.header("Authorization", auth::authorization(&key, method, path, &nonce, &bytes));
            signed = Some((key, nonce));
        }
        let request = request
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| CliError::Usage(format!("--url: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| CliError::Portal(format!("{}{path}: {e}", self.base)))?;
        let status = response.status().as_u16();
        let mac =
            response.headers().get(auth::RESPONSE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes = Limited::new(response.into_body(), 256 * 1024)
            .collect()
            .await
            .map_err(|e| CliError::Portal(format!("{}{path}: {e}", self.base)))?
            .to_bytes();
        if let (Some((key, nonce)), true) = (&signed, (200..300).contains(&status)) {
            auth::verify_response(key, nonce, status, &bytes, mac.as_deref()).map_err(|e| {
                CliError::Portal(format!(
                    "{}{path}: the answer is not from the device that holds this code ({e}); refusing it",
                    self.base
                ))
            })?;
        }
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok(Answer { status, body })
    }
}

async fn provision(args: &ProvisionArgs) -> Result<(), CliError> {
    let pop = Pop::parse(&args.pop).map_err(|e| CliError::Usage(format!("--pop: {e}")))?;
    if let Some(registrar) = &args.registrar {
        return provision_with_registrar(args, pop, registrar).await;
    }
    let (Some(broker), Some(broker_ca)) = (&args.broker, &args.broker_ca) else {
        return Err(CliError::Usage("--broker and --broker-ca are required (or --registrar)".into()));
    };
    let (host, port) = match broker.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
            let port = p.parse().map_err(|_| CliError::Usage(format!("--broker: bad port {p:?}")))?;
            (h.trim_matches(['[', ']']).to_string(), port)
        }
        _ => (broker.clone(), 8883u16),
    };
    if args.ca_cert.is_none() && args.csr_out.is_none() && args.cert.is_none() {
        return Err(CliError::Usage(
            "one identity choice: --ca-cert/--ca-key, --csr-out, --cert, or --cert with --key".into(),
        ));
    }
    let broker_ca = read(broker_ca)?;
    let base = args.url.trim_end_matches('/').to_string();
    let tls = fleetd::http::plain_tls_config()?;
    let portal = Portal { base, pop, client: fleetd::http::client(tls) };

    let info = portal.call("GET", "/api/v1/info", None).await?;
    let device = info.body["device"].as_str().unwrap_or_default().to_string();
    if info.body["provisioned"] == true {
        return Err(CliError::Portal(format!(
            "{device} is provisioned already (reset it with `fleetd reset --factory`)"
        )));
    }
    println!(
        "device {device} ({}), fleetd {}",
        info.body["hardware"].as_str().unwrap_or("?"),
        info.body["fleetd_version"].as_str().unwrap_or("?")
    );

    let (cert_pem, key_pem) = match (&args.ca_cert, &args.ca_key, &args.csr_out, &args.cert, &args.key) {
        (Some(ca_cert), Some(ca_key), _, _, _) => {
            let csr = fetch_csr(&portal).await?;
            let ca_key = super::read_key_text(ca_key, fleetd::fsutil::read_private_key(ca_key))?;
            (sign_csr(&csr, &device, &read(ca_cert)?, &ca_key, args.days)?, None)
        }
        (_, _, Some(out), _, _) => {
            let csr = fetch_csr(&portal).await?;
            fleetd::fsutil::atomic_write(out, csr.as_bytes(), 0o644).map_err(file_error(out))?;
            println!(
                "wrote the CSR of {device} to {}; have it signed, then run again with --cert",
                out.display()
            );
            return Ok(());
        }
        (_, _, _, Some(cert), key) => {
            let key = key.as_deref().map(|k| super::read_key_text(k, fleetd::fsutil::read_private_key(k)));
            (read(cert)?, key.transpose()?)
        }
        _ => unreachable!("checked above"),
    };
    let mut body = serde_json::json!({
        "mqtt": {"host": host, "port": port, "ca_pem": broker_ca},
        "identity": {"cert_pem": cert_pem},
    });
    if let Some(key) = key_pem {
        body["identity"]["key_pem"] = key.into();
    }
    if let (Some(ssid), Some(psk)) = (&args.ssid, &args.psk) {
        body["wifi"] = serde_json::json!({"ssid": ssid, "psk": psk});
    }
    let answer = portal.call("POST", "/api/v1/provision", Some(&body)).await?;
    if answer.status != 200 {
        return Err(answer.refusal());
    }
    println!("accepted: {}", answer.body["next"].as_str().unwrap_or("provisioning"));
    wait_for_outcome(&portal, args.ssid.as_deref(), Duration::from_secs(args.wait_s)).await
}

/// `--registrar`: log in, get a claim for the device's serial, and hand the
/// device `enroll: {url, claim, ca_pem}` (no `mqtt`, no `identity`).
async fn provision_with_registrar(args: &ProvisionArgs, pop: Pop, registrar: &str) -> Result<(), CliError> {
    let (Some(user), Some(serial)) = (&args.user, &args.serial) else {
        return Err(CliError::Usage("--registrar needs --user and --serial".into()));
    };
    let registrar = registrar.trim_end_matches('/').to_string();
    let uri: hyper::Uri = registrar.parse().map_err(|e| CliError::Usage(format!("--registrar: {e}")))?;
    let ca_pem = match (&args.registrar_ca, uri.scheme_str()) {
        (Some(ca), Some("https")) => read(ca)?,
        (None, Some("https")) => String::new(),
        (_, Some("http")) if is_loopback(uri.host().unwrap_or_default()) => String::new(),
        _ => {
            return Err(CliError::Usage(format!(
                "--registrar {registrar}: https (plain http only to a loopback address)"
            )))
        }
    };
    let password = registrar_password()?;

    let base = args.url.trim_end_matches('/').to_string();
    let portal = Portal { base, pop, client: fleetd::http::client(fleetd::http::plain_tls_config()?) };
    let info = portal.call("GET", "/api/v1/info", None).await?;
    let device = info.body["device"].as_str().unwrap_or_default().to_string();
    if info.body["provisioned"] == true {
        return Err(CliError::Portal(format!(
            "{device} is provisioned already (reset it with `fleetd reset --factory`)"
        )));
    }
    if &device != serial {
        return Err(CliError::Portal(format!("the device at {} is {device:?}, not {serial:?}", portal.base)));
    }
    println!(
        "device {device} ({}), fleetd {}",
        info.body["hardware"].as_str().unwrap_or("?"),
        info.body["fleetd_version"].as_str().unwrap_or("?")
    );

    let ca_file = args.registrar_ca.as_deref();
    let login = serde_json::json!({"user": user, "password": password});
    let answer = registrar_call(&format!("{registrar}/v1/login"), None, &login, ca_file).await?;
    let token = answer["token"].as_str().unwrap_or_default().to_string();
    let answer = registrar_call(
        &format!("{registrar}/v1/claims"),
        Some(&token),
        &serde_json::json!({"serial": serial}),
        ca_file,
    )
    .await?;
    let claim = answer["claim"]
        .as_str()
        .ok_or_else(|| CliError::Portal("the registrar's answer holds no claim".into()))?
        .to_string();
    println!("claim for {serial} from {registrar}");

    let mut body = serde_json::json!({"enroll": {"url": registrar, "claim": claim, "ca_pem": ca_pem}});
    if let (Some(ssid), Some(psk)) = (&args.ssid, &args.psk) {
        body["wifi"] = serde_json::json!({"ssid": ssid, "psk": psk});
    }
    let answer = portal.call("POST", "/api/v1/provision", Some(&body)).await?;
    if answer.status != 200 {
        return Err(answer.refusal());
    }
    println!("accepted: {}", answer.body["next"].as_str().unwrap_or("provisioning"));
    wait_for_outcome(&portal, args.ssid.as_deref(), Duration::from_secs(args.wait_s)).await
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// $FLEETCTL_PASSWORD, else the first line of standard input.
fn registrar_password() -> Result<String, CliError> {
    if let Ok(password) = std::env::var("FLEETCTL_PASSWORD") {
        return Ok(password);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(file_error(Path::new("standard input")))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(CliError::Usage(
            "the password: $FLEETCTL_PASSWORD or the first line of standard input".into(),
        ));
    }
    Ok(password)
}

/// One JSON call to the registrar; a refusal is `refused (STATUS): NAME: detail`.
async fn registrar_call(
    url: &str,
    token: Option<&str>,
    body: &serde_json::Value,
    ca_file: Option<&Path>,
) -> Result<serde_json::Value, CliError> {
    let uri: hyper::Uri = url.parse().map_err(|e| CliError::Usage(format!("--registrar: {e}")))?;
    let tls = if uri.scheme_str() == Some("https") {
        fleetd::http::tls_config(ca_file)?
    } else {
        fleetd::http::plain_tls_config()?
    };
    let mut request = hyper::Request::post(uri).header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| CliError::Usage(format!("--registrar: {e}")))?;
    let call = async {
        let response = fleetd::http::client(tls)
            .request(request)
            .await
            .map_err(|e| CliError::Portal(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        let bytes = Limited::new(response.into_body(), 256 * 1024)
            .collect()
            .await
            .map_err(|e| CliError::Portal(format!("{url}: {e}")))?
            .to_bytes();
        Ok::<_, CliError>((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
    };
    let (status, answer) = tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| CliError::Portal(format!("{url}: no answer within {} s", CALL_TIMEOUT.as_secs())))??;
    if status != 200 {
        let name = answer["error"].as_str().unwrap_or("refused");
        let detail = answer["detail"].as_str().unwrap_or("");
        return Err(CliError::Portal(format!("the registrar refused ({status}): {name}: {detail}")));
    }
    Ok(answer)
}

/// Polls `/api/v1/info` until the device says it is provisioned, or shows
/// why the join failed (its access point is back). A device that left its
/// access point for the Wi-Fi and never came back has not failed.
async fn wait_for_outcome(portal: &Portal, ssid: Option<&str>, wait: Duration) -> Result<(), CliError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut left = false;
    while tokio::time::Instant::now() < deadline {
        match portal.call("GET", "/api/v1/info", None).await {
            Ok(info) if info.body["provisioned"] == true => {
                println!("provisioned");
                return Ok(());
            }
            Ok(info) if info.body["state"] == "provisioning" && !info.body["last_error"].is_null() => {
                return Err(CliError::Portal(format!(
                    "the device could not join: {}",
                    info.body["last_error"].as_str().unwrap_or("?")
                )));
            }
            Ok(_) => {}
            Err(_) => left = true,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match (left, ssid) {
        (true, Some(ssid)) => {
            println!("provisioned: the device left its access point to join {ssid:?} and has not come back with an error");
            Ok(())
        }
        (true, None) => {
            println!("provisioned: the portal closed");
            Ok(())
        }
        (false, _) => Err(CliError::Portal(format!("no outcome within {} s", wait.as_secs()))),
    }
}

async fn fetch_csr(portal: &Portal) -> Result<String, CliError> {
    let answer = portal.call("GET", "/api/v1/csr", None).await?;
    if answer.status != 200 {
        return Err(answer.refusal());
    }
    answer.body["csr_pem"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| CliError::Portal("the CSR answer holds no csr_pem".into()))
}

/// Signs the device's CSR as a client certificate for `device` (its CN
/// must be `device`), valid from an hour ago (a device's clock may lag) for
/// `days`. The registrar's CA does it: fresh parameters, of the CSR only its
/// key, a random 127-bit serial.
fn sign_csr(csr_pem: &str, device: &str, ca_cert: &str, ca_key: &str, days: u32) -> Result<String, CliError> {
    let issuer = fleetd_registrar::ca::Issuer::from_pem(ca_cert, ca_key)
        .map_err(|e| CliError::Portal(format!("the CA: {e}")))?;
    let now = i64::try_from(fleetd::system_now()).unwrap_or(i64::MAX);
    fleetd_registrar::ca::issue(csr_pem, device, &issuer, fleetd_registrar::ca::Validity::days(days), now)
        .map(|issued| issued.cert_pem)
        .map_err(|e| CliError::Portal(format!("not signing the CSR of {device}: {e}")))
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(file_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CA key as `openssl ecparam -genkey -name prime256v1 -noout`
    /// writes it (SEC1, `BEGIN EC PRIVATE KEY`) signs the device's CSR.
    #[test]
    fn a_sec1_ca_key_from_openssl_signs_the_csr() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ca.key");
        let cert = dir.path().join("ca.pem");
        let made = std::process::Command::new("openssl")
            .args(["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out"])
            .arg(&key)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new("openssl")
                .args(["req", "-x509", "-new", "-subj", "/CN=fleet CA", "-days", "2", "-key"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .status()
                .is_ok_and(|s| s.success());
        if !made {
            assert!(std::env::var_os("CI").is_none(), "CI has openssl");
            eprintln!("SKIP: no openssl");
            return;
        }
        let ca_key = std::fs::read_to_string(&key).unwrap();
        assert!(ca_key.contains("BEGIN EC PRIVATE KEY"), "{ca_key}");
        let device_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "gw-0042");
        let csr = params.serialize_request(&device_key).unwrap().pem().unwrap();
        let signed = sign_csr(&csr, "gw-0042", &std::fs::read_to_string(&cert).unwrap(), &ca_key, 30);
        let pem = signed.expect("a SEC1 CA key signs");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    }

    /// The laptop CA signs fresh parameters: a CSR asking for CA:true, a
    /// DNS name and server/code-signing use gets a plain client
    /// certificate with a random serial.
    #[test]
    fn a_greedy_csr_gets_a_plain_client_certificate() {
        let (ca_cert, ca_key) = fleetd_registrar::ca::test_ca::make_ca();
        let device_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "gw-0042");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::CodeSigning];
        let csr = params.serialize_request(&device_key).unwrap().pem().unwrap();
        let pem = sign_csr(&csr, "gw-0042", &ca_cert, &ca_key, 30).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = der.parse_x509().unwrap();
        assert!(cert.basic_constraints().unwrap().is_none_or(|bc| !bc.value.ca), "no CA:true");
        assert!(cert.subject_alternative_name().unwrap().is_none(), "no SANs");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.code_signing, "client auth only");
        assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert!(cert.tbs_certificate.serial.bits() >= 120, "a random serial");
        let other = sign_csr(&csr, "gw-0042", &ca_cert, &ca_key, 30).unwrap();
        let (_, other) = x509_parser::pem::parse_x509_pem(other.as_bytes()).unwrap();
        assert_ne!(other.parse_x509().unwrap().tbs_certificate.serial, cert.tbs_certificate.serial);
        assert!(sign_csr(&csr, "gw-0043", &ca_cert, &ca_key, 30).is_err(), "CN mismatch");
    }

    /// `--registrar`: logs in, gets a claim for the serial, and posts exactly
    /// `{wifi, enroll: {url, claim, ca_pem}}` to the portal (no mqtt, no identity).
    #[tokio::test]
    async fn the_registrar_path_posts_an_enroll_body_with_a_fresh_claim() {
        use fleetd_registrar::testing::{sqlite_url, Fixture, TempDir};
        use std::sync::{Arc, Mutex};
        let dir = TempDir::new();
        let registrar = Fixture::new(&sqlite_url(&dir.0)).await;
        let serial = registrar.device().await;
        fleetd_registrar::users::add_user(
            registrar.db(),
            "installer-1",
            fleetd_registrar::names::Role::Installer,
            "password1",
            fleetd_registrar::db::now(),
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let registrar_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(fleetd_registrar::serve::serve(
            registrar.app.clone(),
            listener,
            None,
            std::future::pending(),
        ));

        // A portal that holds the PoP and records what it is sent.
        let pop = Pop::from_bytes([5; fleetd::provision::pop::POP_BYTES]);
        let key = pop.request_key(&serial);
        let posted: Arc<Mutex<Option<serde_json::Value>>> = Arc::default();
        let portal = {
            let (serial, posted) = (serial.clone(), posted.clone());
            let info_posted = posted.clone();
            axum::Router::new()
                .route(
                    "/api/v1/info",
                    axum::routing::get(move || {
                        let provisioned = info_posted.lock().unwrap().is_some();
                        let serial = serial.clone();
                        async move {
                            axum::Json(serde_json::json!({
                                "device": serial, "hardware": "hw", "fleetd_version": "test",
                                "state": "unprovisioned", "provisioned": provisioned,
                                "last_error": null, "nonce": "nonce-1",
                            }))
                        }
                    }),
                )
                .route(
                    "/api/v1/provision",
                    axum::routing::post(move |body: bytes::Bytes| {
                        *posted.lock().unwrap() = serde_json::from_slice(&body).ok();
                        let answer = br#"{"next":"joining"}"#.to_vec();
                        let mac = auth::response_mac(&key, "nonce-1", 200, &answer);
                        async move { ([(auth::RESPONSE_HEADER, mac)], answer) }
                    }),
                )
        };
        let portal_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let portal_url = format!("http://{}", portal_listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(portal_listener, portal).await });

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ProvisionArgs,
        }
        use clap::Parser;
        let pop_code = pop.display_code();
        let argv = [
            "provision",
            "--url",
            &portal_url,
            "--pop",
            &pop_code,
            "--ssid",
            "site",
            "--psk",
            "secret123",
            "--registrar",
            &registrar_url,
            "--user",
            "installer-1",
            "--serial",
            &serial,
            "--wait-s",
            "5",
        ];
        let cli = Cli::try_parse_from(argv).unwrap();
        std::env::set_var("FLEETCTL_PASSWORD", "password1");
        provision(&cli.args).await.unwrap();

        let body = posted.lock().unwrap().clone().expect("the portal got a body");
        let fields: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["enroll", "wifi"], "{body}");
        assert_eq!(body["wifi"], serde_json::json!({"ssid": "site", "psk": "secret123"}));
        assert_eq!(body["enroll"]["url"], registrar_url.as_str());
        assert_eq!(body["enroll"]["ca_pem"], "");
        // The claim is a live one for this serial: it enrolls the device.
        let claim = body["enroll"]["claim"].as_str().unwrap();
        let (csr, _) = fleetd_registrar::ca::test_ca::make_csr(&serial);
        let app = &registrar.app;
        fleetd_registrar::enroll::enroll(
            &app.db,
            &app.issuer,
            fleetd_registrar::ca::Validity::days(30),
            claim,
            &csr,
            None,
            fleetd_registrar::db::now(),
        )
        .await
        .expect("the claim enrolls the device");

        // Another serial than the portal's device: refused before any claim is made.
        *posted.lock().unwrap() = None;
        let argv_other = argv.map(|a| if a == serial { "gw-other" } else { a });
        let cli = Cli::try_parse_from(argv_other).unwrap();
        let refused = provision(&cli.args).await.unwrap_err().to_string();
        assert!(refused.contains("not \"gw-other\""), "{refused}");
    }
}
