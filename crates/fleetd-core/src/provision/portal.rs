//! The portal's protocol core: every HTTP request the access point's web
//! server gets, answered without IO. The server (`server.rs`) hands in the
//! method, path, `Authorization` header and body, the time and fresh random
//! bytes; it gets back a response, or a checked provisioning request to
//! persist before it answers (`Handled::Provision`).
//!
//! Routes (interfaces.md): `/` (the page), `/api/v1/info`, `networks`,
//! `csr`, `provision`, and the operating systems' captive-portal probes,
//! which redirect to the page so phones open it by themselves.
//!
//! The `Host` header must name the portal's own address (DNS rebinding
//! would bring another site's name): with any other, the API is refused
//! (`host-refused`) and everything else redirects to the portal, which is
//! exactly what a captive probe for another site's name needs.

use super::auth::{self, AuthError, Nonces};
use super::guard::{Guard, GuardState, LockedOut};
use super::identity::{self, CheckedIdentity, DeviceKey};
use super::request::{Broker, Enroll, How, ProvisionRequest, Registrar, Wifi};
use crate::admission::Source;
use serde::Serialize;
use std::net::IpAddr;

pub use crate::wifi::Network;

/// Where provisioning stands, as `/api/v1/info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// `unprovisioned`, `provisioning`, `joining`, `idle` (done), …
    pub state: String,
    pub provisioned: bool,
    /// The reason the last attempt failed (a wrong Wi-Fi passphrase, say).
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Self { status, content_type: "application/json", headers: Vec::new(), body }
    }

    /// `{error: NAME, detail}` with `status`.
    pub fn error(status: u16, name: &str, detail: &str) -> Self {
        Self::json(status, &serde_json::json!({"error": name, "detail": detail}))
    }

    fn redirect(location: String) -> Self {
        Self {
            status: 302,
            content_type: "text/html",
            body: format!("<a href=\"{location}\">Set up this device</a>").into_bytes(),
            headers: vec![("Location", location), ("Cache-Control", "no-store".into())],
        }
    }
}

pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub body: &'a [u8],
    /// The client's address (the guard counts wrong proofs per source).
    pub peer: IpAddr,
    /// The address the client reached.
    pub local: IpAddr,
}

/// What the caller does with a request.
#[derive(Debug)]
pub enum Handled {
    Reply {
        response: Response,
        log: Option<String>,
        /// A wrong proof was counted: persist `Portal::guard_state` before
        /// answering, so a restart does not forget it.
        guard_changed: bool,
    },
    /// Checked in full: the caller stores it (atomically), then answers
    /// with `Portal::stored` or `Portal::store_failed`.
    Provision {
        wifi: Option<Wifi>,
        plan: Box<Plan>,
        /// The request's nonce: the answer is signed with it (`sign`).
        nonce: String,
    },
    /// Asked for a fresh scan: answer `response`, then drop the access
    /// point briefly (a radio in AP mode cannot scan) and raise it again.
    /// `busy` is the answer instead when a rescan or a provisioning is
    /// already queued.
    Rescan { response: Response, busy: Response },
}

/// How a checked request gives the device its identity.
#[derive(Debug)]
pub enum Plan {
    /// An identity that passed every check, for this broker.
    Identity { mqtt: Broker, identity: CheckedIdentity },
    /// Enroll with the registrar once the Wi-Fi is joined.
    Enroll(Enroll),
}

impl Handled {
    fn reply(response: Response) -> Self {
        Self::Reply { response, log: None, guard_changed: false }
    }
}

pub struct Facts {
    pub device_id: String,
    pub hardware: String,
    /// Where phones are sent by the probes: `http://ADDR[:PORT]/`.
    pub portal_url: String,
    /// The portal's own addresses (the listen address, the access
    /// point's): a `Host` naming one of these, or the address the
    /// connection reached, is the portal's.
    pub addresses: Vec<IpAddr>,
    /// Whether the network backend can join a Wi-Fi (backend `none`
    /// cannot: a request carrying one is refused at once).
    pub joins_wifi: bool,
    /// The image's registrar (`[provision] registrar`): an `enroll` without
    /// `url` goes there, and the page offers the claim code.
    pub registrar: Option<Registrar>,
}

/// A nonce is good for two minutes.
pub const NONCE_TTL_MS: u64 = 120_000;
/// Authenticated requests remembered at once (to refuse replays).
const SPENT_NONCES: usize = 256;

pub struct Portal {
    facts: Facts,
    key: ring::hmac::Key,
    device_key: DeviceKey,
    nonces: Nonces,
    guard: Guard,
    networks: Vec<Network>,
    progress: Progress,
    /// A checked request is being stored or its Wi-Fi joined: a second
    /// one waits for the outcome (409 busy), single use holds meanwhile.
    in_flight: bool,
}

impl Portal {
    /// `nonce_secret`: fresh random bytes; `guard`: as restored from disk.
    pub fn new(
        facts: Facts,
        pop: &super::pop::Pop,
        device_key: DeviceKey,
        progress: Progress,
        nonce_secret: [u8; 32],
        guard: Guard,
    ) -> Self {
        Self {
            key: pop.request_key(&facts.device_id),
            facts,
            device_key,
            nonces: Nonces::new(nonce_secret, NONCE_TTL_MS, SPENT_NONCES),
            guard,
            networks: Vec::new(),
            progress,
            in_flight: false,
        }
    }

    pub fn set_networks(&mut self, networks: Vec<Network>) {
        self.networks = networks;
    }

    /// Back to `provisioning` (a failed join) ends the request in flight.
    pub fn set_progress(&mut self, progress: Progress) {
        if progress.state == "provisioning" {
            self.in_flight = false;
        }
        self.progress = progress;
    }

    /// Signs an answer to an authenticated request (auth::RESPONSE_HEADER).
    pub fn sign(&self, nonce: &str, response: &mut Response) {
        let mac = auth::response_mac(&self.key, nonce, response.status, &response.body);
        response.headers.push((auth::RESPONSE_HEADER, mac));
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// What a restart must not forget of the wrong proofs.
    pub fn guard_state(&self, now_ms: u64) -> GuardState {
        self.guard.state(now_ms)
    }

    /// Whether `Host` names this portal. DNS rebinding reaches this address
    /// under another site's name; a name is never one of ours (the portal
    /// has none: the probes' redirect and the captive API use the address).
    fn host_is_ours(&self, request: &Request) -> bool {
        let Some(ip) = request.host.and_then(host_address) else { return false };
        ip == request.local.to_canonical() || self.facts.addresses.iter().any(|a| a.to_canonical() == ip)
    }

    /// `now_ms` is monotonic (lock-outs, nonces); `unix_now` is wall-clock
    /// seconds, already raised to the clock floor (certificate validity).
    pub fn handle(&mut self, request: &Request, now_ms: u64, unix_now: u64, random: [u8; 16]) -> Handled {
        if !self.host_is_ours(request) {
            return match (request.method, request.path) {
                (_, path) if path.starts_with("/api/") => Handled::reply(Response::error(
                    421,
                    "host-refused",
                    "the Host header names another site; the portal answers only at its own address",
                )),
                // A captive probe for another site's name: to the portal.
                ("GET", _) | ("HEAD", _) => Handled::reply(Response::redirect(self.facts.portal_url.clone())),
                _ => Handled::reply(Response::error(405, "method-not-allowed", "only GET and the API")),
            };
        }
        match (request.method, request.path) {
            ("GET", "/") | ("GET", "/index.html") => Handled::reply(self.page()),
            ("GET", "/api/v1/info") => Handled::reply(self.info(now_ms, random)),
            // RFC 8908: the captive-portal API that DHCP option 114 points at.
            ("GET", "/captive-portal/api") => Handled::reply(Response {
                content_type: "application/captive+json",
                ..Response::json(
                    200,
                    &serde_json::json!({"captive": !self.progress.provisioned, "user-portal-url": self.facts.portal_url}),
                )
            }),
            (_, path) if path.starts_with("/api/") => self.authenticated(request, now_ms, unix_now),
            // Android (generate_204), Apple (hotspot-detect.html), Windows
            // (connecttest.txt, ncsi.txt), Firefox (canonical.html,
            // success.txt), and whatever else a phone asks for while every
            // name resolves here: a redirect makes it open the page.
            ("GET", _) | ("HEAD", _) => Handled::reply(Response::redirect(self.facts.portal_url.clone())),
            _ => Handled::reply(Response::error(405, "method-not-allowed", "only GET and the API")),
        }
    }

    fn page(&self) -> Response {
        let body = PAGE
            .replace("{{DEVICE}}", &html_escape(&self.facts.device_id))
            .replace("{{HARDWARE}}", &html_escape(&self.facts.hardware));
        Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            headers: vec![("Cache-Control", "no-store".into())],
            body: body.into_bytes(),
        }
    }

    fn info(&self, now_ms: u64, random: [u8; 16]) -> Response {
        let nonce = self.nonces.issue(random, now_ms);
        Response::json(
            200,
            &serde_json::json!({
                "device": self.facts.device_id,
                "hardware": self.facts.hardware,
                "fleetd_version": crate::VERSION,
                "state": self.progress.state,
                "provisioned": self.progress.provisioned,
                "last_error": self.progress.last_error,
                // The image names its registrar: a claim code is enough.
                "registrar": self.facts.registrar.is_some(),
                // For the next authenticated request (auth.rs).
                "nonce": nonce,
            }),
        )
    }

    fn authenticated(&mut self, request: &Request, now_ms: u64, unix_now: u64) -> Handled {
        let source = Source::of(request.peer);
        if let Err(LockedOut { retry_after_ms }) = self.guard.check(source, now_ms) {
            let mut response = Response::error(
                429,
                "locked-out",
                &format!(
                    "too many wrong proofs of possession; try again in {} s",
                    retry_after_ms.div_ceil(1000)
                ),
            );
            response.headers.push(("Retry-After", retry_after_ms.div_ceil(1000).to_string()));
            return Handled::reply(response);
        }
        let checked = auth::verify(
            &self.key,
            &mut self.nonces,
            request.authorization,
            request.method,
            request.path,
            request.body,
            now_ms,
        );
        let nonce = match checked {
            Ok(nonce) => nonce,
            Err(e) => {
                let mut log = None;
                let guard_changed = e == AuthError::Wrong;
                if guard_changed {
                    if let Some(lockout) = self.guard.failed(source, now_ms) {
                        log = Some(format!(
                            "provisioning: locked-out: too many wrong proofs of possession from {source}; \
                             it is locked for {} s",
                            lockout.retry_after_ms / 1000
                        ));
                    }
                }
                let response = Response::error(401, e.name(), &e.to_string());
                return Handled::Reply { response, log, guard_changed };
            }
        };
        self.guard.succeeded(source);
        let mut handled = match (request.method, request.path) {
            ("GET", "/api/v1/networks") => Handled::reply(Response::json(200, &self.networks)),
            ("GET", "/api/v1/csr") => match self.device_key.csr_pem(&self.facts.device_id) {
                Ok(csr) => Handled::reply(Response::json(200, &serde_json::json!({"csr_pem": csr}))),
                Err(e) => Handled::reply(Response::error(500, e.name(), &e.to_string())),
            },
            ("POST", "/api/v1/provision") => self.provision(request.body, unix_now, &nonce),
            ("POST", "/api/v1/rescan") => Handled::Rescan {
                response: Response::json(
                    202,
                    &serde_json::json!({"rescanning": true,
                        "detail": "the access point drops for a few seconds to scan; reconnect, then ask /api/v1/networks"}),
                ),
                busy: Response::error(409, "busy", "a rescan or a provisioning is under way"),
            },
            _ => Handled::reply(Response::error(404, "not-found", request.path)),
        };
        match &mut handled {
            Handled::Reply { response, .. } => self.sign(&nonce, response),
            Handled::Rescan { response, busy } => {
                self.sign(&nonce, response);
                self.sign(&nonce, busy);
            }
            Handled::Provision { .. } => {}
        }
        handled
    }

    fn provision(&mut self, body: &[u8], unix_now: u64, nonce: &str) -> Handled {
        if self.in_flight {
            return Handled::reply(Response::error(
                409,
                "busy",
                "a provisioning request is being carried out; ask /api/v1/info for its outcome",
            ));
        }
        if self.progress.provisioned {
            return Handled::reply(Response::error(
                409,
                "already-provisioned",
                "this device is provisioned; `fleetd reset --factory` on the device unlocks provisioning",
            ));
        }
        let request = match ProvisionRequest::parse_for(body, self.facts.registrar.as_ref()) {
            Ok(r) => r,
            Err(e) => return Handled::reply(Response::error(400, e.name(), &e.to_string())),
        };
        if let (Some(wifi), false) = (&request.wifi, self.facts.joins_wifi) {
            return Handled::reply(Response::error(
                400,
                "wifi-unsupported",
                &format!(
                    "this device has no Wi-Fi backend (backend none) to join {:?} with; \
                     provision it without a Wi-Fi network",
                    wifi.ssid
                ),
            ));
        }
        let plan = match request.how {
            How::Identity { mqtt, identity } => {
                let checked = identity::check(
                    &self.facts.device_id,
                    &identity.cert_pem,
                    identity.key_pem.as_deref(),
                    Some(&self.device_key),
                    &mqtt.ca_pem,
                    unix_now,
                );
                match checked {
                    Ok(identity) => Plan::Identity { mqtt, identity },
                    Err(e) => return Handled::reply(Response::error(400, e.name(), &e.to_string())),
                }
            }
            How::Enroll(enroll) => Plan::Enroll(enroll),
        };
        self.in_flight = true;
        Handled::Provision { wifi: request.wifi, plan: Box::new(plan), nonce: nonce.to_string() }
    }

    /// The answer once the request is stored: the device now joins the
    /// Wi-Fi (or, without one, connects to the broker).
    /// `enrolling`: the device enrolls with its registrar next (after the
    /// Wi-Fi, if any); `/api/v1/info` tells the outcome.
    pub fn stored(&mut self, joining: Option<&str>, enrolling: bool) -> Response {
        self.progress.last_error = None;
        let next = match (joining, enrolling) {
            (Some(ssid), false) => format!("joining {ssid}; this access point goes down now"),
            (Some(ssid), true) => {
                format!("joining {ssid}, then enrolling with the registrar; this access point goes down now")
            }
            (None, false) => "connecting to the broker".to_string(),
            (None, true) => "enrolling with the registrar; /api/v1/info tells the outcome".to_string(),
        };
        Response::json(200, &serde_json::json!({"accepted": true, "next": next}))
    }

    pub fn store_failed(&mut self, error: &str) -> Response {
        self.in_flight = false;
        Response::error(500, "store-failed", error)
    }
}

/// The address a `Host` header names (`10.42.0.1`, `10.42.0.1:8080`,
/// `[fe80::1]:80`), canonical; `None` for a name.
fn host_address(host: &str) -> Option<IpAddr> {
    let host = host.trim();
    let ip = if let Some(rest) = host.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        ip.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)?
    } else {
        let address = match host.rsplit_once(':') {
            Some((address, port)) if port.bytes().all(|b| b.is_ascii_digit()) => address,
            _ => host,
        };
        address.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)?
    };
    Some(ip.to_canonical())
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const PAGE: &str = include_str!("page.html");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::guard::GuardPolicy;
    use crate::provision::pop::{Pop, POP_BYTES};

    const PORTAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 42, 0, 1));
    const PHONE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 42, 0, 23));
    const NEIGHBOUR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 42, 0, 66));

    fn portal_with(joins_wifi: bool) -> (Portal, Pop) {
        let pop = Pop::from_bytes([9; POP_BYTES]);
        let facts = Facts {
            device_id: "gw-1".into(),
            hardware: "rpi4".into(),
            portal_url: "http://10.42.0.1/".into(),
            addresses: vec![PORTAL],
            joins_wifi,
            registrar: None,
        };
        let progress = Progress { state: "provisioning".into(), provisioned: false, last_error: None };
        let guard = Guard::new(GuardPolicy::default());
        (Portal::new(facts, &pop, DeviceKey::generate().unwrap(), progress, [5; 32], guard), pop)
    }

    fn portal() -> (Portal, Pop) {
        portal_with(true)
    }

    fn get<'a>(path: &'a str, authorization: Option<&'a str>) -> Request<'a> {
        Request {
            method: "GET",
            path,
            host: Some("10.42.0.1"),
            authorization,
            body: b"",
            peer: PHONE,
            local: PORTAL,
        }
    }

    fn reply(handled: Handled) -> (Response, Option<String>) {
        match handled {
            Handled::Reply { response, log, .. } => (response, log),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn error_name(response: &Response) -> String {
        let v: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        v["error"].as_str().unwrap_or_default().to_string()
    }

    fn nonce(portal: &mut Portal, now: u64) -> String {
        let (r, _) = reply(portal.handle(&get("/api/v1/info", None), now, 0, [now as u8; 16]));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["nonce"].as_str().unwrap().to_string()
    }

    fn signed(portal: &mut Portal, pop: &Pop, method: &str, path: &str, body: &[u8], now: u64) -> Response {
        signed_from(portal, pop, PHONE, method, path, body, now)
    }

    fn signed_from(
        portal: &mut Portal,
        pop: &Pop,
        peer: IpAddr,
        method: &str,
        path: &str,
        body: &[u8],
        now: u64,
    ) -> Response {
        let n = nonce(portal, now);
        let header = auth::authorization(&pop.request_key("gw-1"), method, path, &n, body);
        let request = Request { method, path, authorization: Some(&header), body, peer, ..get(path, None) };
        reply(portal.handle(&request, now, 0, [1; 16])).0
    }

    #[test]
    fn the_page_info_and_probes_need_no_pop_and_everything_else_does() {
        let (mut p, pop) = portal();
        let (page, _) = reply(p.handle(&get("/", None), 0, 0, [0; 16]));
        assert_eq!(page.status, 200);
        assert!(String::from_utf8(page.body).unwrap().contains("gw-1"));
        for probe in
            ["/generate_204", "/hotspot-detect.html", "/connecttest.txt", "/canonical.html", "/success.txt"]
        {
            let (r, _) = reply(p.handle(&get(probe, None), 0, 0, [0; 16]));
            assert_eq!(r.status, 302, "{probe}");
            assert!(r.headers.contains(&("Location", "http://10.42.0.1/".into())), "{probe}");
        }
        for path in ["/api/v1/networks", "/api/v1/csr"] {
            let (r, _) = reply(p.handle(&get(path, None), 0, 0, [0; 16]));
            assert_eq!(r.status, 401, "{path}");
        }
        p.set_networks(vec![Network { ssid: "home".into(), signal: 70, security: "wpa2".into() }]);
        let r = signed(&mut p, &pop, "GET", "/api/v1/networks", b"", 1);
        assert_eq!(r.status, 200);
        assert_eq!(String::from_utf8(r.body).unwrap(), r#"[{"ssid":"home","signal":70,"security":"wpa2"}]"#);
        let r = signed(&mut p, &pop, "GET", "/api/v1/csr", b"", 2);
        assert!(String::from_utf8(r.body).unwrap().contains("BEGIN CERTIFICATE REQUEST"));
        let (r, _) =
            reply(p.handle(&Request { method: "POST", ..get("/api/v1/rescan", None) }, 3, 0, [0; 16]));
        assert_eq!(r.status, 401, "a rescan needs the PoP too");
        let n = nonce(&mut p, 4);
        let header = auth::authorization(&pop.request_key("gw-1"), "POST", "/api/v1/rescan", &n, b"");
        let rescan = Request { method: "POST", ..get("/api/v1/rescan", Some(&header)) };
        assert!(
            matches!(p.handle(&rescan, 4, 0, [5; 16]), Handled::Rescan { response, .. } if response.status == 202)
        );
    }

    #[test]
    fn wrong_proofs_lock_their_source_and_the_lockout_is_logged_once() {
        let (mut p, pop) = portal();
        let wrong = Pop::from_bytes([8; POP_BYTES]);
        let mut statuses = std::collections::BTreeMap::new();
        let (mut logs, mut persisted) = (Vec::new(), 0);
        for i in 0..1000u64 {
            let n = nonce(&mut p, i);
            let header = auth::authorization(&wrong.request_key("gw-1"), "GET", "/api/v1/csr", &n, b"");
            let request = Request { peer: NEIGHBOUR, ..get("/api/v1/csr", Some(&header)) };
            let Handled::Reply { response, log, guard_changed } = p.handle(&request, i, 0, [2; 16]) else {
                panic!("a reply")
            };
            *statuses.entry(response.status).or_insert(0) += 1;
            logs.extend(log);
            persisted += usize::from(guard_changed);
        }
        assert_eq!(statuses.get(&401), Some(&5), "{statuses:?}");
        assert_eq!(statuses.get(&429), Some(&995));
        assert_eq!(persisted, 5, "each counted wrong proof is to be persisted");
        assert_eq!(logs.len(), 1);
        assert!(logs[0].contains("locked-out") && logs[0].contains("10.42.0.66"), "{}", logs[0]);
        // The right PoP from the locked address waits too; from the
        // installer's address it is checked.
        assert_eq!(signed_from(&mut p, &pop, NEIGHBOUR, "GET", "/api/v1/csr", b"", 1000).status, 429);
        assert_eq!(signed(&mut p, &pop, "GET", "/api/v1/csr", b"", 1001).status, 200);
        assert_eq!(signed_from(&mut p, &pop, NEIGHBOUR, "GET", "/api/v1/csr", b"", 31_000).status, 200);
        let state = p.guard_state(31_000);
        assert!(state.sources.is_empty(), "a success forgets its source: {state:?}");
        assert_eq!(state.global_spent, 5);
    }

    /// A page on another site whose name was rebound to the portal's
    /// address (the browser sends that site's name) reaches no API; probes
    /// for other sites' names get the redirect that opens the portal.
    #[test]
    fn a_foreign_host_gets_no_api_and_probes_are_redirected() {
        let (mut p, pop) = portal();
        for host in
            [Some("rebind.attacker.example"), Some("rebind.attacker.example:80"), Some("10.0.0.9"), None]
        {
            for (method, path) in
                [("GET", "/api/v1/info"), ("GET", "/api/v1/csr"), ("POST", "/api/v1/provision")]
            {
                let (r, _) = reply(p.handle(&Request { method, host, ..get(path, None) }, 0, 0, [0; 16]));
                assert_eq!((r.status, error_name(&r).as_str()), (421, "host-refused"), "{host:?} {path}");
            }
            let (page, _) = reply(p.handle(&Request { host, ..get("/", None) }, 0, 0, [0; 16]));
            assert_eq!(page.status, 302, "{host:?}: the page only at the portal's own address");
        }
        for (host, probe) in [
            ("connectivitycheck.gstatic.com", "/generate_204"),
            ("captive.apple.com", "/hotspot-detect.html"),
            ("www.msftconnecttest.com", "/connecttest.txt"),
            ("detectportal.firefox.com", "/canonical.html"),
        ] {
            let (r, _) = reply(p.handle(&Request { host: Some(host), ..get(probe, None) }, 0, 0, [0; 16]));
            assert_eq!(r.status, 302, "{host}{probe}");
            assert!(r.headers.contains(&("Location", "http://10.42.0.1/".into())), "{host}{probe}");
        }
        // The portal's own address, with a port, or the one the connection
        // reached (a wildcard listener) are the portal's.
        for (host, local) in
            [("10.42.0.1", PORTAL), ("10.42.0.1:80", PORTAL), ("192.168.7.2:8080", [192, 168, 7, 2].into())]
        {
            let (r, _) = reply(p.handle(
                &Request { host: Some(host), local, ..get("/api/v1/info", None) },
                0,
                0,
                [0; 16],
            ));
            assert_eq!(r.status, 200, "{host}");
        }
        let v6: IpAddr = "fe80::1".parse().unwrap();
        let (r, _) = reply(p.handle(
            &Request { host: Some("[fe80::1]:80"), local: v6, ..get("/api/v1/info", None) },
            0,
            0,
            [0; 16],
        ));
        assert_eq!(r.status, 200);
        assert_eq!(signed(&mut p, &pop, "GET", "/api/v1/csr", b"", 1).status, 200);
    }

    #[test]
    fn without_a_wifi_backend_a_request_with_wifi_is_refused_at_once() {
        let (mut p, pop) = portal_with(false);
        let body = serde_json::json!({
            "wifi": {"ssid": "home-net", "psk": "correct horse"},
            "mqtt": {"host": "broker", "ca_pem": "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n"},
            "identity": {"cert_pem": "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n"},
        })
        .to_string();
        let r = signed(&mut p, &pop, "POST", "/api/v1/provision", body.as_bytes(), 0);
        assert_eq!((r.status, error_name(&r).as_str()), (400, "wifi-unsupported"));
        assert!(String::from_utf8(r.body).unwrap().contains("home-net"));
        assert!(!p.in_flight, "nothing is in flight");
    }

    /// A request in flight (stored, the Wi-Fi being joined) holds single
    /// use: a second is 409 busy until the join fails and the portal opens.
    /// Every authenticated answer carries the device's MAC.
    #[test]
    fn one_request_at_a_time_and_answers_are_signed() {
        let (mut p, pop) = portal();
        let key = pop.request_key("gw-1");
        let n = nonce(&mut p, 0);
        let header = auth::authorization(&key, "GET", "/api/v1/csr", &n, b"");
        let (csr, _) = reply(p.handle(&get("/api/v1/csr", Some(&header)), 0, 0, [3; 16]));
        let mac = csr.headers.iter().find(|(k, _)| *k == auth::RESPONSE_HEADER).map(|(_, v)| v.as_str());
        assert_eq!(auth::verify_response(&key, &n, 200, &csr.body, mac), Ok(()));

        let csr: serde_json::Value = serde_json::from_slice(&csr.body).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let params =
            rcgen::CertificateSigningRequestParams::from_pem(csr["csr_pem"].as_str().unwrap()).unwrap();
        let cert = params.signed_by(&issuer).unwrap().pem();
        let body = serde_json::json!({
            "wifi": {"ssid": "home", "psk": "correct horse"},
            "mqtt": {"host": "broker", "ca_pem": ca_pem},
            "identity": {"cert_pem": cert},
        })
        .to_string();
        let post = |p: &mut Portal, at: u64| {
            let n = nonce(p, at);
            let header = auth::authorization(&key, "POST", "/api/v1/provision", &n, body.as_bytes());
            let request =
                Request { method: "POST", body: body.as_bytes(), ..get("/api/v1/provision", Some(&header)) };
            p.handle(&request, at, 1_800_000_000, [4; 16])
        };
        assert!(matches!(post(&mut p, 1), Handled::Provision { .. }));
        let (busy, _) = reply(post(&mut p, 2));
        assert_eq!(busy.status, 409);
        assert!(String::from_utf8(busy.body).unwrap().contains("\"busy\""));
        p.set_progress(Progress {
            state: "provisioning".into(),
            provisioned: false,
            last_error: Some("join-failed".into()),
        });
        assert!(matches!(post(&mut p, 3), Handled::Provision { .. }), "open again after a failed join");
    }

    #[test]
    fn a_bad_request_is_400_with_its_name_and_a_provisioned_device_says_409() {
        let (mut p, pop) = portal();
        let r = signed(&mut p, &pop, "POST", "/api/v1/provision", b"{}", 0);
        assert_eq!(r.status, 400);
        assert!(String::from_utf8(r.body).unwrap().contains("\"error\":\"identity-missing\""));
        p.set_progress(Progress { state: "idle".into(), provisioned: true, last_error: None });
        assert_eq!(signed(&mut p, &pop, "POST", "/api/v1/provision", b"{}", 1).status, 409);
    }

    /// An image that names its registrar: `/api/v1/info` says so, and a
    /// claim code alone is a request (url and CA from the image).
    #[test]
    fn with_the_images_registrar_a_claim_code_is_enough() {
        let (mut p, pop) = portal();
        let (r, _) = reply(p.handle(&get("/api/v1/info", None), 0, 0, [1; 16]));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["registrar"], false);
        let body = br#"{"enroll":{"claim":"7k2m9q4rxw3th8vn"}}"#;
        let r = signed(&mut p, &pop, "POST", "/api/v1/provision", body, 1);
        assert_eq!((r.status, error_name(&r).as_str()), (400, "enroll-url-invalid"));

        p.facts.registrar = Some(Registrar { url: "https://reg.example".into(), ca_pem: Some("CA".into()) });
        let (r, _) = reply(p.handle(&get("/api/v1/info", None), 2, 0, [2; 16]));
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["registrar"], true);
        let n = nonce(&mut p, 3);
        let header = auth::authorization(&pop.request_key("gw-1"), "POST", "/api/v1/provision", &n, body);
        let request = Request { method: "POST", body, ..get("/api/v1/provision", Some(&header)) };
        match p.handle(&request, 3, 0, [3; 16]) {
            Handled::Provision { wifi: None, plan, .. } => match *plan {
                Plan::Enroll(e) => {
                    assert_eq!(e.registrar.endpoint("enroll"), "https://reg.example/v1/enroll");
                    assert_eq!(e.claim.display_code(), "7K2M-9Q4R-XW3T-H8VN");
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }
}
