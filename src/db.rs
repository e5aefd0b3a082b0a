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

/// Connects to `url`. TLS follows the URL's `sslmode` as libpq does: `disable`
/// never, `prefer` (the default) when the server offers it, `require` always;
/// server certificates are checked against the Mozilla root set.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
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
