//! One cell of the matrix: what its flow needs first, the call made
//! under the fault, and the flow's completion once the fault is gone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tentacle_hub::client::AgentClient;
use tentacle_hub::deploy::{DeployTarget, TargetOutcome};
use tentacle_proto::v1 as pb;
use tentacle_tests::Mode;
use tentacle_tests::fault_proxy::Fault;
use tokio_util::sync::CancellationToken;

use super::flows::{
    DeployLines, Trigger, describe, describe_client, download, payload, recover_watch, trigger,
    unary, upload, watch_once,
};
use super::rig::{DETECTION, Rig, Seen, expected_lines, retry};
use super::{Flow, Stage};

/// What the faulted call did.
#[derive(Debug)]
pub(super) enum Outcome {
    Succeeded,
    /// Failed with this description (status code and message).
    Failed(String),
}

/// One cell's flow, fault and the names it works under.
struct Cell {
    index: usize,
    flow: Flow,
    stage: Stage,
    fault: Fault,
    ticket: String,
    remote: String,
    bytes: Vec<u8>,
}

impl Cell {
    fn name(&self, mode: Mode) -> String {
        format!(
            "{:?} {:?} {:?} ({mode:?})",
            self.flow, self.stage, self.fault
        )
    }
}

/// Runs one cell and returns what the faulted call did.
pub(super) async fn run_cell(
    rig: &mut Rig,
    index: usize,
    flow: Flow,
    stage: Stage,
    fault: Fault,
) -> Outcome {
    let ticket = format!("m{index}-{}", uuid::Uuid::new_v4().simple());
    let cell = Cell {
        index,
        flow,
        stage,
        fault,
        remote: format!("matrix/{ticket}.bin"),
        bytes: payload(index),
        ticket,
    };
    let warm = rig.warm_client().await;
    prepare(rig, &warm, &cell).await;
    if stage == Stage::Connecting {
        rig.warm = None;
    }
    let rig = &*rig;
    let seen = Seen::default();
    let outcome = faulted_call(rig, warm, &cell, &seen).await;
    recover(rig, &cell, &seen, &outcome).await;
    rig.upstream_alive();
    outcome
}

/// What the flow needs before its faulted call, made with no fault.
async fn prepare(rig: &Rig, warm: &AgentClient, cell: &Cell) {
    let Cell {
        flow,
        ticket,
        remote,
        bytes,
        ..
    } = cell;
    let tier = rig.tier;
    match *flow {
        Flow::Watch | Flow::Cancel | Flow::Complete => {
            let hold = *flow == Flow::Cancel;
            warm.scripts()
                .start_script(rig.script(ticket, hold))
                .await
                .expect("start before the fault");
            if *flow == Flow::Complete {
                let seen = Seen::default();
                let result = recover_watch(rig, ticket, &seen).await;
                assert_eq!(result.exit_code, 0);
            }
            if *flow == Flow::Cancel {
                // The cancel must find a running script to kill, not one
                // still starting under its host.
                let started = Instant::now();
                while rig.runs_of(ticket) == 0 {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "the script to cancel never started"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Flow::Download => {
            upload(warm, remote, bytes, tier.stream_deadline, None)
                .await
                .expect("upload before the fault");
        }
        _ => {}
    }
}

/// Sets the fault at the cell's stage, makes the call, clears the fault
/// after the tier's window, and checks the call ended within its deadline,
/// saying why if it failed.
async fn faulted_call(rig: &Rig, warm: AgentClient, cell: &Cell, seen: &Seen) -> Outcome {
    let tier = rig.tier;
    let proxy = &rig.proxy;
    let (flow, stage, fault) = (cell.flow, cell.stage, cell.fault);
    let client = match stage {
        Stage::Connecting => {
            proxy.set(fault);
            proxy.cut_all();
            match rig.mode {
                Mode::Listening => None,
                Mode::Polling => Some(rig.fresh_client().await.expect("hub client")),
            }
        }
        Stage::InFlight => {
            if matches!(
                flow,
                Flow::Capabilities | Flow::Start | Flow::Cancel | Flow::Complete
            ) {
                proxy.set(fault);
            }
            Some(warm)
        }
    };
    let in_flight = || (stage == Stage::InFlight).then(|| trigger(proxy.control(), fault));
    let deadline = match flow {
        Flow::Watch | Flow::Upload | Flow::Download | Flow::Deploy => tier.stream_deadline,
        _ => tier.unary_deadline,
    };
    let limit = deadline + tier.unary_deadline + DETECTION;
    let started = Instant::now();
    let call = async {
        let client = match client {
            Some(client) => client,
            // Listening, connecting: the connection itself is made under
            // the fault, and may fail.
            None => rig.fresh_client().await?,
        };
        call(rig, client, cell, seen, deadline, in_flight()).await
    };
    let clear_later = async {
        tokio::time::sleep(tier.window).await;
        proxy.clear();
    };
    let (outcome, ()) = tokio::join!(
        async {
            tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                panic!(
                    "{}: the call neither succeeded nor failed within its deadline of \
                     {deadline:?}",
                    cell.name(rig.mode)
                )
            })
        },
        clear_later
    );
    let took = started.elapsed();
    proxy.clear();
    assert!(took <= limit, "{}: took {took:?}", cell.name(rig.mode));
    match outcome {
        Ok(()) => Outcome::Succeeded,
        Err(reason) => {
            assert!(
                !reason.trim().is_empty() && !reason.ends_with(": "),
                "{}: a failure must say why",
                cell.name(rig.mode)
            );
            Outcome::Failed(reason)
        }
    }
}

/// The flow's call itself; `trigger` sets the fault mid-call.
async fn call(
    rig: &Rig,
    client: AgentClient,
    cell: &Cell,
    seen: &Seen,
    deadline: Duration,
    trigger: Option<Trigger>,
) -> Result<(), String> {
    let Cell {
        index,
        ticket,
        remote,
        bytes,
        ..
    } = cell;
    match cell.flow {
        Flow::Capabilities => client
            .capabilities()
            .await
            .map(drop)
            .map_err(|e| describe_client(&e)),
        Flow::Start => client
            .scripts()
            .start_script(unary(rig.script(ticket, false), deadline))
            .await
            .map(drop)
            .map_err(|s| describe(&s)),
        Flow::Cancel => client
            .scripts()
            .cancel_script(unary(
                pb::CancelScriptRequest {
                    ticket: ticket.clone(),
                    after_sequence: 0,
                },
                deadline,
            ))
            .await
            .map(drop)
            .map_err(|s| describe(&s)),
        Flow::Complete => client
            .scripts()
            .complete_script(unary(
                pb::CompleteScriptRequest {
                    ticket: ticket.clone(),
                    after_sequence: u64::MAX,
                },
                deadline,
            ))
            .await
            .map(drop)
            .map_err(|s| describe(&s)),
        Flow::Watch => {
            let mut first = trigger;
            watch_once(&client, ticket, seen, deadline, || {
                if let Some(trigger) = first.take() {
                    trigger();
                }
            })
            .await
            .map(drop)
        }
        Flow::Upload => upload(&client, remote, bytes, deadline, trigger)
            .await
            .map(drop),
        Flow::Download => download(&client, remote, deadline, trigger)
            .await
            .and_then(|got| {
                if got == **bytes {
                    Ok(())
                } else {
                    Err("downloaded bytes differ".into())
                }
            }),
        Flow::Deploy => {
            let observer = Arc::new(DeployLines {
                seen: seen.clone(),
                trigger: Mutex::new(trigger),
            });
            deploy_once(rig, client, *index, ticket, observer).await
        }
    }
}

/// Completes the flow once the fault is gone, and checks that nothing ran
/// twice and nothing was lost.
async fn recover(rig: &Rig, cell: &Cell, seen: &Seen, outcome: &Outcome) {
    let Cell {
        index,
        ticket,
        remote,
        bytes,
        ..
    } = cell;
    let tier = rig.tier;
    match cell.flow {
        Flow::Capabilities => {
            retry("capabilities", || async {
                let client = rig.fresh_client().await?;
                client.capabilities().await.map_err(|e| describe_client(&e))
            })
            .await;
        }
        Flow::Start => {
            retry("starting the script", || async {
                let client = rig.fresh_client().await?;
                client
                    .scripts()
                    .start_script(unary(rig.script(ticket, false), tier.unary_deadline))
                    .await
                    .map_err(|s| describe(&s))
            })
            .await;
            let watched = Seen::default();
            let result = recover_watch(rig, ticket, &watched).await;
            assert_eq!(result.exit_code, 0);
            assert_eq!(watched.texts(), expected_lines(true));
            assert_eq!(rig.runs_of(ticket), 1, "the script ran more than once");
        }
        Flow::Watch => {
            let result = recover_watch(rig, ticket, seen).await;
            assert_eq!(result.exit_code, 0);
            assert_eq!(seen.texts(), expected_lines(true));
            assert_eq!(rig.runs_of(ticket), 1);
        }
        Flow::Cancel => {
            retry("cancelling the script", || async {
                let client = rig.fresh_client().await?;
                client
                    .scripts()
                    .cancel_script(unary(
                        pb::CancelScriptRequest {
                            ticket: ticket.clone(),
                            after_sequence: 0,
                        },
                        tier.unary_deadline,
                    ))
                    .await
                    .map_err(|s| describe(&s))
            })
            .await;
            let watched = Seen::default();
            let result = recover_watch(rig, ticket, &watched).await;
            assert_eq!(
                result.exit_code,
                pb::ReservedExitCode::ExitCodeCanceled as i32,
                "the cancelled script was not killed"
            );
            assert!(!watched.texts().contains(&"done".to_owned()));
            assert_eq!(rig.runs_of(ticket), 1);
        }
        Flow::Complete => {
            retry("completing the script", || async {
                let client = rig.fresh_client().await?;
                client
                    .complete_script(ticket)
                    .await
                    .map_err(|e| describe_client(&e))
            })
            .await;
            let workspace = rig.agent.home().join("work").join(ticket);
            assert!(
                !workspace.exists(),
                "the completed script's workspace {} is still there",
                workspace.display()
            );
            assert_eq!(rig.runs_of(ticket), 1);
        }
        Flow::Upload => {
            retry("uploading", || async {
                let client = rig.fresh_client().await?;
                upload(&client, remote, bytes, tier.stream_deadline, None).await
            })
            .await;
            let got = retry("downloading the upload", || async {
                let client = rig.fresh_client().await?;
                download(&client, remote, tier.stream_deadline, None).await
            })
            .await;
            assert!(got == **bytes, "the uploaded file differs");
        }
        Flow::Download => {
            let got = retry("downloading", || async {
                let client = rig.fresh_client().await?;
                download(&client, remote, tier.stream_deadline, None).await
            })
            .await;
            assert!(got == **bytes, "the downloaded file differs");
        }
        Flow::Deploy => {
            // A failed deploy is deployed again, as an operator would; each
            // deployment's script (its own ticket) runs once.
            if matches!(outcome, Outcome::Failed(_)) {
                retry("deploying again", || async {
                    let client = rig.fresh_client().await?;
                    let observer = Arc::new(DeployLines {
                        seen: Seen::default(),
                        trigger: Mutex::new(None),
                    });
                    deploy_once(rig, client, *index, ticket, observer.clone()).await?;
                    Ok(observer.seen.texts())
                })
                .await;
            } else {
                assert_eq!(seen.texts(), expected_lines(true));
            }
            let runs = std::fs::read_to_string(&rig.runs).expect("runs");
            let mut per_ticket: BTreeMap<&str, usize> = BTreeMap::new();
            for dir in runs.lines() {
                *per_ticket.entry(dir).or_default() += 1;
            }
            assert!(
                per_ticket.values().all(|&n| n == 1),
                "a deployment's script ran twice: {per_ticket:?}"
            );
        }
    }
}

/// Deploys the cell's script to the rig's agent through `client`; Ok when
/// it exited 0, else why not.
async fn deploy_once(
    rig: &Rig,
    client: AgentClient,
    index: usize,
    ticket: &str,
    observer: Arc<DeployLines>,
) -> Result<(), String> {
    let results = tentacle_hub::deploy::deploy(
        vec![DeployTarget {
            name: format!("m{index}"),
            target: "matrix".into(),
            client,
        }],
        &rig.script(ticket, false).script_body,
        Vec::new(),
        1,
        observer,
        CancellationToken::new(),
    )
    .await;
    match &results[0].outcome {
        TargetOutcome::Exited(0) => Ok(()),
        TargetOutcome::Exited(code) => Err(format!("the deploy's script exited {code}")),
        TargetOutcome::Failed(reason) => Err(reason.clone()),
    }
}
