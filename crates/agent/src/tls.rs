//! TLS to the control plane (`wss://`): rustls with ring, verifying the control plane's
//! certificate against `ca_file` when it is set, else against the system's trusted
//! certificates (which honour `SSL_CERT_FILE` and `SSL_CERT_DIR`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite;

/// The connector for `wss://`, made once at start so that a missing or unreadable CA file
/// is a configuration error rather than a reason to retry for ever.
pub fn connector(ca_file: Option<&Path>) -> Result<Connector, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read `ca_file` {}: {e}", path.display()))?;
            roots.add_parsable_certificates(certs);
            if roots.is_empty() {
                return Err(format!(
                    "`ca_file` {} holds no usable PEM certificate",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "cannot read some of the system's trusted certificates");
            }
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no trusted certificates found on this host to verify the control plane's (wss://); install the system's CA certificates or set `ca_file`".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

/// A TLS failure in words that say what to fix, when `error` is one.
pub fn explain(error: &tungstenite::Error) -> Option<String> {
    let tungstenite::Error::Io(io) = error else {
        return None;
    };
    let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(why) => format!(
            "the control plane's certificate is not trusted ({why:?}); set `ca_file` to the PEM certificate of the CA that signed it"
        ),
        other => format!("TLS with the control plane failed: {other}"),
    })
}
