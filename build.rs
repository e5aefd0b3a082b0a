//! Rebuilds the crate when a migration is added or changed: `src/db.rs` embeds
//! `migrations/` at compile time (refinery's `embed_migrations!`), which Cargo
//! cannot see on its own.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
