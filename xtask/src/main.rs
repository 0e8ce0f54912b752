//! `cargo xtask`: developer tasks for sbx (guest assets, VM tests, benchmarks).

use clap::{Parser, Subcommand};

/// Developer tasks for sbx.
#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {}
}
