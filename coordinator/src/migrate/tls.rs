//! The TLS layer of the migration channel: rustls configurations for TLS 1.3 with mutual
//! authentication by pinned ed25519 keys.
//!
//! Raw public keys (RFC 7250) rather than self-signed certificates made from the keys: the
//! configuration holds keys, and a raw key is exactly what is compared; a certificate would add
//! an X.509 parser in front of the comparison, validity dates that can lapse and names that mean
//! nothing here, and nothing it carries would be checked. rustls offers raw keys in TLS 1.3 only,
//! which is the only version this channel speaks anyway.
//!
//! The verifier ([`Pinned`]) accepts exactly one presented key, compares the raw 32 bytes with
//! the peer list, and checks the handshake signature strictly (ed25519-dalek `verify_strict`, as
//! the registry's signatures are); a refusal is remembered on the verifier of that connection so
//! the error can name the refused key id (a TLS alert carries no text). Each connection gets
//! its own configuration and verifier for that reason.
//!
//! Cryptography: rustls's aws-lc-rs provider, restricted to the TLS 1.3 AEAD suites and the
//! X25519MLKEM768 hybrid key exchange (post-quantum; both ends are podsnap, so nothing older is
//! needed). No resumption, tickets or early data on either side.

use std::sync::{Arc, Mutex};

use ed25519_dalek::Signature;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use super::error::{Error, Result};
use super::identity::{key_from_spki, Identity, Peers};

/// The ALPN protocol both sides require.
pub(super) const ALPN: &[u8] = b"podsnap-migrate/1";

/// Why the verifier of one connection refused the peer's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// A well-formed ed25519 key that is not listed.
    NotListed { key_id: String },
    /// Not one ed25519 key.
    Invalid(String),
}

impl Refusal {
    /// The error for a connection with `addr`.
    pub(super) fn into_error(self, addr: &str) -> Error {
        match self {
            Refusal::NotListed { key_id } => Error::PeerNotListed {
                addr: addr.to_owned(),
                key_id,
            },
            Refusal::Invalid(reason) => Error::PeerKeyInvalid {
                addr: addr.to_owned(),
                reason,
            },
        }
    }
}

/// The peer list as a rustls verifier, for one connection.
#[derive(Debug)]
pub(super) struct Pinned {
    peers: Arc<Peers>,
    refused: Mutex<Option<Refusal>>,
}

impl Pinned {
    fn new(peers: Arc<Peers>) -> Arc<Pinned> {
        Arc::new(Pinned {
            peers,
            refused: Mutex::new(None),
        })
    }

    /// Why this connection's peer was refused, if it was.
    pub(super) fn refusal(&self) -> Option<Refusal> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }

    fn refuse(&self, refusal: Refusal) -> rustls::Error {
        log::warn!(
            "migration: refusing a peer: {}",
            match &refusal {
                Refusal::NotListed { key_id } => format!("its key {key_id} is not one of [migration] peers"),
                Refusal::Invalid(reason) => reason.clone(),
            }
        );
        if let Ok(mut slot) = self.refused.lock() {
            *slot = Some(refusal);
        }
        // access_denied: "a valid certificate was received, but ... the sender decided not to
        // proceed with negotiation".
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> std::result::Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(self.refuse(Refusal::Invalid(format!(
                "it presented {} keys, not one",
                intermediates.len() + 1
            ))));
        }
        let key = key_from_spki(end_entity.as_ref()).map_err(|e| self.refuse(Refusal::Invalid(e)))?;
        match self.peers.find(&key) {
            Some(peer) => {
                log::debug!("migration: peer key {} is listed", peer.key_id);
                Ok(())
            }
            None => Err(self.refuse(Refusal::NotListed {
                key_id: crate::oci::key_id(&key),
            })),
        }
    }

    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        let bad = || rustls::Error::InvalidCertificate(CertificateError::BadSignature);
        let key = key_from_spki(cert.as_ref()).map_err(|_| bad())?;
        let signature = Signature::from_slice(dss.signature()).map_err(|_| bad())?;
        key.verify_strict(message, &signature).map_err(|_| bad())?;
        Ok(HandshakeSignatureValid::assertion())
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken here".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken here".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// What both sides of every connection share: the provider and this node's key.
pub(super) struct Tls {
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    peers: Arc<Peers>,
}

impl Tls {
    pub(super) fn new(identity: &Identity, peers: Arc<Peers>) -> Result<Tls> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let config_error = |reason: String| Error::Config {
            config: format!("this node's key {}", identity.key_id()),
            reason,
        };
        let provider = Arc::new(CryptoProvider {
            cipher_suites: vec![
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            kx_groups: vec![aws_lc_rs::kx_group::X25519MLKEM768],
            ..aws_lc_rs::default_provider()
        });
        // The PKCS#8 document is zeroized when dropped; rustls keeps its own copy of the key.
        let pkcs8 = identity
            .signing_key()
            .to_pkcs8_der()
            .map_err(|e| config_error(format!("cannot encode it for TLS: {e}")))?;
        let signer = aws_lc_rs::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8.as_bytes()))
            .map_err(|e| config_error(format!("TLS cannot use it: {e}")))?;
        let spki = identity.spki_der()?;
        let key = Arc::new(CertifiedKey::new(vec![CertificateDer::from(spki)], signer));
        Ok(Tls { provider, key, peers })
    }

    /// A server configuration for one connection, and its verifier.
    pub(super) fn server(&self) -> Result<(Arc<ServerConfig>, Arc<Pinned>)> {
        let pinned = Pinned::new(self.peers.clone());
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.unusable(e))?
            .with_client_cert_verifier(pinned.clone())
            .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(self.key.clone())));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.max_early_data_size = 0;
        Ok((Arc::new(config), pinned))
    }

    /// A client configuration for one connection, and its verifier.
    pub(super) fn client(&self) -> Result<(Arc<ClientConfig>, Arc<Pinned>)> {
        let pinned = Pinned::new(self.peers.clone());
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.unusable(e))?
            .dangerous()
            .with_custom_certificate_verifier(pinned.clone())
            .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(self.key.clone())));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        config.enable_early_data = false;
        Ok((Arc::new(config), pinned))
    }

    fn unusable(&self, e: rustls::Error) -> Error {
        Error::Config {
            config: "the TLS provider".into(),
            reason: format!("it cannot speak TLS 1.3 with these settings: {e}"),
        }
    }
}

/// Whether an I/O error from the TLS layer is the peer's `access_denied` alert: it refused our
/// key.
pub(super) fn is_access_denied(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied)
            )
        })
}
