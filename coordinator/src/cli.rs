//! The `longhaul` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::runfile;

/// longhaul: train one model on GPUs scattered across the internet.
#[derive(Debug, Parser)]
#[command(name = "longhaul", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write an annotated example run file.
    Init {
        /// Where to write it.
        #[arg(default_value = "run.toml")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init { path, force } => {
            if path.exists() && !force {
                bail!("{} exists (use --force to overwrite)", path.display());
            }
            std::fs::write(&path, runfile::EXAMPLE)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {}; edit it, then `longhaul submit {}`",
                path.display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
