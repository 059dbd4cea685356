//! `tentacle-sim run --scenario FILE`: starts (or reaches) a hub, brings up
//! this shard's virtual tentacles, runs the scenario's stages while the
//! chaos schedule plays, samples the hub every second, then checks the
//! invariants and builds the [`Report`].
//!
//! - `hub_access`: the in-process or external hub (one, or the nodes of a
//!   cluster), behind one API.
//! - `nodes`: an external hub's nodes: their pids, the chaos that kills
//!   and restarts them, and their per-second figures.
//! - `stages`: the operations on one agent, timed and retried.
//! - `recorder`: what the control plane observed.
//! - `sampler`: the hub process's CPU and memory.

pub mod hub_access;
pub mod nodes;
pub mod recorder;
pub mod sampler;
pub mod stages;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use crate::fleet::{
    ExecutionLedger, Fleet, FleetError, FleetSettings, NodeLinks, ScriptModel, VirtualAgent,
};
use crate::invariants::{self, ScriptEnd};
use crate::report::{
    AgentCounts, Report, SCHEMA_VERSION, Sample, ScriptTotals, ShardInfo, StageResult, UploadTotals,
};
use crate::scenario::{ChaosKind, ChaosSchedule, Scenario, Stage};
pub use hub_access::{CallRouting, HubAccess, HubAccessError};
use nodes::NodeSampler;
pub use nodes::{HubNodes, NodeChaosError, NodeSpec};
use recorder::Recorder;
use sampler::ProcessSampler;

/// This process's slice of the fleet: shard `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Why `--shard` could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error(
        "`{0}` is not a shard: give K/N with 1 <= K <= N (e.g. 2/4), or job/N in a Kubernetes Indexed Job"
    )]
    NotAShard(String),
    #[error("`{0}` takes the shard from {JOB_INDEX_VARIABLE}, which is not set; give K/N instead")]
    NoJobIndex(String),
    #[error("{JOB_INDEX_VARIABLE}=`{0}` is not a number")]
    JobIndexNotANumber(String),
    #[error("{JOB_INDEX_VARIABLE}={index} is outside `{text}`: the job's completions must equal N")]
    JobIndexOutside { index: usize, text: String },
}

/// Set by Kubernetes in each pod of an Indexed Job: 0, 1, ... N-1.
pub const JOB_INDEX_VARIABLE: &str = "JOB_COMPLETION_INDEX";

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Parses `K/N` with 1 <= K <= N, or `job/N`, where K comes from the
    /// 0-based `JOB_COMPLETION_INDEX` that a Kubernetes Indexed Job gives
    /// each of its pods.
    pub fn parse(text: &str) -> Result<Self, ShardError> {
        Self::parse_with_job_index(text, std::env::var(JOB_INDEX_VARIABLE).ok().as_deref())
    }

    /// [`Self::parse`] with the job index given rather than read.
    pub fn parse_with_job_index(text: &str, job_index: Option<&str>) -> Result<Self, ShardError> {
        let bad = || ShardError::NotAShard(text.to_owned());
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        let k: usize = if k.trim() == "job" {
            let index = job_index.ok_or_else(|| ShardError::NoJobIndex(text.to_owned()))?;
            let index: usize = index
                .trim()
                .parse()
                .map_err(|_| ShardError::JobIndexNotANumber(index.to_owned()))?;
            if index >= n {
                return Err(ShardError::JobIndexOutside {
                    index,
                    text: text.to_owned(),
                });
            }
            index + 1
        } else {
            k.trim().parse().map_err(|_| bad())?
        };
        if k == 0 || n == 0 || k > n {
            return Err(bad());
        }
        Ok(Self {
            index: k - 1,
            count: n,
        })
    }

    /// The global agent indices this shard runs: a contiguous slice, so
    /// names (and identities) never overlap between shards.
    pub fn slice(&self, agents: usize) -> std::ops::Range<usize> {
        let start = agents * self.index / self.count;
        let end = agents * (self.index + 1) / self.count;
        start..end
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

/// Where the run's hub is.
#[derive(Debug, Clone)]
pub enum HubChoice {
    /// Start one in this process.
    InProcess,
    /// Load-test a running hub: one, or the nodes of a cluster.
    External {
        /// One per node, in the order of `--hub`.
        nodes: Vec<NodeSpec>,
        /// Every node presents it.
        thumbprint: tentacle_proto::Thumbprint,
        /// Registers the virtual agents.
        api_key: String,
        /// The operator identity the hub trusts.
        operator: tentacle_proto::Identity,
        /// Which node an operator call goes to.
        routing: CallRouting,
        /// Where restarted nodes write their output.
        log_dir: PathBuf,
    },
}

/// A fault planted in the observations before they are checked, to prove
/// the invariant checks catch it (`--plant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Plant {
    /// One log line recorded twice.
    DuplicateLine,
    /// One log line dropped.
    LostLine,
}

impl Plant {
    fn apply(self, observations: &mut invariants::Observations) {
        let Some(script) = observations.scripts.iter_mut().find(|s| s.lines.len() >= 3) else {
            return;
        };
        match self {
            Plant::DuplicateLine => {
                let line = script.lines[1].clone();
                script.lines.insert(2, line);
            }
            Plant::LostLine => {
                script.lines.remove(1);
            }
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub scenario: Scenario,
    pub seed: u64,
    pub shard: Shard,
    pub hub: HubChoice,
    /// Agents' workspaces and the in-process hub's store.
    pub work_dir: PathBuf,
    pub open_file_limit: u64,
    pub plant: Option<Plant>,
}

/// Why a run could not be carried out (as opposed to a run whose
/// invariants broke, which is a report).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Hub(#[from] HubAccessError),
    #[error("the fleet could not start: {0}")]
    Fleet(#[from] FleetError),
    #[error("the run passed its time limit of {0:?}")]
    TimeLimit(Duration),
    #[error("the scenario kills hub node {node}: {reason}")]
    NodeKill { node: usize, reason: String },
}

/// What a progress display reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    pub stage: Mutex<String>,
    pub agents: AtomicUsize,
    pub started_agents: AtomicUsize,
    pub connected: AtomicU64,
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub scripts_done: AtomicU64,
    pub scripts_total: AtomicU64,
    pub chaos_events: AtomicU64,
}

impl Live {
    fn set_stage(&self, stage: &str) {
        *self.stage.lock().unwrap_or_else(PoisonError::into_inner) = stage.to_owned();
    }
}

/// Shared by the stage tasks.
#[derive(Debug)]
pub struct Context {
    pub hub: HubAccess,
    pub recorder: Recorder,
    pub model: ScriptModel,
    pub seed: u64,
}

/// Runs the scenario.
pub async fn run(settings: RunSettings, live: Arc<Live>) -> Result<Report, RunError> {
    let limit = settings.scenario.time_limit;
    match tokio::time::timeout(limit, run_inner(settings, live)).await {
        Ok(result) => result,
        Err(_) => Err(RunError::TimeLimit(limit)),
    }
}

async fn run_inner(settings: RunSettings, live: Arc<Live>) -> Result<Report, RunError> {
    let scenario = &settings.scenario;
    let started = Instant::now();
    let started_unix_ms = tentacle_hub::unix_now() * 1000;
    let total = scenario.fleet.agents;
    let mine = settings.shard.slice(total);
    let listening_total = (total as f64 * scenario.fleet.listening_fraction).round() as usize;

    let (hub, api_key, hub_pid, hub_nodes) = match &settings.hub {
        HubChoice::InProcess => {
            let (hub, key) = HubAccess::start_local(settings.work_dir.join("hub")).await?;
            (hub, key, Some(std::process::id()), None)
        }
        HubChoice::External {
            nodes,
            thumbprint,
            api_key,
            operator,
            routing,
            log_dir,
        } => {
            let addresses: Vec<_> = nodes.iter().map(|n| n.address.clone()).collect();
            let hub =
                HubAccess::connect_external(&addresses, *thumbprint, operator, *routing).await?;
            let nodes = Arc::new(HubNodes::new(nodes.clone(), log_dir.clone(), started));
            (hub, api_key.clone(), None, Some(nodes))
        }
    };
    check_node_kills(&settings, hub_nodes.as_deref())?;
    let (hub_addresses, hub_thumbprint) = hub.endpoint();
    let links = Arc::new(NodeLinks::new(&hub_addresses));
    let names: Vec<String> = mine.clone().map(|i| format!("virtual-{i}")).collect();
    let ctx = Arc::new(Context {
        hub,
        recorder: Recorder::new(names),
        model: scenario.fleet.scripts.clone(),
        seed: settings.seed,
    });

    // Sample every second from the start, so the ramp is on the chart.
    let stop_sampling = CancellationToken::new();
    let timeline = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let ledger = Arc::new(ExecutionLedger::default());
    let fleet_slot: Arc<Mutex<Vec<Arc<VirtualAgent>>>> = Arc::default();
    let sampler = tokio::spawn(sample(
        ctx.clone(),
        live.clone(),
        fleet_slot.clone(),
        timeline.clone(),
        HubWatch {
            pid: hub_pid,
            nodes: hub_nodes.clone(),
            links: links.clone(),
        },
        started,
        stop_sampling.clone(),
    ));

    // Connect: register and start this shard's agents over the ramp.
    live.set_stage("connect");
    live.agents.store(mine.len(), Ordering::Relaxed);
    let Some(first_hub) = hub_addresses.first().cloned() else {
        return Err(RunError::Hub(HubAccessError::Connect {
            address: "(none)".into(),
            reason: "no hub address".into(),
        }));
    };
    let mut fleet_settings = FleetSettings::new(
        mine.len(),
        first_hub,
        hub_thumbprint,
        api_key,
        settings.work_dir.join("agents"),
    );
    fleet_settings.hubs = hub_addresses;
    fleet_settings.node_links = links;
    fleet_settings.first_index = mine.start;
    fleet_settings.listening = listening_total.saturating_sub(mine.start).min(mine.len());
    fleet_settings.model = scenario.fleet.scripts.clone();
    fleet_settings.seed = settings.seed;
    fleet_settings.registration_parallelism = scenario.fleet.registration_parallelism;
    fleet_settings.ramp = scenario.fleet.connect_ramp;
    fleet_settings.source_addresses = scenario.fleet.source_addresses;
    fleet_settings.reconnect_initial = Duration::from_millis(500);
    fleet_settings.reconnect_max = Duration::from_secs(5);
    fleet_settings.ledger = Some(ledger.clone());
    let connect_started = Instant::now();
    let fleet = {
        let (live, slot) = (live.clone(), fleet_slot.clone());
        Fleet::start_observed(fleet_settings, move |agent| {
            live.started_agents.fetch_add(1, Ordering::Relaxed);
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(agent.clone());
        })
        .await?
    };
    let fleet = Arc::new(fleet);
    let connect_all_ms = wait_connected(&fleet, scenario.fleet.connect_timeout)
        .await
        .then(|| connect_started.elapsed().as_millis() as u64);
    let mut stages = vec![StageResult {
        name: "connect".into(),
        started_ms: 0,
        duration_ms: connect_started.elapsed().as_millis() as u64,
        operations: mine.len() as u64,
        failed: if connect_all_ms.is_some() { 0 } else { 1 },
    }];

    // Chaos plays from now until the stages are done.
    let window = scenario.time_limit;
    let schedule = ChaosSchedule::generate(&scenario.chaos, total, settings.seed, window);
    let chaos_applied = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let stop_chaos = CancellationToken::new();
    let chaos = tokio::spawn(play_chaos(
        Chaos {
            ctx: ctx.clone(),
            fleet: fleet.clone(),
            nodes: hub_nodes.clone(),
            settings: settings.clone(),
            applied: chaos_applied.clone(),
            live: live.clone(),
        },
        schedule.clone(),
        stop_chaos.clone(),
    ));

    let mut upload_totals = UploadTotals::default();
    for (number, stage) in scenario.stages.iter().enumerate() {
        live.set_stage(stage.name());
        let stage_started = Instant::now();
        let (operations, failed) = run_stage(
            &ctx,
            &fleet,
            &settings,
            number,
            stage,
            &live,
            &mut upload_totals,
        )
        .await;
        stages.push(StageResult {
            name: stage.name().into(),
            started_ms: stage_started.duration_since(started).as_millis() as u64,
            duration_ms: stage_started.elapsed().as_millis() as u64,
            operations,
            failed,
        });
    }

    // Heal: chaos stops, slowed links recover, crashed agents come back.
    stop_chaos.cancel();
    let _ = chaos.await;
    for agent in &fleet.agents {
        agent.faults.clear_latency();
        if !agent.is_running()
            && let Err(error) = agent.restart(fleet.settings()).await
        {
            tracing::warn!(agent = %agent.name, %error, "could not restart a crashed agent");
        }
    }
    live.set_stage("checking invariants");
    stop_sampling.cancel();
    let _ = sampler.await;

    let mut observations = ctx.recorder.take_observations();
    for script in &mut observations.scripts {
        script.executions = ledger.starts(&script.agent, &script.ticket);
    }
    if let Some(plant) = settings.plant {
        plant.apply(&mut observations);
    }
    let invariants = invariants::check(&observations);
    let scripts = script_totals(&observations.scripts, &ctx.model, settings.seed);
    let errors = invariants::errors_by_kind(&observations.failures);
    let error_examples = invariants::error_examples(&observations.failures);
    let duration_ms = started.elapsed().as_millis() as u64;
    fleet.stop();
    ctx.hub.shutdown().await;

    let timeline = std::mem::take(&mut *timeline.lock().unwrap_or_else(PoisonError::into_inner));
    let chaos_counts =
        std::mem::take(&mut *chaos_applied.lock().unwrap_or_else(PoisonError::into_inner));
    let listening = fleet.agents.iter().filter(|a| a.port.is_some()).count() as u64;
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        scenario: scenario.name.clone(),
        seed: settings.seed,
        chaos_schedule_sha256: schedule.sha256(),
        started_unix_ms,
        duration_ms,
        shards: vec![ShardInfo {
            shard: settings.shard.to_string(),
            agents: mine.len() as u64,
            open_file_limit: settings.open_file_limit,
            hub: ctx.hub.describe(),
        }],
        agents: AgentCounts {
            polling: fleet.agents.len() as u64 - listening,
            listening,
            connect_all_ms,
        },
        stages,
        chaos: chaos_counts,
        timeline,
        calls: ctx.recorder.call_stats(),
        errors,
        error_examples,
        scripts,
        uploads: upload_totals,
        invariants,
        hub_nodes: hub_nodes.map(|n| n.info()).unwrap_or_default(),
    })
}

/// Refuses, before anything starts, a scenario whose hub node kills this
/// run cannot carry out: no external hub, a node that is not given, or one
/// without the pid to kill and the command to restart it. Only the first
/// shard kills nodes, so only it needs them.
fn check_node_kills(settings: &RunSettings, nodes: Option<&HubNodes>) -> Result<(), RunError> {
    if settings.shard.index != 0 {
        return Ok(());
    }
    for kill in &settings.scenario.chaos.hub_node_kills {
        let refuse = |reason: String| RunError::NodeKill {
            node: kill.node,
            reason,
        };
        let Some(nodes) = nodes else {
            return Err(refuse(
                "only a run against an external hub (--hub) kills hub nodes".into(),
            ));
        };
        if kill.node == 0 || kill.node > nodes.len() {
            return Err(refuse(format!(
                "there are {} --hub address(es)",
                nodes.len()
            )));
        }
        nodes
            .can_kill(kill.node - 1)
            .map_err(|e| refuse(e.to_string()))?;
    }
    Ok(())
}

/// Agents that are connected now: polling agents with an open tunnel, and
/// running listening agents.
fn connected(agents: &[Arc<VirtualAgent>]) -> u64 {
    let tunnels = tentacle_proto::metrics::METRICS.tunnels_open.get().max(0) as u64;
    let listening = agents
        .iter()
        .filter(|a| a.port.is_some() && a.is_running())
        .count() as u64;
    tunnels + listening
}

async fn wait_connected(fleet: &Fleet, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if connected(&fleet.agents) >= fleet.agents.len() as u64 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// What the sampler reads about the hub besides the run's own counters.
struct HubWatch {
    /// The in-process hub's process (this one).
    pid: Option<u32>,
    /// An external hub's nodes.
    nodes: Option<Arc<HubNodes>>,
    /// The fleet's open connections per node.
    links: Arc<NodeLinks>,
}

async fn sample(
    ctx: Arc<Context>,
    live: Arc<Live>,
    agents: Arc<Mutex<Vec<Arc<VirtualAgent>>>>,
    timeline: Arc<Mutex<Vec<Sample>>>,
    watch: HubWatch,
    started: Instant,
    stop: CancellationToken,
) {
    let mut process = watch.pid.map(ProcessSampler::new);
    let mut node_sampler = NodeSampler::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let t_ms = started.elapsed().as_millis() as u64;
        let connected = {
            let agents = agents.lock().unwrap_or_else(PoisonError::into_inner);
            connected(&agents)
        };
        let nodes = match &watch.nodes {
            Some(nodes) => node_sampler.sample(nodes, &watch.links.open()).await,
            None => Vec::new(),
        };
        let (cpu, rss) = match process.as_mut() {
            Some(process) => process.sample(),
            // A cluster's figures are its nodes' sums.
            None => (
                nodes.iter().map(|n| n.cpu_percent).sum(),
                nodes.iter().map(|n| n.rss_bytes).sum(),
            ),
        };
        let r = &ctx.recorder;
        let sample = Sample {
            t_ms,
            connected,
            calls: r.window_calls.swap(0, Ordering::Relaxed),
            errors: r.window_errors.swap(0, Ordering::Relaxed),
            hub_cpu_percent: cpu,
            hub_rss_bytes: rss,
            nodes,
        };
        live.connected.store(connected, Ordering::Relaxed);
        live.calls
            .store(r.total_calls.load(Ordering::Relaxed), Ordering::Relaxed);
        live.errors
            .store(r.total_errors.load(Ordering::Relaxed), Ordering::Relaxed);
        live.scripts_done
            .store(r.scripts_done.load(Ordering::Relaxed), Ordering::Relaxed);
        timeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sample);
    }
}

/// The global indices of `fraction` of all agents, drawn from the seed, so
/// every shard picks the same agents and takes its own.
fn choose(total: usize, fraction: f64, seed: u64, salt: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..total).collect();
    all.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ salt));
    all.truncate((total as f64 * fraction).round() as usize);
    all.sort_unstable();
    all
}

/// Runs one stage; returns (operations, failed operations).
async fn run_stage(
    ctx: &Arc<Context>,
    fleet: &Arc<Fleet>,
    settings: &RunSettings,
    number: usize,
    stage: &Stage,
    live: &Live,
    uploads: &mut UploadTotals,
) -> (u64, u64) {
    let total = settings.scenario.fleet.agents;
    let first = fleet.settings().first_index;
    let agent_at = |global: usize| {
        global
            .checked_sub(first)
            .and_then(|i| fleet.agents.get(i))
            .cloned()
    };
    let salt = number as u64 * 1_000_003;
    match stage {
        Stage::Health { concurrency } => {
            let results: Vec<bool> = futures::stream::iter(fleet.agents.iter().cloned())
                .map(|agent| {
                    let ctx = ctx.clone();
                    async move { stages::health(&ctx, &agent).await }
                })
                .buffer_unordered(*concurrency)
                .collect()
                .await;
            count(&results)
        }
        Stage::Upload {
            size_mib,
            fraction,
            concurrency,
        } => {
            let size = (size_mib * 1024.0 * 1024.0) as usize;
            let package = stages::Package::new(size, settings.seed ^ salt);
            let chosen: Vec<_> = choose(total, *fraction, settings.seed, salt)
                .into_iter()
                .filter_map(agent_at)
                .collect();
            let results: Vec<bool> = futures::stream::iter(chosen)
                .map(|agent| {
                    let (ctx, package) = (ctx.clone(), package.clone());
                    async move { stages::upload(&ctx, &agent, &package).await }
                })
                .buffer_unordered(*concurrency)
                .collect()
                .await;
            let (attempted, failed) = count(&results);
            uploads.attempted += attempted;
            uploads.verified += attempted - failed;
            uploads.bytes += (attempted - failed) * size as u64;
            (attempted, failed)
        }
        Stage::Scripts {
            waves,
            fraction,
            concurrency,
            cancel_fraction,
        } => {
            let mut operations = 0;
            for wave in 0..*waves {
                let wave_salt = salt + u64::from(wave) + 1;
                let chosen = choose(total, *fraction, settings.seed, wave_salt);
                let cancels = choose(total, *cancel_fraction, settings.seed, wave_salt << 20);
                let jobs: Vec<_> = chosen
                    .into_iter()
                    .filter_map(|global| {
                        let agent = agent_at(global)?;
                        let ticket = format!("s{}-st{number}-w{wave}-a{global}", settings.seed);
                        Some((agent, ticket, cancels.binary_search(&global).is_ok()))
                    })
                    .collect();
                live.scripts_total
                    .fetch_add(jobs.len() as u64, Ordering::Relaxed);
                operations += jobs.len() as u64;
                futures::stream::iter(jobs)
                    .map(|(agent, ticket, cancel)| {
                        stages::script(ctx.clone(), agent, ticket, cancel)
                    })
                    .buffer_unordered(*concurrency)
                    .collect::<Vec<()>>()
                    .await;
            }
            (operations, 0)
        }
        Stage::Soak { duration } => {
            tokio::time::sleep(*duration).await;
            (0, 0)
        }
    }
}

fn count(results: &[bool]) -> (u64, u64) {
    let failed = results.iter().filter(|ok| !**ok).count() as u64;
    (results.len() as u64, failed)
}

fn script_totals(
    records: &[invariants::ScriptRecord],
    model: &ScriptModel,
    seed: u64,
) -> ScriptTotals {
    use tentacle_proto::exit_code;
    let mut totals = ScriptTotals::default();
    for r in records {
        totals.dispatched += 1;
        totals.log_lines += r.lines.len() as u64;
        match r.end {
            ScriptEnd::Exited(0) => totals.succeeded += 1,
            ScriptEnd::Exited(exit_code::CANCELED) => totals.canceled += 1,
            ScriptEnd::Exited(exit_code::AGENT_RESTARTED) => totals.agent_restarted += 1,
            ScriptEnd::Exited(code) if code == model.plan(seed, &r.ticket).exit_code => {
                totals.failed += 1;
            }
            ScriptEnd::Exited(_) | ScriptEnd::Abandoned(_) => totals.abandoned += 1,
        }
    }
    totals
}

/// What the chaos acts on and where it counts what it did.
struct Chaos {
    ctx: Arc<Context>,
    fleet: Arc<Fleet>,
    nodes: Option<Arc<HubNodes>>,
    settings: RunSettings,
    applied: Arc<Mutex<BTreeMap<String, u64>>>,
    live: Arc<Live>,
}

impl Chaos {
    fn count(&self, kind: &str) {
        count_chaos(&self.applied, &self.live, kind);
    }
}

fn count_chaos(applied: &Mutex<BTreeMap<String, u64>>, live: &Live, kind: &str) {
    live.chaos_events.fetch_add(1, Ordering::Relaxed);
    *applied
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(kind.to_owned())
        .or_default() += 1;
}

/// Counted when a killed hub node accepts connections again.
const NODE_RESTART: &str = "hub_node_restart";

/// Applies this shard's part of the schedule until `stop`; a killed hub
/// node is always started again before this returns, so the run heals.
async fn play_chaos(chaos: Chaos, schedule: ChaosSchedule, stop: CancellationToken) {
    let mut restarts = Vec::new();
    apply_schedule(&chaos, schedule, &stop, &mut restarts).await;
    for restart in restarts {
        let _ = restart.await;
    }
}

async fn apply_schedule(
    chaos: &Chaos,
    schedule: ChaosSchedule,
    stop: &CancellationToken,
    restarts: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let Chaos {
        ctx,
        fleet,
        settings,
        ..
    } = chaos;
    let spec = settings.scenario.chaos.clone();
    let origin = tokio::time::Instant::now() + spec.start_after;
    let first = fleet.settings().first_index;
    let mine = settings.shard.slice(settings.scenario.fleet.agents);
    for event in schedule.events {
        // Hub restarts and node kills belong to the first shard; agent
        // faults to the shard that runs the agent.
        let ours = match event.kind {
            ChaosKind::HubRestart | ChaosKind::HubNodeKill => settings.shard.index == 0,
            _ => mine.contains(&event.agent),
        };
        if !ours {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep_until(origin + event.at) => {}
            () = stop.cancelled() => return,
        }
        let agent = fleet
            .agents
            .get(event.agent - first.min(event.agent))
            .cloned();
        let done = match (event.kind, agent) {
            (ChaosKind::HubRestart, _) => match ctx.hub.restart(spec.hub_down_for).await {
                Ok(restarted) => restarted,
                Err(error) => {
                    tracing::warn!(%error, "the hub did not come back");
                    false
                }
            },
            (ChaosKind::HubNodeKill, _) => match &chaos.nodes {
                Some(nodes) => {
                    let down_for = spec
                        .hub_node_kills
                        .iter()
                        .find(|k| k.node == event.agent + 1 && k.at == event.at)
                        .map_or(crate::scenario::chaos::DEFAULT_NODE_DOWN_FOR, |k| {
                            k.down_for
                        });
                    match nodes.kill(event.agent) {
                        Ok(()) => {
                            let (nodes, applied, live) =
                                (nodes.clone(), chaos.applied.clone(), chaos.live.clone());
                            let node = event.agent;
                            restarts.push(tokio::spawn(async move {
                                tokio::time::sleep(down_for).await;
                                match nodes.restart(node).await {
                                    Ok(()) => count_chaos(&applied, &live, NODE_RESTART),
                                    Err(error) => {
                                        tracing::error!(%error, "a killed hub node did not come back");
                                    }
                                }
                            }));
                            true
                        }
                        Err(error) => {
                            tracing::error!(%error, "could not kill a hub node");
                            false
                        }
                    }
                }
                None => false,
            },
            (_, None) => false,
            (ChaosKind::Disconnect, Some(agent)) => {
                agent.faults.cut();
                true
            }
            (ChaosKind::Latency, Some(agent)) => {
                agent.faults.set_latency(spec.latency, spec.jitter);
                let (agent, heal_after) = (agent.clone(), spec.latency_for);
                tokio::spawn(async move {
                    tokio::time::sleep(heal_after).await;
                    agent.faults.clear_latency();
                });
                true
            }
            (ChaosKind::Crash, Some(agent)) => {
                agent.is_running()
                    && {
                        ctx.recorder.crashed(&agent.name);
                        agent.crash();
                        let (fleet, agent, after) =
                            (fleet.clone(), agent.clone(), spec.restart_after);
                        tokio::spawn(async move {
                            tokio::time::sleep(after).await;
                            if let Err(error) = agent.restart(fleet.settings()).await {
                                tracing::warn!(agent = %agent.name, %error, "a crashed agent could not restart");
                            }
                        });
                        true
                    }
            }
        };
        if done {
            chaos.count(event.kind.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_fleet_without_overlap() {
        let shards: Vec<_> = (1..=3)
            .map(|k| Shard::parse(&format!("{k}/3")).expect("shard"))
            .collect();
        let slices: Vec<_> = shards.iter().map(|s| s.slice(10)).collect();
        assert_eq!(slices, vec![0..3, 3..6, 6..10]);
        assert_eq!(shards[1].to_string(), "2/3");
        for bad in ["0/3", "4/3", "x", "1/0", "1-3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_indexed_job_pod_takes_its_shard_from_the_job_index() {
        let shard = Shard::parse_with_job_index("job/4", Some("2")).expect("shard");
        assert_eq!(shard.to_string(), "3/4");
        assert_eq!(shard.slice(8), 4..6);
        let unset = Shard::parse_with_job_index("job/4", None).expect_err("unset");
        assert!(
            unset.to_string().contains("JOB_COMPLETION_INDEX"),
            "{unset}"
        );
        let outside = Shard::parse_with_job_index("job/4", Some("4")).expect_err("outside");
        assert!(
            outside.to_string().contains("completions must equal N"),
            "{outside}"
        );
        assert!(Shard::parse_with_job_index("job/4", Some("x")).is_err());
    }

    #[test]
    fn choices_are_seeded_and_sized() {
        let a = choose(100, 0.25, 9, 1);
        assert_eq!(a.len(), 25);
        assert_eq!(a, choose(100, 0.25, 9, 1));
        assert_ne!(a, choose(100, 0.25, 9, 2));
        assert!(choose(100, 0.0, 9, 1).is_empty());
    }
}
