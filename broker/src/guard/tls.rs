//! TLS for the public listeners (rustls, ring): certificate and key from the listener's
//! `[v4.N.tls]` section; with `capath`, clients must present a certificate signed by that CA.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rumqttd::TlsConfig;
use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(String),
    #[error("native-tls (pkcs12) is not supported; use certpath/keypath (PEM)")]
    NativeTls,
}

fn file_err(path: &str, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = std::fs::File::open(Path::new(path)).map_err(|e| file_err(path, e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = std::fs::File::open(Path::new(path)).map_err(|e| file_err(path, e))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| file_err(path, e))?
        .ok_or_else(|| file_err(path, "no PEM private key in the file"))
}

/// Builds the acceptor once at start, so a bad file fails the start instead of every handshake.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let TlsConfig::Rustls {
        capath,
        certpath,
        keypath,
    } = config
    else {
        return Err(TlsError::NativeTls);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match capath {
        Some(capath) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(capath)? {
                roots.add(cert).map_err(|e| file_err(capath, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certificates(certpath)?, private_key(keypath)?)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
