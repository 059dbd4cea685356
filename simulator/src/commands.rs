//! What each `tentacle-sim` verb does.

use std::path::Path;
use std::process::ExitCode;

use tentacle_hub::home::HubHome;
use tentacle_sim::demo;

use super::Command;

pub async fn dispatch(home: &Path, command: Command) -> anyhow::Result<ExitCode> {
    let home = HubHome::new(home);
    match command {
        Command::Fleet(args) => crate::fleet_cmd::run(&home, args).await,
        Command::Run(args) => crate::run_cmd::run(&home, *args).await,
        Command::Report(command) => crate::run_cmd::report(command),
        Command::Bench(args) => crate::bench_cmd::run(args).await,
        Command::BenchUnaryPeer { trust } => {
            tentacle_sim::bench::unary_peer::serve(trust, std::io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { script } => {
            let code = demo::run(script.as_deref().unwrap_or(demo::DEFAULT_SCRIPT)).await?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}
