//! `tentacle-hub probe`: the container health check. Asks the hub's own
//! metrics endpoint for `/readyz` over plain HTTP on loopback; calls to the
//! hub itself stay behind mTLS.

use std::process::ExitCode;

use tentacle_proto::probe::ProbeArgs;

pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    args.probe().await?;
    println!("ready");
    Ok(ExitCode::SUCCESS)
}
