//! The `interceptor` binary: parse the command line, set up logging, dispatch.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use interceptor::{ca, identity::TrustDomain, probe};

#[derive(Parser)]
#[command(
    name = "interceptor",
    version,
    about = "Transparent mutual TLS for pods, eBPF-steered, kernel-TLS accelerated"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show what this kernel offers and which data path the agent will use.
    Probe {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Treat missing kernel TLS as an error (as `ktls: required` does).
        #[arg(long)]
        require_ktls: bool,
    },
    /// Manage the built-in certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a root key (mode 0600) and certificate.
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing CA (every issued certificate stops being trusted).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INTERCEPTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("interceptor: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Probe { json, require_ktls } => {
            let report = probe::run(require_ktls);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Cmd::Ca {
            command:
                CaCmd::Init {
                    trust_domain,
                    dir,
                    force,
                },
        } => {
            let td: TrustDomain = trust_domain.parse()?;
            let on_existing = if force {
                ca::OnExisting::Replace
            } else {
                ca::OnExisting::Refuse
            };
            ca::Ca::init(&td, &dir, on_existing)?;
            eprintln!("wrote CA for trust domain {td} to {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
