//! A real HTTP/1.1 server on loopback for firmware images, with Range
//! support and faults injected on request: cut connections, extra bytes,
//! stalls, error statuses. It logs every request it served.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Fault {
    /// Send this many body bytes of the response, then close the connection.
    CutAfter(u64),
    /// Send the whole requested range and then this many more bytes (no Content-Length).
    Extra(u64),
    /// Send this many bytes, then go silent for the duration.
    Stall(u64, Duration),
    /// Send the body at about this many bytes per second.
    Throttle(u64),
    /// Answer with this status and no body.
    Status(u16),
    /// Ignore the Range header and send the whole file with 200.
    IgnoreRange,
    /// Answer as without faults (to let one request through a queue of them).
    Pass,
    /// Answer a range with at most this many bytes, as a CDN that caps
    /// ranges does (Content-Range says what is sent).
    ShortRange(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub path: String,
    pub range_start: u64,
    pub body_bytes: u64,
    /// When the request arrived.
    pub at: std::time::Instant,
    /// When the body was sent (or the connection failed).
    pub finished: Option<std::time::Instant>,
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, Arc<Vec<u8>>>,
    faults: VecDeque<Fault>,
    log: Vec<Served>,
    /// Bytes per second for every response without a fault of its own.
    rate: Option<u64>,
}

#[derive(Clone)]
pub struct ImageServer {
    pub base: String,
    inner: Arc<Mutex<Inner>>,
}

impl ImageServer {
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0")
    }

    pub fn start_on(addr: &str) -> Self {
        let listener = TcpListener::bind(addr).expect("bind image server");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner::default()));
        let shared = inner.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        Self { base, inner }
    }

    pub fn add(&self, path: &str, data: Vec<u8>) -> String {
        self.inner.lock().unwrap().files.insert(path.to_string(), Arc::new(data));
        format!("{}{path}", self.base)
    }

    /// Queues faults: each applies to one response, in order.
    pub fn fault(&self, fault: Fault) {
        self.inner.lock().unwrap().faults.push_back(fault);
    }

    /// Slows every later response to about `bytes_per_second` (None: full speed).
    pub fn set_rate(&self, bytes_per_second: Option<u64>) {
        self.inner.lock().unwrap().rate = bytes_per_second;
    }

    pub fn log(&self) -> Vec<Served> {
        self.inner.lock().unwrap().log.clone()
    }
}

fn serve(stream: TcpStream, inner: &Arc<Mutex<Inner>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let arrived = std::time::Instant::now();
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range_start = 0u64;
        let mut range_end: Option<u64> = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("Range: bytes=").or_else(|| line.strip_prefix("range: bytes="))
            {
                let (start, end) = v.split_once('-').unwrap_or((v, ""));
                range_start = start.parse().unwrap_or(0);
                range_end = end.parse().ok();
            }
        }
        let (file, fault) = {
            let mut g = inner.lock().unwrap();
            let fault = g.faults.pop_front().or(g.rate.map(Fault::Throttle));
            (g.files.get(&path).cloned(), fault)
        };
        let Some(file) = file else {
            stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        };
        if let Some(Fault::Status(code)) = fault {
            write!(stream, "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        }
        let ignore_range = matches!(fault, Some(Fault::IgnoreRange));
        let start = if ignore_range { 0 } else { range_start.min(file.len() as u64) };
        let mut end = match range_end {
            Some(e) if !ignore_range => (e + 1).min(file.len() as u64),
            _ => file.len() as u64,
        };
        let ranged = !ignore_range && (start > 0 || range_end.is_some());
        if let Some(Fault::ShortRange(n)) = fault {
            if ranged {
                end = end.min(start + n);
            }
        }
        let body = &file[start as usize..end as usize];
        let mut head = if ranged {
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\n",
                end - 1,
                file.len()
            )
        } else {
            "HTTP/1.1 200 OK\r\n".to_string()
        };
        if matches!(fault, Some(Fault::Extra(_))) {
            head.push_str("Connection: close\r\n\r\n");
        } else {
            head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        }
        stream.write_all(head.as_bytes())?;
        let (send, after): (usize, Option<Fault>) = match &fault {
            Some(Fault::CutAfter(n)) | Some(Fault::Stall(n, _)) => {
                ((*n as usize).min(body.len()), fault.clone())
            }
            _ => (body.len(), fault.clone()),
        };
        // Logged on arrival; the byte count is filled in as the body goes out.
        let index = {
            let mut g = inner.lock().unwrap();
            g.log.push(Served {
                path: path.clone(),
                range_start: start,
                body_bytes: 0,
                at: arrived,
                finished: None,
            });
            g.log.len() - 1
        };
        let mut sent = 0usize;
        // A throttled body goes out in chunks of at most a second's worth,
        // so a slow rate is a steady drip rather than one burst and a pause.
        let (chunk_len, pace) = match &fault {
            Some(Fault::Throttle(rate)) => {
                let chunk = (*rate).clamp(1, 64 * 1024);
                (chunk as usize, Some(Duration::from_secs_f64(chunk as f64 / *rate as f64)))
            }
            _ => (64 * 1024, None),
        };
        for chunk in body[..send].chunks(chunk_len) {
            if stream.write_all(chunk).is_err() {
                break;
            }
            sent += chunk.len();
            inner.lock().unwrap().log[index].body_bytes = sent as u64;
            if let Some(pause) = pace {
                std::thread::sleep(pause);
            }
        }
        {
            let mut g = inner.lock().unwrap();
            g.log[index].body_bytes = sent as u64;
            g.log[index].finished = Some(std::time::Instant::now());
        }
        match after {
            Some(Fault::CutAfter(_)) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Stall(_, d)) => {
                std::thread::sleep(d);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Extra(n)) => {
                let _ = stream.write_all(&vec![0xEE; n as usize]);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            _ => {}
        }
    }
}
