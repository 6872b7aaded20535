//! The daemon's MQTT side: the client's setup from the configuration, and
//! what its events tell systemd and the log.

use crate::config::{Broker, Config, MqttProfile};
use crate::logging::{self, Priority};
use crate::mqtt::{self, ClientEvent, ClientSetup, Topics};
use crate::sys::notify;

/// The client for `broker`: mutual TLS with `tls`, or plain MQTT on
/// loopback when `tls` is `None` (the built-in demo only; no configuration
/// can ask for it). The will says the device went offline.
pub(super) fn setup(config: &Config, broker: &Broker, tls: Option<rustls::ClientConfig>) -> ClientSetup {
    let topics = Topics::for_config(config);
    let will = Some((topics.online.clone(), b"false".to_vec()));
    let options = match tls {
        Some(tls) => {
            mqtt::options(&config.device.id, &broker.host, broker.port, tls, broker.keep_alive_s, will)
        }
        None => mqtt::plain_options_for_demo(&config.device.id, &broker.host, broker.port, will),
    };
    let aws_jobs = match broker.profile {
        MqttProfile::AwsIotJobs => Some(mqtt::aws::AwsJobs::new(&config.device.id)),
        MqttProfile::Native => None,
    };
    ClientSetup {
        options,
        topics,
        aws_jobs,
        reconnect: crate::backoff::ReconnectPacer::new(
            mqtt::RECONNECT,
            std::time::Duration::from_secs(broker.reconnect_spread_s),
            crate::backoff::stable_draw("fleetd reconnect", &config.device.id),
        ),
        connection_file: Some(config.device.state_dir.join("connection.json")),
        renewed: None,
    }
}

pub(super) fn log_client_event(event: &ClientEvent) {
    match event {
        ClientEvent::Connected { session_present } => {
            notify::status("connected to the broker");
            logging::log(&format!("mqtt: connected (session present: {session_present})"))
        }
        ClientEvent::Subscribed { topics } => {
            logging::log(&format!("mqtt: subscribed to {}", topics.join(", ")))
        }
        ClientEvent::SubscriptionRefused { topic } => logging::event(
            Priority::Error,
            &format!("mqtt-suback: the broker refused the subscription to {topic}"),
            &[(logging::ERROR, "mqtt-suback")],
        ),
        ClientEvent::Disconnected { error, retry_in } => {
            notify::status(&format!("disconnected ({error}); reconnecting"));
            logging::event(
                Priority::Warning,
                &format!("{error}; reconnecting in {} ms", retry_in.as_millis()),
                &[(logging::ERROR, error.name())],
            )
        }
    }
}
