//! A small WebDriver client (the W3C protocol is JSON over HTTP) driving
//! Debian's headless Chromium through chromedriver, for the portal's
//! browser test. `Browser::start` returns `None` where either is missing.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Headless Chromium on a phone-sized viewport (390×844 CSS pixels).
    pub fn start() -> Option<Browser> {
        if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let profile = tempfile::tempdir().ok()?;
        let mut browser =
            Browser { driver, addr: format!("127.0.0.1:{port}"), session: String::new(), _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(20);
        while browser.request("GET", "/status", None).map(|v| v["value"]["ready"] != true).unwrap_or(true) {
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": args,
                "mobileEmulation": {
                    "deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 2.0},
                    "userAgent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120 Mobile Safari/537.36"
                }
            }
        }}});
        let created = browser.request("POST", "/session", Some(caps)).expect("a WebDriver session");
        browser.session = created["value"]["sessionId"].as_str().expect("a session id").to_string();
        Some(browser)
    }

    fn request(&self, method: &str, path: &str, body: Option<Value>) -> std::io::Result<Value> {
        let mut stream = TcpStream::connect(&self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )?;
        // chromedriver keeps the connection open whatever the request
        // says: read the head, then exactly Content-Length bytes.
        let mut response = Vec::new();
        let mut buf = [0u8; 8192];
        let (head_end, length) = loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::other("chromedriver closed the connection"));
            }
            response.extend_from_slice(&buf[..n]);
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (end + 4, length);
            }
        };
        while response.len() < head_end + length {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
        }
        let json = String::from_utf8_lossy(&response[head_end..]);
        Ok(serde_json::from_str(&json).unwrap_or(Value::Null))
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let value = self.request(method, &path, body).expect("chromedriver answers")["value"].clone();
        assert!(value.get("error").is_none(), "{method} {path}: {value}");
        value
    }

    pub fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({"url": url})));
    }

    pub fn title(&self) -> String {
        self.command("GET", "/title", None).as_str().unwrap_or_default().to_string()
    }

    pub fn current_url(&self) -> String {
        self.command("GET", "/url", None).as_str().unwrap_or_default().to_string()
    }

    fn element(&self, css: &str) -> String {
        let found = self.command("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        found[ELEMENT].as_str().expect("an element").to_string()
    }

    /// Types as a person would, key by key.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.command("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.command("POST", &format!("/element/{id}/value"), Some(json!({"text": text})));
    }

    /// Pastes a long text (a PEM) in one go, then fires `input` as a paste does.
    pub fn paste_into(&self, css: &str, text: &str) {
        self.execute(
            "const e = document.querySelector(arguments[0]); e.value = arguments[1]; \
             e.dispatchEvent(new Event('input', {bubbles: true}));",
            json!([css, text]),
        );
    }

    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.command("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    pub fn value(&self, css: &str) -> String {
        self.execute("return document.querySelector(arguments[0]).value;", json!([css]))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn text(&self, css: &str) -> String {
        let id = self.element(css);
        self.command("GET", &format!("/element/{id}/text"), None).as_str().unwrap_or_default().to_string()
    }

    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.command("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    /// Waits until `done` holds, polling the page.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() >= deadline {
                let page = self.execute("return document.body.innerText;", json!([]));
                panic!("timed out waiting for {what}; the page says:\n{}", page.as_str().unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let b64 = self.command("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// A PNG of the whole page, beyond the viewport (Chromium's CDP).
    pub fn full_page_screenshot(&self, path: &Path) {
        self.execute("window.scrollTo(0, 0);", json!([]));
        let height =
            self.execute("return document.documentElement.scrollHeight;", json!([])).as_u64().unwrap_or(844);
        self.command(
            "POST",
            "/goog/cdp/execute",
            Some(json!({"cmd": "Emulation.setDeviceMetricsOverride",
                        "params": {"width": 390, "height": height, "deviceScaleFactor": 2, "mobile": true}})),
        );
        self.screenshot(path);
        self.command(
            "POST",
            "/goog/cdp/execute",
            Some(json!({"cmd": "Emulation.setDeviceMetricsOverride",
                        "params": {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}})),
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
