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
    fn options(self) -> rumqttc::MqttOptions {
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

/// Publishes `payload` with QoS 1 and returns once the broker acknowledged it.
pub async fn publish(
    conn: FleetConnection,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(), FleetError> {
    let (client, mut eventloop) = AsyncClient::new(conn.options(), 8);
    let work = async {
        let mut sent = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !sent => {
                    client.try_publish(topic, QoS::AtLeastOnce, false, payload.clone())?;
                    sent = true;
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
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
