//! The fleet side's MQTT: publish an update message, watch devices report.

use fleetd::mqtt::Topics;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::time::Duration;

pub struct FleetConnection {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Mutual TLS; `None` only for the built-in demo's loopback broker.
    pub tls: Option<rustls::ClientConfig>,
}

impl FleetConnection {
    pub(crate) fn options(self) -> rumqttc::MqttOptions {
        let mut options = match self.tls {
            Some(tls) => fleetd::mqtt::options(&self.client_id, &self.host, self.port, tls, 30, None),
            None => fleetd::mqtt::plain_options_for_demo(&self.client_id, &self.host, self.port, None),
        };
        options.set_clean_session(true).set_manual_acks(false);
        options
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("mqtt: {0}")]
    Connection(#[from] rumqttc::ConnectionError),
    #[error("mqtt: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("no PUBACK within {0:?}")]
    NoPuback(Duration),
}

/// One message to publish with QoS 1.
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Kept by the broker for every later subscriber (halts, rollouts).
    pub retain: bool,
}

/// Publishes `payload` with QoS 1 and returns once the broker acknowledged it.
pub async fn publish(
    conn: FleetConnection,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(), FleetError> {
    publish_all(conn, vec![Outgoing { topic: topic.to_string(), payload, retain: false }], timeout).await
}

/// Publishes every message over one connection, at most 64 unacknowledged
/// at once, and returns once the broker acknowledged them all.
pub async fn publish_all(
    conn: FleetConnection,
    messages: Vec<Outgoing>,
    timeout: Duration,
) -> Result<(), FleetError> {
    const IN_FLIGHT: usize = 64;
    let (client, mut eventloop) = AsyncClient::new(conn.options(), IN_FLIGHT);
    let total = messages.len();
    let mut queue = messages.into_iter();
    let work = async {
        let (mut sent, mut acked) = (0usize, 0usize);
        if total == 0 {
            return Ok(());
        }
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if sent == 0 => {
                    for m in queue.by_ref().take(IN_FLIGHT) {
                        client.try_publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)?;
                        sent += 1;
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == total {
                        return Ok(());
                    }
                    if let Some(m) = queue.next() {
                        client.try_publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)?;
                        sent += 1;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    };
    let result = tokio::time::timeout(timeout, work).await.map_err(|_| FleetError::NoPuback(timeout))?;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(300), eventloop.poll()).await;
    result
}

/// Prints `TOPIC PAYLOAD` for each status, progress and online message of
/// the project's devices, until `count` messages or `timeout`.
pub async fn watch(
    conn: FleetConnection,
    project: &str,
    count: Option<usize>,
    timeout: Option<Duration>,
    mut on_message: impl FnMut(&str, &[u8]),
) -> Result<(), FleetError> {
    let (client, mut eventloop) = AsyncClient::new(conn.options(), 8);
    let work = async {
        let mut seen = 0usize;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for topic in Topics::fleet_watch(project) {
                        client.try_subscribe(topic, QoS::AtMostOnce)?;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    on_message(&p.topic, &p.payload);
                    seen += 1;
                    if count.is_some_and(|c| seen >= c) {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    };
    match timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        },
        None => work.await,
    }
}
