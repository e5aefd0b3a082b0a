//! `migrate`: applies the PostgreSQL migrations (and, for development, the demo
//! seed) to the database named by `--database-url` or `DATABASE_URL`.
//!
//! ```text
//! cargo run --bin migrate -- --database-url postgres://user:pass@host:5432/db [--seed]
//! ```

#[cfg(not(target_arch = "wasm32"))]
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    use std::process::ExitCode;

    let mut url = std::env::var("DATABASE_URL").ok();
    let mut seed = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--database-url" => url = args.next(),
            "--seed" => seed = true,
            "-h" | "--help" => {
                println!(
                    "usage: migrate [--database-url URL] [--seed]\n\nApplies migrations/ (and with --seed, seeds/dev.sql).\nThe URL defaults to $DATABASE_URL."
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("migrate: unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    let Some(url) = url else {
        eprintln!("migrate: no database: pass --database-url or set DATABASE_URL");
        return ExitCode::from(2);
    };

    let mut client = match keenvpn_edge::db::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            // The causes too: "error performing TLS handshake" alone does
            // not say that the certificate's issuer is unknown.
            let mut why = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                why.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("migrate: cannot connect to the database: {why}");
            return ExitCode::FAILURE;
        }
    };
    match keenvpn_edge::db::migrate(&mut client).await {
        Ok(applied) if applied.is_empty() => println!("migrate: schema up to date"),
        Ok(applied) => println!("migrate: applied versions {applied:?}"),
        Err(e) => {
            eprintln!("migrate: {e}");
            return ExitCode::FAILURE;
        }
    }
    match keenvpn_edge::db::emails_not_in_nfc(&client).await {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "migrate: warning: {n} account(s) hold an address not in NFC, which sign-in no longer \
             finds (another account holds its NFC spelling); list them with \
             SELECT id, email FROM users WHERE email IS NOT NFC NORMALIZED"
        ),
        Err(e) => {
            eprintln!("migrate: cannot count the addresses not in NFC: {e}");
            return ExitCode::FAILURE;
        }
    }
    if seed {
        if let Err(e) = keenvpn_edge::db::seed_dev(&mut client).await {
            eprintln!("migrate: seeding failed: {e}");
            return ExitCode::FAILURE;
        }
        println!("migrate: dev seed applied");
    }
    ExitCode::SUCCESS
}

#[cfg(target_arch = "wasm32")]
fn main() {}
