//! PostgreSQL through Hyperdrive.
//!
//! One connection per request, opened on a Workers socket to the Hyperdrive
//! endpoint and closed when the `Client` is dropped. Hyperdrive owns the pool to
//! the real database, so a surge of isolates does not become a connection storm.

use tokio_postgres::{Client, SimpleQueryMessage};
use worker::postgres_tls::PassthroughTls;
use worker::{Env, SecureTransport, Socket};

/// Connects through the Hyperdrive binding named `binding`.
pub async fn connect(env: &Env, binding: &str) -> Result<Client, String> {
    let hyperdrive = env
        .hyperdrive(binding)
        .map_err(|e| format!("binding {binding}: {e}"))?;
    let socket = Socket::builder()
        .secure_transport(SecureTransport::StartTls)
        .connect(hyperdrive.host(), hyperdrive.port())
        .map_err(|e| format!("socket: {e}"))?;
    let config = hyperdrive
        .connection_string()
        .parse::<tokio_postgres::Config>()
        .map_err(|e| format!("connection string: {e}"))?;
    let (client, connection) = config
        .connect_raw(socket, PassthroughTls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    worker::wasm_bindgen_futures::spawn_local(async move {
        // The connection ends when the client is dropped; errors here are already
        // reported to the caller through the client.
        let _ = connection.await;
    });
    Ok(client)
}

/// The first column of each row a simple query answered (a NULL is skipped),
/// in order.
pub fn first_column(messages: &[SimpleQueryMessage]) -> impl DoubleEndedIterator<Item = &str> {
    messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    })
}
