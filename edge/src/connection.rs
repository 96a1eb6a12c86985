//! MQTT connection options from the config: client id, persistent session, credentials and
//! TLS (rustls with the ring provider only; aws-lc would double the binary and is painful to
//! cross-compile).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::brokers::BrokerAddress;
use crate::config::{MqttConfig, Settings, TlsConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM")]
    Empty { path: String, what: &'static str },
    #[error("no trusted CA certificates (set mqtt.tls.ca_file)")]
    NoRoots,
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(&mut BufReader<File>) -> std::io::Result<T>,
) -> Result<T, TlsSetupError> {
    let read_err = |source| TlsSetupError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    parse(&mut BufReader::new(file)).map_err(read_err)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = read_pem(path, |r| {
        rustls_pemfile::certs(r).collect::<Result<Vec<_>, _>>()
    })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Empty {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Builds the rustls client config: the CA file if given, else the system store.
pub fn tls_client_config(tls: &TlsConfig) -> Result<ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in certs(path)? {
                roots.add(cert)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!("loading system CA certificates: {error}");
            }
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, "system CA certificates loaded");
        }
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert)?;
            let key: PrivateKeyDer<'static> = read_pem(key, |r| rustls_pemfile::private_key(r))?
                .ok_or_else(|| TlsSetupError::Empty {
                    path: key.display().to_string(),
                    what: "private key",
                })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// rumqttc options for `broker`: client id = device id unless configured, persistent session
/// (harmless, since correctness never depends on it: the outbox resends anyway), rumqttc's
/// in-flight window matched to ours.
pub fn mqtt_options(
    settings: &Settings,
    broker: &BrokerAddress,
) -> Result<MqttOptions, TlsSetupError> {
    let mqtt: &MqttConfig = &settings.raw.mqtt;
    let client_id = mqtt
        .client_id
        .clone()
        .unwrap_or_else(|| settings.device_id.as_str().to_string());
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    options.set_keep_alive(Duration::from_secs(mqtt.keep_alive_secs));
    options.set_clean_session(false);
    let window = settings
        .raw
        .publish
        .max_in_flight
        .clamp(1, usize::from(u16::MAX));
    options.set_inflight(window as u16);
    if let Some(username) = &mqtt.username {
        let password = mqtt
            .password
            .as_ref()
            .map(|p| p.expose())
            .unwrap_or_default();
        options.set_credentials(username.clone(), password);
    }
    if mqtt.tls.enabled {
        let config = tls_client_config(&mqtt.tls)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(options)
}
