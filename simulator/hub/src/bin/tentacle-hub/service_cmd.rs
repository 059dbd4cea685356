//! `tentacle-hub service`: the hub as a systemd service. The unit runs
//! `tentacle-hub --home HOME server FLAGS`, where FLAGS are what follows
//! `--`, checked here by the same parser the server uses.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tentacle_proto::systemd::{self, Program, ServiceArgs};

use super::{Cli, Command};

#[derive(Debug, clap::Args)]
pub struct ServiceCommand {
    #[command(flatten)]
    service: ServiceArgs,
    /// Flags for `tentacle-hub server`, after `--` (e.g. `-- --listen
    /// 0.0.0.0:10943 --metrics-listen 127.0.0.1:9101`).
    #[arg(last = true, value_name = "SERVER FLAGS")]
    server_flags: Vec<String>,
}

pub fn run(cli: &Cli, command: &ServiceCommand) -> ExitCode {
    match server_args(cli, command) {
        Ok(server_args) => {
            match systemd::run(&Program::Hub { server_args }, &command.service, &cli.home) {
                Ok(code) => code,
                Err(error) => fail(&error),
            }
        }
        Err(error) => fail(&error),
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("tentacle-hub: error: {error}");
    ExitCode::FAILURE
}

/// The flags after `--`, plus `--certificate`/`--key` when they were given
/// before `service` (as absolute paths, since the unit runs elsewhere).
fn server_args(cli: &Cli, command: &ServiceCommand) -> Result<Vec<String>, String> {
    let mut args = command.server_flags.clone();
    if let (Some(certificate), Some(key)) = (&cli.certificate, &cli.key) {
        for (flag, path) in [("--certificate", certificate), ("--key", key)] {
            let path = absolute(path)?;
            args.push(flag.to_owned());
            args.push(path);
        }
    }
    let argv = ["tentacle-hub", "server"]
        .into_iter()
        .map(str::to_owned)
        .chain(args.iter().cloned());
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Server(server),
            ..
        }) if server.is_serve() => Ok(args),
        Ok(_) => Err(
            "the flags after `--` are for `tentacle-hub server` itself, not one of its verbs"
                .to_owned(),
        ),
        Err(error) => Err(format!(
            "the flags after `--` are not valid for `tentacle-hub server`: {}",
            first_line(&error.to_string())
        )),
    }
}

fn absolute(path: &std::path::Path) -> Result<String, String> {
    let path: PathBuf = std::path::absolute(path)
        .map_err(|error| format!("resolving {}: {error}", path.display()))?;
    path.into_os_string()
        .into_string()
        .map_err(|path| format!("{} is not UTF-8", PathBuf::from(path).display()))
}

fn first_line(text: &str) -> &str {
    let text = text.trim_start_matches("error: ");
    text.lines().next().unwrap_or(text)
}
