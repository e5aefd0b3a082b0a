//! PostgreSQL schema management, native only.
//!
//! Migrations are the SQL files in `migrations/` (`V<n>__<name>.sql`), embedded
//! at compile time and applied by `refinery`, which records each applied
//! version with a checksum in `refinery_schema_history` and refuses to run if an
//! applied file was edited. Applying them again is a no-op.
//!
//! The dev seed (`seeds/dev.sql`) is demo data for local development and tests;
//! it is idempotent and never applied to production by the deploy steps.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Demo data for local development: regions, servers and demo accounts.
pub const DEV_SEED: &str = include_str!("../seeds/dev.sql");

/// Applies every pending migration; returns the versions applied by this call.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, refinery::Error> {
    let report = embedded::migrations::runner().run_async(client).await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// The number of migrations embedded in this build.
pub fn migration_count() -> usize {
    embedded::migrations::runner().get_migrations().len()
}

/// Applies the dev seed in one transaction.
pub async fn seed_dev(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(DEV_SEED).await?;
    tx.commit().await
}

/// Connects to `url`. TLS follows the URL's `sslmode` (only `disable`,
/// `prefer`, the default, and `require` are understood): `disable` never,
/// `prefer` when the server offers it, `require` always. Unlike libpq's
/// `prefer` and `require`, which do not check the server's certificate, a
/// certificate is always checked: against the Mozilla root set, and the CA
/// certificates in the PEM file that `PGSSLROOTCERT` names, when set (libpq's
/// variable; managed services often sign with a CA of their own).
pub async fn connect(url: &str) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let extra = std::env::var_os("PGSSLROOTCERT")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from);
    let roots = tls_roots(extra.as_deref())?;
    let tls_config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config);
    let (client, connection) = tokio_postgres::connect(url, tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection closed: {e}");
        }
    });
    Ok(client)
}

/// The roots a server certificate must chain to: the Mozilla root set, and
/// every certificate in the PEM file `extra`, which must hold at least one.
pub fn tls_roots(extra: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra {
        let bad = |e: &dyn std::fmt::Display| format!("PGSSLROOTCERT {}: {e}", path.display());
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad(&"no certificate in the file"));
        }
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mozilla() -> usize {
        webpki_roots::TLS_SERVER_ROOTS.len()
    }

    #[test]
    fn a_private_ca_file_adds_its_certificates_to_the_mozilla_roots() {
        assert_eq!(tls_roots(None).unwrap().len(), mozilla());
        let dir = std::env::temp_dir().join(format!("keenvpn-tls-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, include_str!("../tests/fixtures/private-ca.pem")).unwrap();
        assert_eq!(tls_roots(Some(&ca)).unwrap().len(), mozilla() + 1);
        // A file with no certificate, or none at all, is an error that names it.
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = tls_roots(Some(&empty)).unwrap_err();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = tls_roots(Some(&dir.join("missing.pem"))).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
