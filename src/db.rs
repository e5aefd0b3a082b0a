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

/// How many accounts hold an address not in Unicode NFC: those migration V18
/// had to leave as they were, because another account held the NFC spelling
/// of their address. Sign-in finds that other account, so an operator has to
/// decide what becomes of these (see the README's Deploy section).
pub async fn emails_not_in_nfc(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM users WHERE email IS NOT NFC NORMALIZED",
            &[],
        )
        .await?;
    Ok(row.get(0))
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
/// `prefer` and `require` are understood): `disable` never, `prefer` when the
/// server offers it, `require` always. Without one, `require` for a server
/// over the network, `prefer` on this machine ([`tls_default`]). Unlike
/// libpq's `prefer` and `require`, which do not check the server's
/// certificate, a certificate is always checked: against the Mozilla root
/// set, and the CA certificates in the PEM file that `PGSSLROOTCERT` names,
/// when set (libpq's variable; managed services often sign with a CA of
/// their own).
pub async fn connect(url: &str) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let config = tls_default(url)?;
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
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection closed: {e}");
        }
    });
    Ok(client)
}

/// `url` parsed, with TLS required when it names no `sslmode` and any of its
/// hosts is reached over the network. tokio-postgres (like libpq) defaults to
/// `prefer`: TLS if the server offers it. Then whoever sits between this tool
/// and the server can decline TLS for the server, and be sent the password
/// (in the clear, if it asks for it so): the certificate check never happens.
/// A server on this machine (a loopback address, `localhost`, a Unix socket)
/// keeps the default, as the local stack's does; an explicit `sslmode` is
/// always followed.
pub fn tls_default(url: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    use tokio_postgres::config::{Host, SslMode};
    let mut config: tokio_postgres::Config = url.parse()?;
    let local = |host: &Host| match host {
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        Host::Unix(_) => true,
    };
    let local_addr = |ip: &std::net::IpAddr| ip.is_loopback();
    let on_this_machine =
        config.get_hosts().iter().all(local) && config.get_hostaddrs().iter().all(local_addr);
    if !names_sslmode(url) && !on_this_machine {
        config.ssl_mode(SslMode::Require);
    }
    Ok(config)
}

/// Whether the connection string `url` sets `sslmode`: a query parameter of
/// the URL form, or a key of the `key=value` form.
fn names_sslmode(url: &str) -> bool {
    let is_key = |pair: &str| {
        pair.split_once('=')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("sslmode"))
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        url.split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(is_key))
    } else {
        url.split_whitespace().any(is_key)
    }
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
    fn a_server_over_the_network_gets_tls_required_unless_the_url_says_otherwise() {
        use tokio_postgres::config::SslMode;
        let mode = |url: &str| tls_default(url).unwrap().get_ssl_mode();
        // No sslmode, a server elsewhere: a downgrade to plain TCP must fail.
        assert_eq!(
            mode("postgres://u:p@db.example.com:5432/keenvpn"),
            SslMode::Require
        );
        assert_eq!(mode("postgres://u:p@203.0.113.7/keenvpn"), SslMode::Require);
        assert_eq!(
            mode("host=db.example.com user=u dbname=keenvpn"),
            SslMode::Require
        );
        // One remote host among local ones is enough.
        assert_eq!(
            mode("postgres://u:p@127.0.0.1,db.example.com/keenvpn"),
            SslMode::Require
        );
        // On this machine, the default stays.
        for local in [
            "postgres://u:p@127.0.0.1:5432/keenvpn",
            "postgres://u:p@localhost/keenvpn",
            "postgres://u:p@[::1]:5432/keenvpn",
            "host=/var/run/postgresql user=u dbname=keenvpn",
        ] {
            assert_eq!(mode(local), SslMode::Prefer, "{local}");
        }
        // The word elsewhere (a password) is no sslmode; a remote address
        // behind a local name is remote.
        assert_eq!(
            mode("postgres://u:sslmode@db.example.com/keenvpn"),
            SslMode::Require
        );
        assert_eq!(
            mode("postgres://u:p@db.example.com/keenvpn?application_name=sslmode"),
            SslMode::Require
        );
        assert_eq!(
            mode("host=localhost hostaddr=203.0.113.7 user=u"),
            SslMode::Require
        );
        assert_eq!(
            mode("host=localhost hostaddr=127.0.0.1 user=u"),
            SslMode::Prefer
        );
        // An explicit sslmode is followed, wherever the server is.
        assert_eq!(
            mode("postgres://u:p@db.example.com/keenvpn?sslmode=prefer"),
            SslMode::Prefer
        );
        assert_eq!(
            mode("postgres://u:p@db.example.com/keenvpn?sslmode=disable"),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://u:p@127.0.0.1/keenvpn?sslmode=require"),
            SslMode::Require
        );
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
