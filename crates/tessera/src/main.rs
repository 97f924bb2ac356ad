//! `tessera`: one binary for the pool. For now it carries the trace simulator (`tessera sim`);
//! the controller, agent and user verbs join it as they land.

mod sim;

use clap::{Parser, Subcommand};

/// Tessera makes a room of accelerator machines one pool.
#[derive(Parser)]
#[command(name = "tessera", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay production traces through Tessera's placement engine.
    #[command(subcommand)]
    Sim(sim::SimCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(cmd) => sim::run(cmd),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
