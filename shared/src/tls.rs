//! TLS for every connection a binary makes (Redis `rediss://`, Postgres `sslmode=…`, an
//! `https://` trace collector, providers): rustls with one crypto provider, ring, installed
//! once per process before the first client is built.

use std::sync::Once;

/// Installs ring as the process's rustls crypto provider; later calls do nothing.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
