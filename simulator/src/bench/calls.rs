//! The rows whose caller is a hub: small unary calls (p50, p99, 64
//! concurrent callers) polling against listening, the same call on a plain
//! tonic server, a script's first output line against `bash -c`, 1 GiB
//! uploads and downloads against `scp` and the disk, and small calls while
//! an upload runs; plus row 2b, whose operator calls through a hub in
//! another process.
//!
//! The bench process hosts the hub for these rows, as the hub's own deploys
//! and health checks call from the hub's process. Every agent is a
//! `tentacle run` process of its own; the peers (`scp`, `bash`, the plain
//! tonic server, the second hub) are processes too. The sides of every
//! comparison run in rotating order within each round ([`rotate`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use tentacle_hub::channel::{AgentChannel, HubRouted};
use tentacle_hub::client::AgentClient;
use tentacle_hub::home::HubHome;
use tentacle_hub::target::Target;
use tentacle_hub::{AgentMode, Hub, HubSettings, TrustedAgent};
use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::processes::{HubProcess, ListeningAgent, PollingAgent, ProcessError};
use super::stats::{Ratio, median};
use super::{Also, MB, Peer, Row, Settings, baselines, measured, skipped, sshd, write_file};

/// The names of the rows this module measures, in the order it runs them.
pub const ROWS: [&str; 13] = [
    "unary-p50",
    "unary-p99",
    "unary-tonic",
    "unary-operator",
    "concurrent-64",
    "script-first-line",
    "upload-listening",
    "upload-polling",
    "download-listening",
    "download-polling",
    "scp-download",
    "unary-during-upload",
    "agent-rss-during-upload",
];

/// Callers for 64 concurrent callers.
const CALLERS: usize = 64;
/// Untimed calls before a side's first round.
pub(super) const WARM_UP: usize = 50;
/// Where the transfer rows put their file on each agent.
pub(super) const REMOTE_FILE: &str = "bench-transfer.bin";
/// Chunk size of the bench's uploads (the CLI's default).
const CHUNK: usize = 256 * 1024;

/// One side of a comparison: called once per round, returns its figure.
pub(super) type Side<'a, T> = Box<dyn FnMut() -> BoxFuture<'a, Result<T, String>> + Send + 'a>;

/// Runs every side once per round, round `r` starting with side `r mod n`,
/// so no side always runs first or right after the same neighbour (for two
/// sides this is ABBA order). Returns, per round, each side's figure in
/// the order of `sides`.
pub async fn rotate<T>(rounds: usize, sides: &mut [Side<'_, T>]) -> Result<Vec<Vec<T>>, String> {
    let n = sides.len();
    let mut all = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut values: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for k in 0..n {
            let i = (round + k) % n;
            values[i] = Some((sides[i])().await?);
        }
        all.push(values.into_iter().flatten().collect());
    }
    Ok(all)
}

pub(super) fn side<'a, T, F, Fut>(mut f: F) -> Side<'a, T>
where
    F: FnMut() -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, String>> + Send + 'a,
{
    Box::new(move || f().boxed())
}

/// Everything the call rows need: the in-process hub, a listening and a
/// polling agent process, and clients for both through the hub.
struct Setup {
    dir: PathBuf,
    identity: Identity,
    listening_agent: ListeningAgent,
    _polling_agent: PollingAgent,
    listening: AgentClient,
    polling: AgentClient,
    _hub: DropGuard,
}

fn process_failed(error: ProcessError) -> String {
    error.to_string()
}

pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| format!("a bench task failed: {error}"))?
}

impl Setup {
    async fn start(dir: &Path) -> Result<Self, String> {
        let listening_dir = dir.join("calls-listening");
        let listening_agent =
            blocking(move || ListeningAgent::start(&listening_dir).map_err(process_failed)).await?;
        let identity = HubHome::new(listening_agent.operator_home())
            .identity()
            .map_err(|error| format!("loading the bench's operator identity: {error}"))?;
        let hub = Hub::new(identity.clone(), HubSettings::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|error| format!("binding the bench's hub: {error}"))?;
        let address = listener
            .local_addr()
            .map_err(|error| format!("reading the hub's address: {error}"))?;
        let hub_url = format!("https://{address}");
        let stop = CancellationToken::new();
        tokio::spawn({
            let hub = hub.clone();
            let stop = stop.clone();
            async move {
                if let Err(error) = hub.serve(listener, stop.cancelled_owned()).await {
                    tracing::error!(%error, "the bench's hub stopped");
                }
            }
        });

        let polling_dir = dir.join("calls-polling");
        let (url, hub_thumbprint) = (hub_url.clone(), identity.thumbprint().to_string());
        let mut polling_agent = blocking(move || {
            PollingAgent::prepare(&polling_dir, &url, &hub_thumbprint).map_err(process_failed)
        })
        .await?;
        let polling_thumbprint = thumbprint(polling_agent.thumbprint())?;
        hub.trust_agent(TrustedAgent {
            thumbprint: polling_thumbprint,
            name: polling_agent.agent_id().to_owned(),
            mode: AgentMode::Polling,
            address: None,
            roles: Vec::new(),
            environments: Vec::new(),
            previous_thumbprint: None,
            retire_previous_at: None,
        });
        polling_agent.start().map_err(process_failed)?;

        let listening_target: Target = listening_agent
            .target()
            .parse()
            .map_err(|error| format!("the listening agent's address: {error}"))?;
        let polling_target: Target = format!("poll://{}", polling_agent.agent_id())
            .parse()
            .map_err(|error| format!("the polling agent's id: {error}"))?;
        let listening = hub
            .client(&listening_target, thumbprint(listening_agent.thumbprint())?)
            .await
            .map_err(|error| format!("dialling the listening agent: {error}"))?;
        let polling = hub
            .client(&polling_target, polling_thumbprint)
            .await
            .map_err(|error| format!("reaching the polling agent: {error}"))?;
        // The first calls wait for the tunnel and prove trust both ways.
        for client in [&listening, &polling] {
            client
                .capabilities()
                .await
                .map_err(|error| format!("the first call: {error}"))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            identity,
            listening_agent,
            _polling_agent: polling_agent,
            listening,
            polling,
            _hub: stop.drop_guard(),
        })
    }
}

pub(super) fn thumbprint(text: &str) -> Result<Thumbprint, String> {
    text.parse()
        .map_err(|error| format!("thumbprint `{text}`: {error}"))
}

/// Runs the rows of [`ROWS`] that `settings` wants, returning them in that
/// order; rows whose setup failed are skipped with the reason.
pub async fn rows(settings: &Settings) -> Vec<Row> {
    let wanted: Vec<&'static str> = ROWS
        .into_iter()
        .filter(|name| settings.wants(name))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let setup = match Setup::start(&settings.dir).await {
        Ok(setup) => setup,
        Err(why) => {
            let rows: Vec<Row> = wanted
                .into_iter()
                .map(|name| skip(name, settings, why.clone()))
                .collect();
            rows.iter().for_each(super::print_row);
            return rows;
        }
    };
    let mut rows = Vec::new();
    let emit = |rows: &mut Vec<Row>, new: Vec<Row>| {
        for row in &new {
            super::print_row(row);
        }
        rows.extend(new);
    };
    let wants = |name: &str| wanted.contains(&name);
    if wants("unary-p50") || wants("unary-p99") || wants("unary-tonic") {
        emit(&mut rows, unary_rows(&setup, settings, &wanted).await);
    }
    if wants("unary-operator") {
        emit(&mut rows, vec![operator_row(&setup, settings).await]);
    }
    if wants("concurrent-64") {
        emit(&mut rows, vec![concurrent_row(&setup, settings).await]);
    }
    if wants("script-first-line") {
        emit(&mut rows, vec![first_line_row(&setup, settings).await]);
    }
    let transfers = [
        "upload-listening",
        "upload-polling",
        "download-listening",
        "download-polling",
        "scp-download",
    ];
    if transfers.iter().any(|name| wants(name)) {
        emit(&mut rows, transfer_rows(&setup, settings, &wanted).await);
    }
    if wants("unary-during-upload") || wants("agent-rss-during-upload") {
        emit(
            &mut rows,
            during_upload_rows(&setup, settings, &wanted).await,
        );
    }
    rows
}

fn skip(name: &'static str, settings: &Settings, why: String) -> Row {
    skipped(name, &describe(name, settings), unit(name), why)
}

fn unit(name: &str) -> &'static str {
    match name {
        "unary-p50" | "unary-p99" | "unary-tonic" | "unary-operator" => "us",
        "concurrent-64" => "op/s",
        "script-first-line" | "unary-during-upload" => "ms",
        "agent-rss-during-upload" => "MB",
        _ => "MB/s",
    }
}

fn describe(name: &str, settings: &Settings) -> String {
    let calls = settings.small_calls;
    let size = format!("{} MiB", settings.bulk_bytes >> 20);
    match name {
        "unary-p50" => format!(
            "GetCapabilities p50 from the hub's process to a polling agent ({calls} sequential calls a round)"
        ),
        "unary-p99" => "the same at p99".to_owned(),
        "unary-tonic" => {
            "GetCapabilities p50 to a listening agent, beside a plain tonic server over the same TLS"
                .to_owned()
        }
        "unary-operator" => format!(
            "GetCapabilities p50 from an operator process through a hub process to a polling agent ({calls} calls a round)"
        ),
        "concurrent-64" => format!(
            "GetCapabilities throughput with {CALLERS} concurrent callers in the hub's process, to a polling agent"
        ),
        "script-first-line" => format!(
            "StartScript `echo hi` to the first output line, listening agent ({} scripts a round)",
            settings.calls
        ),
        "upload-listening" => format!("upload {size}, SHA-256 verified and fsynced, listening"),
        "upload-polling" => format!("upload {size}, SHA-256 verified and fsynced, polling"),
        "download-listening" => format!("download {size}, verified and fsynced, listening"),
        "download-polling" => format!("download {size}, verified and fsynced, polling"),
        "scp-download" => format!("`scp` of {size} from the sshd"),
        "unary-during-upload" => {
            format!("GetCapabilities p99 while a {size} upload runs on the same tunnel (polling)")
        }
        _ => format!("the listening agent's peak RSS while it receives {size}"),
    }
}

/// Sorted microseconds of `calls` sequential `GetCapabilities` calls.
pub(super) async fn sequential(client: &AgentClient, calls: usize) -> Result<Vec<f64>, String> {
    let mut micros = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        client
            .capabilities()
            .await
            .map_err(|error| format!("GetCapabilities: {error}"))?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    Ok(micros)
}

/// The nearest-rank percentile `q` (0..=1) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A row comparing `ours` with `theirs`, one pair per round, the ratio
/// `ours / theirs`.
#[allow(clippy::too_many_arguments)]
fn compared(
    name: &'static str,
    settings: &Settings,
    pairs: &[(f64, f64)],
    peer: &str,
    ratio_is: &'static str,
    target: Option<&'static str>,
) -> Row {
    let ours: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let theirs: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let mut row = measured(name, &describe(name, settings), unit(name), &ours);
    row.peer = median(&theirs).map(|value| Peer {
        name: peer.to_owned(),
        value,
    });
    row.ratio = Ratio::of(pairs);
    row.ratio_is = Some(ratio_is);
    row.target = target;
    row
}

pub(super) async fn warm_up(client: &AgentClient) -> Result<(), String> {
    sequential(client, WARM_UP).await.map(drop)
}

/// A plain tonic server process (`tentacle-sim bench-unary-peer`) and a
/// client for it.
struct TonicPeer {
    _child: KillOnDrop,
    client: AgentClient,
}

#[derive(Debug)]
struct KillOnDrop(tokio::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            super::local::forget_group(pid);
        }
        let _ = self.0.start_kill();
    }
}

impl TonicPeer {
    async fn start(identity: &Identity) -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|error| format!("finding tentacle-sim's own path: {error}"))?;
        let mut child = tokio::process::Command::new(exe)
            .process_group(0)
            .args(["bench-unary-peer", "--trust"])
            .arg(identity.thumbprint().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("starting the plain tonic server: {error}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("the plain tonic server has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .map_err(|_| "the plain tonic server did not start within 20 s".to_owned())?
            .map_err(|error| format!("reading the plain tonic server's address: {error}"))?
            .ok_or("the plain tonic server exited before it listened")?;
        if let Some(pid) = child.id() {
            super::local::track_group(pid);
        }
        let child = KillOnDrop(child);
        let (address, peer) = line
            .split_once(' ')
            .ok_or_else(|| format!("the plain tonic server said `{line}`"))?;
        let address: ListeningAddress = format!("https://{address}")
            .parse()
            .map_err(|error| format!("the plain tonic server's address: {error}"))?;
        let client = AgentClient::connect_listening(
            &address,
            thumbprint(peer)?,
            identity,
            &DialSettings::default(),
        )
        .await
        .map_err(|error| format!("dialling the plain tonic server: {error}"))?;
        Ok(Self {
            _child: child,
            client,
        })
    }
}

/// Rows 1 and 2, and the plain tonic baseline: sequential small calls to
/// the polling agent, the listening agent and the tonic server in rotating
/// order each round.
async fn unary_rows(setup: &Setup, settings: &Settings, wanted: &[&'static str]) -> Vec<Row> {
    let names: Vec<&'static str> = ["unary-p50", "unary-p99", "unary-tonic"]
        .into_iter()
        .filter(|name| wanted.contains(name))
        .collect();
    let fail = |why: String| -> Vec<Row> {
        names
            .iter()
            .map(|name| skip(name, settings, why.clone()))
            .collect()
    };
    let tonic = match TonicPeer::start(&setup.identity).await {
        Ok(tonic) => tonic,
        Err(why) => return fail(why),
    };
    for client in [&setup.polling, &setup.listening, &tonic.client] {
        if let Err(why) = warm_up(client).await {
            return fail(why);
        }
    }
    let calls = settings.small_calls;
    let mut sides = [
        side(|| sequential(&setup.polling, calls)),
        side(|| sequential(&setup.listening, calls)),
        side(|| sequential(&tonic.client, calls)),
    ];
    let rounds = match rotate(settings.rounds, &mut sides).await {
        Ok(rounds) => rounds,
        Err(why) => return fail(why),
    };
    let pairs = |q: f64, a: usize, b: usize| -> Vec<(f64, f64)> {
        rounds
            .iter()
            .map(|round| (percentile(&round[a], q), percentile(&round[b], q)))
            .collect()
    };
    names
        .iter()
        .map(|name| match *name {
            "unary-p50" => compared(
                name,
                settings,
                &pairs(0.5, 0, 1),
                "listening agent, same rounds",
                "polling / listening",
                Some("<= 1.10"),
            ),
            "unary-p99" => compared(
                name,
                settings,
                &pairs(0.99, 0, 1),
                "listening agent, same rounds",
                "polling / listening",
                Some("<= 1.5"),
            ),
            _ => compared(
                name,
                settings,
                &pairs(0.5, 1, 2),
                "plain tonic server, same TLS, same rounds",
                "listening agent / plain tonic",
                None,
            ),
        })
        .collect()
}

/// Row 2b: this process as an operator, through a `tentacle-hub server`
/// process to a polling agent, against dialling the listening agent
/// directly.
async fn operator_row(setup: &Setup, settings: &Settings) -> Row {
    let name = "unary-operator";
    let fail = |why: String| skip(name, settings, why);
    let operator_home = setup.listening_agent.operator_home().to_owned();
    let agent_dir = setup.dir.join("operator-polling");
    let started = blocking(move || {
        // The hub process runs from the operator's home, so it pins the
        // same identity the operator calls with.
        let hub_thumbprint = HubHome::new(&operator_home)
            .identity()
            .map_err(|error| error.to_string())?
            .thumbprint()
            .to_string();
        let port = super::local::free_port().map_err(|error| error.to_string())?;
        let url = format!("https://127.0.0.1:{port}");
        let mut agent =
            PollingAgent::prepare(&agent_dir, &url, &hub_thumbprint).map_err(process_failed)?;
        let hub = HubProcess::start_on(&operator_home, &agent, port).map_err(process_failed)?;
        agent.start().map_err(process_failed)?;
        Ok((hub, agent))
    })
    .await;
    let (hub, agent) = match started {
        Ok(started) => started,
        Err(why) => return fail(why),
    };
    let clients = async {
        let tls = tentacle_proto::tls::client_config(
            &setup.identity,
            TrustStore::new([setup.identity.thumbprint()]),
        )
        .map_err(|error| error.to_string())?;
        let address: ListeningAddress = hub.url().parse().map_err(|e| format!("{e}"))?;
        let channel = tentacle_proto::dial::channel(&address, tls, &DialSettings::default())
            .await
            .map_err(|error| format!("dialling the hub process: {error}"))?;
        let target: Target = format!("poll://{}", agent.agent_id())
            .parse()
            .map_err(|e| format!("{e}"))?;
        let routed = HubRouted::new(channel, &target, thumbprint(agent.thumbprint())?, None)
            .map_err(|error| error.to_string())?;
        let via_hub = AgentClient::new(AgentChannel::ViaHub(routed));
        let listening_address: ListeningAddress = setup
            .listening_agent
            .target()
            .parse()
            .map_err(|e| format!("{e}"))?;
        let direct = AgentClient::connect_listening(
            &listening_address,
            thumbprint(setup.listening_agent.thumbprint())?,
            &setup.identity,
            &DialSettings::default(),
        )
        .await
        .map_err(|error| format!("dialling the listening agent: {error}"))?;
        Ok::<_, String>((via_hub, direct))
    }
    .await;
    let (via_hub, direct) = match clients {
        Ok(clients) => clients,
        Err(why) => return fail(why),
    };
    for client in [&via_hub, &direct] {
        if let Err(why) = warm_up(client).await {
            return fail(why);
        }
    }
    let calls = settings.small_calls;
    let mut sides = [
        side(|| sequential(&via_hub, calls)),
        side(|| sequential(&direct, calls)),
    ];
    let result = rotate(settings.rounds, &mut sides).await;
    drop((hub, agent));
    match result {
        Ok(rounds) => {
            let pairs: Vec<(f64, f64)> = rounds
                .iter()
                .map(|round| (percentile(&round[0], 0.5), percentile(&round[1], 0.5)))
                .collect();
            compared(
                name,
                settings,
                &pairs,
                "the same operator dialling a listening agent directly",
                "through the hub / direct",
                Some("<= 1.6"),
            )
        }
        Err(why) => fail(why),
    }
}

/// Calls per second of [`CALLERS`] concurrent callers making `each` calls.
async fn concurrent(client: &AgentClient, each: usize) -> Result<f64, String> {
    let started = Instant::now();
    let callers = (0..CALLERS).map(|_| {
        let client = client.clone();
        async move {
            for _ in 0..each {
                client
                    .capabilities()
                    .await
                    .map_err(|error| format!("GetCapabilities: {error}"))?;
            }
            Ok::<(), String>(())
        }
    });
    futures::future::try_join_all(callers).await?;
    Ok((CALLERS * each) as f64 / started.elapsed().as_secs_f64())
}

/// Row 3.
async fn concurrent_row(setup: &Setup, settings: &Settings) -> Row {
    let name = "concurrent-64";
    let each = (settings.small_calls / 10).max(5);
    let mut sides = [
        side(|| concurrent(&setup.polling, each)),
        side(|| concurrent(&setup.listening, each)),
    ];
    match rotate(settings.rounds, &mut sides).await {
        Ok(rounds) => {
            let pairs: Vec<(f64, f64)> = rounds.iter().map(|r| (r[0], r[1])).collect();
            compared(
                name,
                settings,
                &pairs,
                "listening agent, same rounds",
                "polling / listening",
                Some(">= 0.9"),
            )
        }
        Err(why) => skip(name, settings, why),
    }
}

/// Milliseconds from StartScript to the script's first output line, the
/// mean of `scripts` scripts.
async fn script_first_line(client: &AgentClient, scripts: usize) -> Result<f64, String> {
    use tentacle_proto::v1 as pb;
    let mut total = Duration::ZERO;
    for _ in 0..scripts {
        let ticket = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let request = pb::StartScriptRequest {
            ticket: ticket.clone(),
            script_body: "echo hi".to_owned(),
            ..Default::default()
        };
        let started = Instant::now();
        let mut first = None;
        let end = client
            .run_script(
                request,
                |_line| {
                    first.get_or_insert_with(|| started.elapsed());
                },
                &CancellationToken::new(),
                &Default::default(),
            )
            .await
            .map_err(|error| format!("the script: {error}"))?;
        if end.exit_code != 0 {
            return Err(format!("`echo hi` exited with {}", end.exit_code));
        }
        total += first.ok_or("`echo hi` printed nothing")?;
        client
            .complete_script(&ticket)
            .await
            .map_err(|error| format!("CompleteScript: {error}"))?;
    }
    Ok(total.as_secs_f64() * 1000.0 / scripts as f64)
}

/// The same for `bash -c 'echo hi'` spawned here directly.
async fn bash_first_line(scripts: usize) -> Result<f64, String> {
    let mut total = Duration::ZERO;
    for _ in 0..scripts {
        let started = Instant::now();
        let mut child = tokio::process::Command::new("bash")
            .args(["-c", "echo hi"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("starting bash: {error}"))?;
        let stdout = child.stdout.take().ok_or("bash has no stdout")?;
        let line = tokio::io::BufReader::new(stdout)
            .lines()
            .next_line()
            .await
            .map_err(|error| format!("reading bash: {error}"))?;
        total += started.elapsed();
        if line.is_none() {
            return Err("bash printed nothing".to_owned());
        }
        let _ = child.wait().await;
    }
    Ok(total.as_secs_f64() * 1000.0 / scripts as f64)
}

/// Row 5: the difference, not the ratio, is the target.
async fn first_line_row(setup: &Setup, settings: &Settings) -> Row {
    let name = "script-first-line";
    let scripts = settings.calls;
    let mut sides = [
        side(|| script_first_line(&setup.listening, scripts)),
        side(|| bash_first_line(scripts)),
    ];
    match rotate(settings.rounds, &mut sides).await {
        Ok(rounds) => {
            let pairs: Vec<(f64, f64)> = rounds.iter().map(|r| (r[0], r[1])).collect();
            let mut row = compared(
                name,
                settings,
                &pairs,
                "`bash -c 'echo hi'` spawned directly, same rounds",
                "Tentacle - bash (ms, a difference)",
                Some("<= +5 ms"),
            );
            row.ratio = Ratio::differences(&pairs);
            row
        }
        Err(why) => skip(name, settings, why),
    }
}

/// MB/s of one upload of `local` through `client`.
pub(super) async fn upload(client: &AgentClient, local: &Path, bytes: u64) -> Result<f64, String> {
    let started = Instant::now();
    let response = client
        .upload(local, REMOTE_FILE, CHUNK)
        .await
        .map_err(|error| format!("UploadFile: {error}"))?;
    if response.size != bytes {
        return Err(format!(
            "the agent stored {} bytes, not {bytes}",
            response.size
        ));
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / MB)
}

/// MB/s of one download of the uploaded file through `client`.
pub(super) async fn download(
    client: &AgentClient,
    local: &Path,
    bytes: u64,
) -> Result<f64, String> {
    let started = Instant::now();
    let header = client
        .download(REMOTE_FILE, local, false)
        .await
        .map_err(|error| format!("DownloadFile: {error}"))?;
    let rate = bytes as f64 / started.elapsed().as_secs_f64() / MB;
    let _ = tokio::fs::remove_file(local).await;
    if header.size != bytes {
        return Err(format!("the agent sent {} bytes, not {bytes}", header.size));
    }
    Ok(rate)
}

/// MB/s of a blocking transfer of `bytes` run by `work`.
async fn timed_blocking(
    bytes: u64,
    work: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<f64, String> {
    let started = Instant::now();
    blocking(work).await?;
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / MB)
}

/// Rows 6 and 7: each round uploads (then downloads) the same file to the
/// listening agent, to the polling agent and with `scp`, and writes it
/// with `dd conv=fsync`, in rotating order.
async fn transfer_rows(setup: &Setup, settings: &Settings, wanted: &[&'static str]) -> Vec<Row> {
    let names: Vec<&'static str> = [
        "upload-listening",
        "upload-polling",
        "download-listening",
        "download-polling",
        "scp-download",
    ]
    .into_iter()
    .filter(|name| wanted.contains(name))
    .collect();
    let fail = |why: String| -> Vec<Row> {
        names
            .iter()
            .map(|name| skip(name, settings, why.clone()))
            .collect()
    };
    let bytes = settings.bulk_bytes;
    let dir = setup.dir.clone();
    let source = dir.join("transfer-source.bin");
    {
        let source = source.clone();
        if let Err(why) = blocking(move || {
            write_file(&source, bytes).map_err(|e| format!("writing the file to send: {e}"))
        })
        .await
        {
            return fail(why);
        }
    }
    let ssh = {
        let dir = dir.join("transfer-sshd");
        blocking(move || sshd::Sshd::start(&dir).map_err(|error| error.to_string()))
            .await
            .map(Arc::new)
    };
    let scp_upload = |ssh: Arc<sshd::Sshd>| {
        let (source, target) = (source.clone(), dir.join("scp-target.bin"));
        side(move || {
            let (ssh, source, target) = (ssh.clone(), source.clone(), target.clone());
            timed_blocking(bytes, move || {
                let result = ssh.upload(&source, &target).map_err(|e| e.to_string());
                let _ = std::fs::remove_file(&target);
                result
            })
        })
    };
    let dd = {
        let dir = dir.clone();
        side(move || {
            let dir = dir.clone();
            async move {
                blocking(move || {
                    baselines::disk_fsync(&dir, bytes)
                        .map(|rate| rate / MB)
                        .map_err(|e| format!("dd to {}: {e}", dir.display()))
                })
                .await
            }
        })
    };
    let mut rows = Vec::new();

    let want_upload = names.iter().any(|n| n.starts_with("upload"));
    // The downloads need the file on both agents, so they upload it first.
    let want_download = names.iter().any(|n| n.contains("download"));
    if want_upload || want_download {
        let mut sides = vec![
            side(|| upload(&setup.listening, &source, bytes)),
            side(|| upload(&setup.polling, &source, bytes)),
            dd,
        ];
        if let Ok(ssh) = &ssh {
            sides.push(scp_upload(ssh.clone()));
        }
        let rounds = if want_upload { settings.rounds } else { 1 };
        match rotate(rounds, &mut sides).await {
            Ok(rounds) if want_upload => {
                for (name, index) in [("upload-listening", 0), ("upload-polling", 1)] {
                    if !names.contains(&name) {
                        continue;
                    }
                    rows.push(upload_row(
                        name,
                        index,
                        &rounds,
                        ssh.as_ref().err(),
                        settings,
                    ));
                }
            }
            Ok(_) => {}
            Err(why) => return fail(why),
        }
    }

    if want_download {
        let local = dir.join("download.bin");
        let mut sides = vec![
            side(|| download(&setup.listening, &local, bytes)),
            side(|| download(&setup.polling, &local, bytes)),
        ];
        if let Ok(ssh) = &ssh {
            let (ssh, source, target) = (ssh.clone(), source.clone(), dir.join("scp-download.bin"));
            sides.push(side(move || {
                let (ssh, source, target) = (ssh.clone(), source.clone(), target.clone());
                timed_blocking(bytes, move || {
                    let result = ssh.download(&source, &target).map_err(|e| e.to_string());
                    let _ = std::fs::remove_file(&target);
                    result
                })
            }));
        }
        match rotate(settings.rounds, &mut sides).await {
            Ok(rounds) => {
                for (name, index) in [("download-listening", 0), ("download-polling", 1)] {
                    if !names.contains(&name) {
                        continue;
                    }
                    let ours: Vec<f64> = rounds.iter().map(|r| r[index]).collect();
                    let mut row = match &ssh {
                        Ok(_) => compared(
                            name,
                            settings,
                            &rounds.iter().map(|r| (r[index], r[2])).collect::<Vec<_>>(),
                            "scp of the same file, same rounds",
                            "Tentacle / scp",
                            Some(">= 1.25"),
                        ),
                        Err(why) => {
                            let mut row =
                                measured(name, &describe(name, settings), unit(name), &ours);
                            row.measure = format!("{} (no scp: {why})", row.measure);
                            row
                        }
                    };
                    row.target = Some(">= 1.25");
                    rows.push(row);
                }
                if names.contains(&"scp-download") {
                    rows.push(match &ssh {
                        Ok(_) => {
                            let scp: Vec<f64> = rounds.iter().map(|r| r[2]).collect();
                            measured(
                                "scp-download",
                                &describe("scp-download", settings),
                                "MB/s",
                                &scp,
                            )
                        }
                        Err(why) => skip("scp-download", settings, why.clone()),
                    });
                }
            }
            Err(why) => {
                rows.extend(
                    names
                        .iter()
                        .filter(|n| n.contains("download"))
                        .map(|name| skip(name, settings, why.clone())),
                );
            }
        }
    }
    let _ = std::fs::remove_file(&source);
    rows
}

/// An upload row from rounds of (listening, polling, dd[, scp]).
fn upload_row(
    name: &'static str,
    index: usize,
    rounds: &[Vec<f64>],
    no_scp: Option<&String>,
    settings: &Settings,
) -> Row {
    let ours: Vec<f64> = rounds.iter().map(|r| r[index]).collect();
    let versus_dd: Vec<(f64, f64)> = rounds.iter().map(|r| (r[index], r[2])).collect();
    let dd_also = Also {
        peer: Peer {
            name: "dd bs=1M conv=fsync of the same size, same rounds".to_owned(),
            value: median(&versus_dd.iter().map(|p| p.1).collect::<Vec<_>>()).unwrap_or(f64::NAN),
        },
        ratio: Ratio::of(&versus_dd),
        ratio_is: "Tentacle / dd",
        target: Some(">= 0.8"),
    };
    let mut row = match no_scp {
        None => compared(
            name,
            settings,
            &rounds.iter().map(|r| (r[index], r[3])).collect::<Vec<_>>(),
            "scp of the same file (no verification, no fsync), same rounds",
            "Tentacle / scp",
            Some(">= 1.0"),
        ),
        Some(why) => {
            let mut row = measured(name, &describe(name, settings), unit(name), &ours);
            row.measure = format!("{} (no scp: {why})", row.measure);
            row.target = Some(">= 1.0");
            row
        }
    };
    row.also.push(dd_also);
    row
}

/// Peak resident memory of a process, from `/proc/PID/status` (KiB).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Row 8, and the listening agent's memory while it receives a file.
async fn during_upload_rows(
    setup: &Setup,
    settings: &Settings,
    wanted: &[&'static str],
) -> Vec<Row> {
    let bytes = settings.bulk_bytes;
    let source = setup.dir.join("during-source.bin");
    let mut rows = Vec::new();
    {
        let source = source.clone();
        if let Err(why) = blocking(move || {
            write_file(&source, bytes).map_err(|e| format!("writing the file to send: {e}"))
        })
        .await
        {
            return wanted
                .iter()
                .filter(|n| **n == "unary-during-upload" || **n == "agent-rss-during-upload")
                .map(|name| skip(name, settings, why.clone()))
                .collect();
        }
    }
    if wanted.contains(&"unary-during-upload") {
        let name = "unary-during-upload";
        let mut p99s = Vec::new();
        let mut calls = 0usize;
        let mut failure = None;
        for _ in 0..settings.rounds {
            match calls_during_upload(&setup.polling, &source, bytes).await {
                Ok(micros) => {
                    calls += micros.len();
                    p99s.push(percentile(&micros, 0.99) / 1000.0);
                }
                Err(why) => {
                    failure = Some(why);
                    break;
                }
            }
        }
        rows.push(match failure {
            Some(why) => skip(name, settings, why),
            None => {
                let mut row = measured(name, &describe(name, settings), unit(name), &p99s);
                row.measure = format!("{} ({calls} calls in all)", row.measure);
                row.target = Some("<= 10 ms");
                row
            }
        });
    }
    if wanted.contains(&"agent-rss-during-upload") {
        let name = "agent-rss-during-upload";
        let pid = setup.listening_agent.pid();
        // The transfer rows already raised the peak: start it afresh from
        // the current RSS (Linux's "5" to clear_refs resets VmHWM).
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        let before = peak_rss_kib(pid);
        let result = upload(&setup.listening, &source, bytes).await;
        let after = peak_rss_kib(pid);
        rows.push(match (result, before, after) {
            (Ok(_), Some(before), Some(after)) => {
                let mut row = measured(
                    name,
                    &describe(name, settings),
                    unit(name),
                    &[after as f64 * 1024.0 / MB],
                );
                row.measure = format!(
                    "{} (RSS before the upload {:.1} MB)",
                    row.measure,
                    before as f64 * 1024.0 / MB
                );
                row
            }
            (Err(why), _, _) => skip(name, settings, why),
            _ => skip(name, settings, format!("cannot read /proc/{pid}/status")),
        });
    }
    let _ = std::fs::remove_file(&source);
    rows
}

/// Sorted microseconds of sequential small calls made while one upload
/// runs on the same client (the same tunnel, for a polling agent).
async fn calls_during_upload(
    client: &AgentClient,
    source: &Path,
    bytes: u64,
) -> Result<Vec<f64>, String> {
    let uploading = {
        let client = client.clone();
        let source = source.to_owned();
        tokio::spawn(async move { upload(&client, &source, bytes).await })
    };
    // Let the upload fill the pipe before the first call.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut micros = Vec::new();
    while !uploading.is_finished() {
        let started = Instant::now();
        client
            .capabilities()
            .await
            .map_err(|error| format!("GetCapabilities during the upload: {error}"))?;
        micros.push(started.elapsed().as_secs_f64() * 1e6);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    uploading
        .await
        .map_err(|error| format!("the upload task: {error}"))??;
    if micros.is_empty() {
        return Err("the upload ended before the first call; use a larger size".to_owned());
    }
    micros.sort_by(f64::total_cmp);
    Ok(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.5), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[tokio::test]
    async fn rounds_rotate_which_side_goes_first() {
        let order = std::sync::Mutex::new(Vec::new());
        let mut sides = [
            side(|| async {
                order.lock().expect("order").push('a');
                Ok::<_, String>(1)
            }),
            side(|| async {
                order.lock().expect("order").push('b');
                Ok(2)
            }),
            side(|| async {
                order.lock().expect("order").push('c');
                Ok(3)
            }),
        ];
        let rounds = rotate(3, &mut sides).await.expect("rounds");
        drop(sides);
        assert_eq!(rounds, vec![vec![1, 2, 3]; 3]);
        let order: String = order.into_inner().expect("order").into_iter().collect();
        assert_eq!(order, "abcbcacab");
    }

    #[tokio::test]
    async fn a_failing_side_ends_the_rounds_with_its_reason() {
        let mut sides = [
            side(|| async { Ok::<_, String>(1) }),
            side(|| async { Err::<i32, _>("no peer".to_owned()) }),
        ];
        assert_eq!(rotate(2, &mut sides).await, Err("no peer".to_owned()));
    }
}
