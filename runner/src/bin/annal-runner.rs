//! `annal-runner`: runs declarative SQL projections from a configuration file, and lets
//! operators inspect (`status`, `dead-letters list`) and control (`rebuild`, `dead-letters
//! retry|skip`, `migrate`) them. See `docs/runner.md`.

#[tokio::main]
async fn main() {
    std::process::exit(annal_runner::main_with(Vec::new()).await);
}
