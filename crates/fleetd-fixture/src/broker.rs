//! A tiny MQTT 3.1.1 broker for `fleetd demo` — a demo aid, NOT for
//! production use. It lets the demo run the real daemon and fleet-side client
//! on one machine: plain TCP on 127.0.0.1, no authentication. Supported:
//! CONNECT/CONNACK, SUBSCRIBE/SUBACK (`+` and `#` filters), UNSUBSCRIBE,
//! PUBLISH at QoS 0 and 1 (delivered at the lower of the two QoS), retained
//! messages, the last will on an unclean disconnect, PINGREQ, DISCONNECT,
//! and the keep-alive timeout.
//!
//! Not supported: QoS 2 (a QoS 2 PUBLISH closes the connection; QoS 2
//! subscriptions are granted QoS 1), sessions (CONNACK always says
//! `session_present = 0`), redelivery of unacknowledged messages,
//! persistence, `$SYS`. A client id already connected takes the old
//! connection over without publishing its will. Packets are at most
//! [`MAX_PACKET`] bytes; anything malformed closes that one connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// The largest packet accepted (fixed header included).
pub const MAX_PACKET: usize = 128 * 1024;

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBSCRIBE: u8 = 8;
const UNSUBSCRIBE: u8 = 10;
const PINGREQ: u8 = 12;
const DISCONNECT: u8 = 14;

/// Binds 127.0.0.1 on a free port and serves on the current tokio runtime
/// until it stops.
pub async fn start() -> std::io::Result<SocketAddr> {
    start_denying(Vec::new()).await
}

/// As `start`, refusing (SubAck return code 0x80) every subscription whose
/// filter starts with one of `denied`, as brokers that enforce ACLs at
/// subscribe time do. Lets tests exercise a client's SubAck failure path.
pub async fn start_denying(denied: Vec<String>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let broker = Arc::new(Mutex::new(Broker { denied, ..Broker::default() }));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(connection(stream, broker.clone()));
        }
    });
    Ok(addr)
}

#[derive(Default)]
struct Broker {
    /// client id → its live connection.
    clients: HashMap<String, Client>,
    /// topic → (payload, QoS).
    retained: BTreeMap<String, (Vec<u8>, u8)>,
    next_connection: u64,
    /// Filter prefixes whose subscription is refused.
    denied: Vec<String>,
}

struct Client {
    connection: u64,
    out: mpsc::UnboundedSender<Vec<u8>>,
    /// filter → granted QoS.
    subscriptions: BTreeMap<String, u8>,
    next_id: u16,
    unacked: HashSet<u16>,
    /// Dropping the client (take-over) wakes its connection, which then closes.
    _kick: oneshot::Sender<()>,
}

impl Client {
    fn send_publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        let mut id = 0;
        if qos > 0 {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            id = self.next_id;
            self.unacked.insert(id);
        }
        let _ = self.out.send(publish_packet(topic, payload, qos, retain, id));
    }
}

impl Broker {
    fn route(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        if retain && payload.is_empty() {
            self.retained.remove(topic);
        } else if retain {
            self.retained.insert(topic.to_string(), (payload.to_vec(), qos));
        }
        for client in self.clients.values_mut() {
            let granted =
                client.subscriptions.iter().filter(|(f, _)| topic_matches(f, topic)).map(|(_, q)| *q);
            if let Some(granted) = granted.max() {
                client.send_publish(topic, payload, qos.min(granted), false);
            }
        }
    }
}

fn lock(broker: &Mutex<Broker>) -> std::sync::MutexGuard<'_, Broker> {
    broker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One client connection: CONNECT first, then packets until it ends.
async fn connection(stream: TcpStream, broker: Arc<Mutex<Broker>>) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let first = tokio::time::timeout(Duration::from_secs(10), read_packet(&mut rd)).await;
    let Some(connect) =
        first.ok().flatten().filter(|(b, _)| *b == CONNECT << 4).and_then(|(_, body)| parse_connect(&body))
    else {
        return;
    };
    let (out, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
    let (kick, mut kicked) = oneshot::channel();
    let mut client_id = connect.client_id;
    let connection = {
        let mut b = lock(&broker);
        b.next_connection += 1;
        if client_id.is_empty() {
            client_id = format!("demo-anonymous-{}", b.next_connection);
        }
        let client = Client {
            connection: b.next_connection,
            out: out.clone(),
            subscriptions: BTreeMap::new(),
            next_id: 0,
            unacked: HashSet::new(),
            _kick: kick,
        };
        b.clients.insert(client_id.clone(), client);
        b.next_connection
    };
    let _ = out.send(vec![0x20, 2, 0, 0]);
    tokio::spawn(async move {
        while let Some(packet) = outgoing.recv().await {
            if wr.write_all(&packet).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    // MQTT-3.1.2-24: one and a half keep-alive periods of silence end it.
    let idle = match connect.keep_alive {
        0 => Duration::MAX,
        s => Duration::from_millis(u64::from(s) * 1500),
    };
    let clean = loop {
        let packet = tokio::select! {
            p = tokio::time::timeout(idle, read_packet(&mut rd)) => p.ok().flatten(),
            _ = &mut kicked => break true,
        };
        let Some((byte1, body)) = packet else { break false };
        match handle(&broker, &client_id, &out, byte1, &body) {
            Some(true) => continue,
            Some(false) => break true,
            None => break false,
        }
    };
    let mut b = lock(&broker);
    if b.clients.get(&client_id).is_some_and(|c| c.connection == connection) {
        b.clients.remove(&client_id);
        if let (false, Some(will)) = (clean, connect.will) {
            b.route(&will.topic, &will.payload, will.qos, will.retain);
        }
    }
}

/// Handles one packet after CONNECT: `Some(true)` go on, `Some(false)` a
/// clean DISCONNECT, `None` a protocol error (close; the will goes out).
fn handle(
    broker: &Mutex<Broker>,
    client_id: &str,
    out: &mpsc::UnboundedSender<Vec<u8>>,
    byte1: u8,
    body: &[u8],
) -> Option<bool> {
    let mut r = Reader(body);
    match (byte1 >> 4, byte1 & 0x0f) {
        (PUBLISH, flags) => {
            let (qos, retain) = ((flags >> 1) & 3, flags & 1 == 1);
            let topic = r.string().filter(|t| qos <= 1 && valid_topic(t))?;
            if qos == 1 {
                let id = r.u16().filter(|id| *id != 0)?;
                let _ = out.send(vec![PUBACK << 4, 2, (id >> 8) as u8, id as u8]);
            }
            lock(broker).route(topic, r.0, qos, retain);
        }
        (PUBACK, 0) => {
            let id = r.u16().filter(|_| r.0.is_empty())?;
            if let Some(client) = lock(broker).clients.get_mut(client_id) {
                client.unacked.remove(&id);
            }
        }
        (SUBSCRIBE, 2) => {
            let id = r.u16()?;
            let mut wanted = Vec::new();
            while !r.0.is_empty() {
                let filter = r.string().filter(|f| valid_filter(f))?;
                let qos = r.u8().filter(|q| *q <= 2)?;
                wanted.push((filter.to_string(), qos.min(1)));
            }
            if wanted.is_empty() {
                return None;
            }
            let mut b = lock(broker);
            let refused = |f: &str| b.denied.iter().any(|d| f.starts_with(d.as_str()));
            let mut suback = id.to_be_bytes().to_vec();
            suback.extend(wanted.iter().map(|(f, q)| if refused(f) { 0x80 } else { *q }));
            wanted.retain(|(f, _)| !refused(f));
            let _ = out.send(packet(0x90, &suback));
            let Broker { clients, retained, .. } = &mut *b;
            let client = clients.get_mut(client_id)?;
            for (filter, qos) in wanted {
                for (topic, (payload, stored)) in retained.iter().filter(|(t, _)| topic_matches(&filter, t)) {
                    client.send_publish(topic, payload, qos.min(*stored), true);
                }
                client.subscriptions.insert(filter, qos);
            }
        }
        (UNSUBSCRIBE, 2) => {
            let id = r.u16()?;
            let mut b = lock(broker);
            let client = b.clients.get_mut(client_id)?;
            client.subscriptions.remove(r.string()?); // at least one
            while !r.0.is_empty() {
                client.subscriptions.remove(r.string()?);
            }
            let _ = out.send(packet(0xb0, &id.to_be_bytes()));
        }
        (PINGREQ, 0) if body.is_empty() => {
            let _ = out.send(vec![0xd0, 0]);
        }
        (DISCONNECT, 0) if body.is_empty() => return Some(false),
        _ => return None,
    }
    Some(true)
}

/// Reads one packet: the first byte and the body. `None` on EOF, an IO
/// error, a malformed length or a packet over [`MAX_PACKET`].
async fn read_packet(rd: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    let byte1 = rd.read_u8().await.ok()?;
    let mut length = Vec::with_capacity(4);
    let len = loop {
        length.push(rd.read_u8().await.ok()?);
        if let Some((len, _)) = decode_remaining_length(&length).ok()? {
            break len;
        }
    };
    if len + 1 + length.len() > MAX_PACKET {
        return None;
    }
    let mut body = vec![0; len];
    rd.read_exact(&mut body).await.ok()?;
    Some((byte1, body))
}

#[derive(Debug, PartialEq, Eq)]
struct Malformed;

/// The remaining length: `Ok(Some((value, bytes used)))`, `Ok(None)` when
/// more bytes are needed, `Err` past the four bytes MQTT allows.
fn decode_remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, Malformed> {
    let mut value = 0usize;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(Malformed)
    } else {
        Ok(None)
    }
}

fn encode_remaining_length(mut len: usize, out: &mut Vec<u8>) {
    while len >= 128 {
        out.push((len % 128) as u8 | 0x80);
        len /= 128;
    }
    out.push(len as u8);
}

fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    encode_remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn publish_packet(topic: &str, payload: &[u8], qos: u8, retain: bool, id: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(PUBLISH << 4 | qos << 1 | u8::from(retain), &body)
}

/// A cursor over a packet body; every read checks the bounds.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// Two-byte length, then that many bytes.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
    /// UTF-8 without NUL (MQTT-1.5.3-2).
    fn string(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok().filter(|s| !s.contains('\0'))
    }
}

struct Will {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
}

struct Connect {
    client_id: String,
    keep_alive: u16,
    will: Option<Will>,
}

fn parse_connect(body: &[u8]) -> Option<Connect> {
    let mut r = Reader(body);
    if (r.string()?, r.u8()?) != ("MQTT", 4) {
        return None;
    }
    let flags = r.u8()?;
    let keep_alive = r.u16()?;
    let client_id = r.string()?.to_string();
    // Reserved bit; will QoS/retain without a will; QoS 3.
    if flags & 0x01 != 0 || (flags & 0x04 == 0 && flags & 0x38 != 0) || (flags >> 3) & 3 == 3 {
        return None;
    }
    let mut will = None;
    if flags & 0x04 != 0 {
        let topic = r.string().filter(|t| valid_topic(t))?.to_string();
        let payload = r.bytes()?.to_vec();
        will = Some(Will { topic, payload, qos: ((flags >> 3) & 3).min(1), retain: flags & 0x20 != 0 });
    }
    // User name and password: accepted, not checked.
    if (flags & 0x80 != 0 && r.string().is_none()) || (flags & 0x40 != 0 && r.bytes().is_none()) {
        return None;
    }
    r.0.is_empty().then_some(Connect { client_id, keep_alive, will })
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

/// `#` only as the whole last level, `+` only as a whole level.
fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && levels.iter().enumerate().all(|(i, level)| match *level {
            "#" => i + 1 == levels.len(),
            "+" => true,
            other => !other.contains(['+', '#']),
        })
}

/// Whether `topic` matches `filter`. Wildcards at the first level do not
/// match topics starting with `$` (MQTT-4.7.2-1).
fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_round_trips_at_every_boundary() {
        for (value, len) in [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3)] {
            let mut out = Vec::new();
            encode_remaining_length(value, &mut out);
            assert_eq!(out.len(), len, "{value}");
            assert_eq!(decode_remaining_length(&out), Ok(Some((value, len))));
        }
        let mut max = Vec::new();
        encode_remaining_length(268_435_455, &mut max);
        assert_eq!(max, [0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(decode_remaining_length(&max), Ok(Some((268_435_455, 4))));
        assert_eq!(decode_remaining_length(&[0x80, 0x80]), Ok(None), "needs more bytes");
        assert_eq!(decode_remaining_length(&[0xff, 0xff, 0xff, 0xff, 0x01]), Err(Malformed));
        assert_eq!(decode_remaining_length(&[0xc1, 0x02, 0x99]), Ok(Some((321, 2))), "stops at the end");
    }

    #[test]
    fn strings_are_bounded_utf8_without_nul() {
        assert_eq!(Reader(b"\x00\x03abcrest").string(), Some("abc"));
        assert_eq!(Reader(b"\x00\x00").string(), Some(""));
        assert_eq!(Reader(b"\x00\x05abc").string(), None, "truncated");
        assert_eq!(Reader(b"\x00").string(), None, "no length");
        assert_eq!(Reader(b"\x00\x02\xff\xfe").string(), None, "not UTF-8");
        assert_eq!(Reader(b"\x00\x02a\x00").string(), None, "NUL");
        let mut r = Reader(b"\x00\x01x\x12\x34");
        assert_eq!((r.string(), r.u16(), r.u8()), (Some("x"), Some(0x1234), None));
    }

    #[test]
    fn topic_filters_match_as_mqtt_says() {
        for (filter, topic, expected) in [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a//c", true),
            ("+/+", "/x", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("fleet/p/devices/+/status", "fleet/p/devices/gw-1/status", true),
            ("fleet/p/devices/+/status", "fleet/p/devices/gw-1/progress", false),
        ] {
            assert_eq!(topic_matches(filter, topic), expected, "{filter} vs {topic}");
        }
        for (filter, valid) in [("a/#", true), ("#", true), ("+", true), ("a/#/b", false), ("a+", false)] {
            assert_eq!(valid_filter(filter), valid, "{filter}");
        }
        assert!(!valid_filter(""));
        assert!(valid_topic("a/b") && !valid_topic("a/+") && !valid_topic(""));
    }

    #[test]
    fn connect_parsing_rejects_what_is_malformed() {
        let mut body = b"\x00\x04MQTT\x04\x2e\x00\x3c\x00\x02gw\x00\x01t\x00\x02hi".to_vec();
        let c = parse_connect(&body).expect("valid CONNECT with a retained QoS 1 will");
        let will = c.will.expect("will");
        assert_eq!((c.client_id.as_str(), c.keep_alive), ("gw", 60));
        assert_eq!(
            (will.topic.as_str(), will.payload.as_slice(), will.qos, will.retain),
            ("t", &b"hi"[..], 1, true)
        );
        body.push(0);
        assert!(parse_connect(&body).is_none(), "trailing bytes");
        assert!(parse_connect(b"\x00\x04MQTT\x04\x01\x00\x3c\x00\x00").is_none(), "reserved flag");
        assert!(parse_connect(b"\x00\x04MQTT\x05\x02\x00\x3c\x00\x00").is_none(), "MQTT 5");
        assert!(parse_connect(b"\x00\x04MQTT\x04\x02\x00").is_none(), "truncated");
    }

    #[test]
    fn publish_packets_encode_header_id_and_payload() {
        assert_eq!(publish_packet("a/b", b"x", 1, true, 7), b"\x33\x08\x00\x03a/b\x00\x07x");
        assert_eq!(publish_packet("t", b"", 0, false, 0), b"\x30\x03\x00\x01t");
    }

    #[tokio::test]
    async fn malformed_input_closes_only_that_connection() {
        use tokio::io::AsyncReadExt;
        let addr = start().await.unwrap();
        let connect: &[u8] = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00";
        let closed = |mut s: TcpStream| async move { matches!(s.read(&mut [0; 8]).await, Ok(0) | Err(_)) };
        for bad in [&b"\x20\x02\x00\x00"[..], b"\x10\xff\xff\xff\xff\x01", b"\x10\x80\x80\x10"] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(bad).await.unwrap();
            assert!(closed(s).await, "{bad:?} before CONNECT");
        }
        let qos2 = b"\x34\x06\x00\x01t\x00\x01x";
        let wildcard_topic = b"\x30\x03\x00\x01#";
        let subscribe_flags = b"\x80\x06\x00\x01\x00\x01t\x00";
        let short_puback = b"\x40\x01\x00";
        for bad in [&qos2[..], wildcard_topic, subscribe_flags, short_puback, connect] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&[connect, bad].concat()).await.unwrap();
            let mut connack = [0; 4];
            s.read_exact(&mut connack).await.unwrap();
            assert_eq!(connack, [0x20, 2, 0, 0]);
            assert!(closed(s).await, "{bad:?} after CONNECT");
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[connect, b"\xc0\x00"].concat()).await.unwrap();
        let mut answers = [0; 6];
        s.read_exact(&mut answers).await.unwrap();
        assert_eq!(answers, [0x20, 2, 0, 0, 0xd0, 0], "the broker still serves: CONNACK, PINGRESP");
    }

    /// A real client against the broker: QoS 1 delivery, retained messages
    /// on subscribe, and the will of a connection that vanished.
    #[tokio::test]
    async fn rumqttc_clients_exchange_messages() {
        use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
        let addr = start().await.unwrap();
        let connect = |id: &str, will: bool| {
            let mut o = MqttOptions::new(id, "127.0.0.1", addr.port());
            if will {
                o.set_last_will(LastWill::new("dev/online", "false", QoS::AtLeastOnce, true));
            }
            AsyncClient::new(o, 8)
        };
        let (device, mut device_loop) = connect("device", true);
        device.publish("dev/status", QoS::AtLeastOnce, true, "v7").await.unwrap();
        while !matches!(device_loop.poll().await, Ok(Event::Incoming(Packet::PubAck(_)))) {}
        drop((device, device_loop)); // no DISCONNECT: the will goes out

        let (watcher, mut watch_loop) = connect("watcher", false);
        watcher.subscribe("dev/+", QoS::AtLeastOnce).await.unwrap();
        let mut seen = BTreeMap::new();
        while seen.len() < 2 {
            if let Event::Incoming(Packet::Publish(p)) = watch_loop.poll().await.unwrap() {
                // The will may go out before or after this subscription.
                assert!(p.retain || p.topic == "dev/online", "retained messages carry the flag");
                seen.insert(p.topic.clone(), p.payload.to_vec());
            }
        }
        assert_eq!(seen["dev/status"], b"v7");
        assert_eq!(seen["dev/online"], b"false");

        let (fleet, mut fleet_loop) = connect("fleet", false);
        fleet.publish("dev/update", QoS::AtLeastOnce, false, "v8").await.unwrap();
        tokio::spawn(async move { while fleet_loop.poll().await.is_ok() {} });
        loop {
            if let Event::Incoming(Packet::Publish(p)) = watch_loop.poll().await.unwrap() {
                assert_eq!((p.topic.as_str(), p.qos, p.retain), ("dev/update", QoS::AtLeastOnce, false));
                break;
            }
        }
    }
}
