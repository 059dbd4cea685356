//! `tentacle-hub deploy`: a script on every agent of a role, through the hub.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tentacle_hub::deploy::{self, DeployObserver, DeployTarget, TargetOutcome, TargetResult};
use tentacle_hub::home::HubHome;
use tentacle_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::operator::fleet;
use tentacle_hub::args::HubArgs;

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// Deploy to agents with this role (all roles when omitted).
    #[arg(long, default_value = "")]
    role: String,
    /// Deploy to agents in this environment (all when omitted).
    #[arg(long, default_value = "")]
    environment: String,
    /// The script to run (bash).
    #[arg(long)]
    script: PathBuf,
    /// A .tar.gz or .zip to extract on every target first; the script finds
    /// it at $TENTACLE_PACKAGE_PATH. Agents that already have these bytes are
    /// not sent them again.
    #[arg(long)]
    package: Option<PathBuf>,
    /// Targets deployed to at once.
    #[arg(long, default_value_t = 10)]
    parallelism: usize,
    #[command(flatten)]
    hub: HubArgs,
}

pub async fn run(home: &HubHome, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let script = std::fs::read_to_string(&args.script)
        .with_context(|| format!("reading the script {}", args.script.display()))?;
    let mut packages = Vec::new();
    // The hub's tooling bundle goes first, to every target that lacks it.
    if let Some(bundle) = home.tooling_bundle() {
        let (_, sha256) = tentacle_hub::client::hash_file(&bundle).await?;
        packages.push(deploy::PackageSpec {
            local: bundle,
            sha256,
            application: "tooling".into(),
            env_var: "TENTACLE_TOOLING_PATH".into(),
        });
    }
    if let Some(path) = &args.package {
        {
            let (_, sha256) = tentacle_hub::client::hash_file(path).await?;
            let application = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .trim_end_matches(".tar.gz")
                .trim_end_matches(".tgz")
                .trim_end_matches(".zip")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect::<String>();
            packages.push(deploy::PackageSpec {
                local: path.clone(),
                sha256,
                application: if application.is_empty() {
                    "package".into()
                } else {
                    application
                },
                env_var: "TENTACLE_PACKAGE_PATH".into(),
            });
        }
    }
    let targets: Vec<DeployTarget> = fleet(home, &args.hub, &args.role, &args.environment)
        .await?
        .into_iter()
        .map(|member| DeployTarget {
            name: member.name,
            target: member.target,
            client: member.client,
        })
        .collect();

    // Printed before the progress bars exist, so it cannot tear them.
    eprintln!(
        "Deploying to {} target(s), {} at a time",
        targets.len(),
        args.parallelism.max(1)
    );
    let observer: Arc<dyn DeployObserver> = if std::io::stderr().is_terminal() {
        Arc::new(Bars::new(&targets))
    } else {
        Arc::new(Plain)
    };
    let cancel = CancellationToken::new();
    let on_interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("tentacle-hub: cancelling the scripts on every target…");
            on_interrupt.cancel();
        }
    });
    let results = deploy::deploy(
        targets,
        &script,
        packages,
        args.parallelism,
        observer,
        cancel,
    )
    .await;
    print_summary(&results);
    let failed = results.iter().filter(|r| !r.outcome.succeeded()).count();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_summary(results: &[TargetResult]) {
    let width = results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!();
    println!("{:<width$}  {:<9}  {:>9}  target", "name", "result", "time");
    for result in results {
        let (word, detail) = match &result.outcome {
            TargetOutcome::Exited(0) => ("succeeded".to_owned(), String::new()),
            TargetOutcome::Exited(code) => ("failed".to_owned(), format!("  exit code {code}")),
            TargetOutcome::Failed(reason) => ("failed".to_owned(), format!("  {reason}")),
        };
        let package: String = result
            .packages
            .iter()
            .map(|(application, p)| match p.was_cached {
                true => format!("  {application} cached"),
                false => format!("  {application} uploaded {} bytes", p.uploaded_bytes),
            })
            .collect();
        println!(
            "{:<width$}  {:<9}  {:>8.1}s  {}{}{}",
            result.name,
            word,
            result.elapsed.as_secs_f64(),
            result.target,
            package,
            detail
        );
    }
    let succeeded = results.iter().filter(|r| r.outcome.succeeded()).count();
    println!(
        "{succeeded} succeeded, {} failed",
        results.len() - succeeded
    );
}

fn print_prefixed(target: &str, line: &pb::LogLine) {
    match pb::LogStream::try_from(line.stream) {
        Ok(pb::LogStream::Stdout) => println!("[{target}] {}", line.text),
        Ok(pb::LogStream::Stderr) => eprintln!("[{target}] {}", line.text),
        _ => eprintln!("[{target}] [agent] {}", line.text),
    }
}

/// Prefixed lines only, for logs and pipes.
struct Plain;

impl DeployObserver for Plain {
    fn started(&self, target: &str) {
        eprintln!("[{target}] started");
    }

    fn line(&self, target: &str, line: &pb::LogLine) {
        print_prefixed(target, line);
    }

    fn finished(&self, result: &TargetResult) {
        eprintln!("[{}] finished: {:?}", result.name, result.outcome);
    }
}

/// A progress bar per target on a terminal, with output printed above them.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn new(targets: &[DeployTarget]) -> Self {
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{spinner} {prefix:<20} {elapsed:>4} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = targets
            .iter()
            .map(|t| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(t.name.clone());
                bar.set_message("waiting");
                (t.name.clone(), bar)
            })
            .collect();
        Self {
            multi,
            bars: Mutex::new(bars),
        }
    }

    fn with_bar(&self, target: &str, f: impl FnOnce(&ProgressBar)) {
        if let Some(bar) = self
            .bars
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(target)
        {
            f(bar);
        }
    }
}

impl DeployObserver for Bars {
    fn started(&self, target: &str) {
        self.with_bar(target, |bar| {
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message("running");
        });
    }

    fn line(&self, target: &str, line: &pb::LogLine) {
        let _ = self.multi.println(format!("[{target}] {}", line.text));
        self.with_bar(target, |bar| bar.set_message(line.text.clone()));
    }

    fn finished(&self, result: &TargetResult) {
        let message = match &result.outcome {
            TargetOutcome::Exited(0) => "succeeded".to_owned(),
            TargetOutcome::Exited(code) => format!("failed with exit code {code}"),
            TargetOutcome::Failed(reason) => format!("failed: {reason}"),
        };
        self.with_bar(&result.name, |bar| bar.finish_with_message(message));
    }
}
