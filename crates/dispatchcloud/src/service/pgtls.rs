//! PostgreSQL connections made the way libpq makes them from `PostgreSQL.Connection`, so an
//! operator's Arvados settings mean the same here: `sslmode` (`disable`, `allow`, `prefer` —
//! libpq's default —, `require`, `verify-ca`, `verify-full`) over rustls, `sslrootcert` for the
//! CA to trust, plus what every dispatcher connection needs: a connect timeout and TCP
//! keepalives, so a database host that vanishes is noticed.
//!
//! As in libpq, `prefer` and `require` encrypt without checking the server's certificate;
//! `verify-ca` and `verify-full` check it against `sslrootcert` (or the system's roots when it
//! is not set). Both verify modes also check the host name: rustls has no "chain only" mode,
//! so `verify-ca` is the stricter `verify-full` here. Client certificates (`sslcert`,
//! `sslkey`) are not supported and are refused with a clear message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::Client;
use tokio_postgres::config::SslMode;
use tokio_util::sync::CancellationToken;

use super::dblock::{connection_string, watch_connection};

/// How to treat TLS, from `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    /// `allow` and `prefer`: TLS if the server offers it, certificate not checked.
    Prefer,
    /// TLS required, certificate not checked.
    Require,
    /// TLS required, certificate and host name checked (`verify-ca`, `verify-full`).
    Verify,
}

/// The connection settings split into what tokio-postgres reads and what this module handles.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnSettings {
    /// libpq `key='value'` text without the TLS keys.
    pub conninfo: String,
    pub tls: TlsMode,
    pub root_cert: Option<String>,
}

/// Split `PostgreSQL.Connection` into [`ConnSettings`]; a value this module cannot honour is
/// an error naming its key.
pub fn settings(params: &BTreeMap<String, String>) -> Result<ConnSettings, String> {
    let mut rest = params.clone();
    let mode = rest.remove("sslmode").unwrap_or_default();
    let tls = match mode.as_str() {
        "disable" => TlsMode::Disable,
        "" | "allow" | "prefer" => TlsMode::Prefer,
        "require" => TlsMode::Require,
        "verify-ca" | "verify-full" => TlsMode::Verify,
        other => {
            return Err(format!(
                "PostgreSQL.Connection.sslmode: unknown value {other:?} (disable, allow, prefer, require, verify-ca or verify-full)"
            ));
        }
    };
    let root_cert = rest.remove("sslrootcert").filter(|s| !s.is_empty());
    for key in ["sslcert", "sslkey", "sslpassword", "sslcrl"] {
        if rest.remove(key).is_some_and(|v| !v.is_empty()) {
            return Err(format!(
                "PostgreSQL.Connection.{key}: client certificates are not supported"
            ));
        }
    }
    Ok(ConnSettings {
        conninfo: connection_string(&rest),
        tls,
        root_cert,
    })
}

/// Accepts any server certificate (libpq's `prefer` and `require`), but still checks that the
/// handshake is signed by the key in it.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls client configuration for `s`.
fn tls_config(s: &ConnSettings) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    if s.tls != TlsMode::Verify {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    match &s.root_cert {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("PostgreSQL.Connection.sslrootcert {path}: {e}"))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("PostgreSQL.Connection.sslrootcert {path}: {e}"))?;
            if certs.is_empty() {
                return Err(format!(
                    "PostgreSQL.Connection.sslrootcert {path}: no certificate in the file"
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("PostgreSQL.Connection.sslrootcert {path}: {e}"))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Connect as `params` say, within `timeout`, with TCP keepalives. Returns the client, the
/// connection task, a token cancelled when the connection ends, and the flag that
/// marks an intended close.
pub async fn connect(
    params: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<
    (
        Client,
        tokio::task::JoinHandle<()>,
        CancellationToken,
        Arc<AtomicBool>,
    ),
    String,
> {
    let s = settings(params)?;
    let mut cfg: tokio_postgres::Config = s
        .conninfo
        .parse()
        .map_err(|e| format!("PostgreSQL.Connection: {e}"))?;
    cfg.connect_timeout(timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(60))
        .ssl_mode(match s.tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::Verify => SslMode::Require,
        });
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(&s)?);
    let (client, conn) = cfg
        .connect(tls)
        .await
        .map_err(|e| arvados::client::error_chain(&e))?;
    let (task, lost, releasing) = watch_connection(conn);
    Ok((client, task, lost, releasing))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sslmode_maps_like_libpq_and_tls_keys_are_not_passed_on() {
        let s = settings(&params(&[
            ("host", "db"),
            ("sslmode", "verify-full"),
            ("sslrootcert", "/ca.pem"),
        ]))
        .unwrap();
        assert_eq!(s.tls, TlsMode::Verify);
        assert_eq!(s.root_cert.as_deref(), Some("/ca.pem"));
        assert_eq!(s.conninfo, "host='db'");
        for (mode, want) in [
            ("", TlsMode::Prefer),
            ("allow", TlsMode::Prefer),
            ("prefer", TlsMode::Prefer),
            ("disable", TlsMode::Disable),
            ("require", TlsMode::Require),
            ("verify-ca", TlsMode::Verify),
        ] {
            assert_eq!(
                settings(&params(&[("sslmode", mode)])).unwrap().tls,
                want,
                "{mode}"
            );
        }
        let e = settings(&params(&[("sslmode", "always")])).unwrap_err();
        assert!(
            e.starts_with("PostgreSQL.Connection.sslmode: unknown value \"always\""),
            "{e}"
        );
        let e = settings(&params(&[("sslcert", "/c.pem")])).unwrap_err();
        assert!(
            e.contains("sslcert: client certificates are not supported"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_root_certificate_file_is_named() {
        let s = settings(&params(&[
            ("sslmode", "verify-full"),
            ("sslrootcert", "/nonexistent/ca.pem"),
        ]))
        .unwrap();
        let e = tls_config(&s).unwrap_err();
        assert!(
            e.starts_with("PostgreSQL.Connection.sslrootcert /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
