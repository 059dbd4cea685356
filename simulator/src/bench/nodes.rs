//! The rows across hub nodes: what a call costs when the node an operator
//! reaches does not hold the polling agent's tunnel and forwards the call
//! to the node that does, against the same call through that node.
//!
//! The bench starts one etcd member ([`super::etcd`]) and two hub nodes on
//! it in its own process, sharing one identity as a cluster's nodes do; a
//! polling agent process dials node A only. The bench process is the
//! operator: it calls through node B (forwarded to A over pinned mTLS) and
//! through node A, in rotating order each round. Without `/usr/bin/etcd`
//! the rows are skipped and say how to install it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tentacle_hub::channel::{AgentChannel, HubRouted};
use tentacle_hub::client::AgentClient;
use tentacle_hub::cluster::{Node, NodeId};
use tentacle_hub::store::etcd::node::ClusterNode;
use tentacle_hub::store::etcd::{EtcdSettings, EtcdStore};
use tentacle_hub::target::Target;
use tentacle_hub::{AgentMode, Hub, HubSettings, TrustedAgent};
use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio_util::sync::CancellationToken;

use super::calls::{
    WARM_UP, blocking, download, percentile, rotate, sequential, side, thumbprint, upload,
};
use super::etcd::{self, Etcd};
use super::processes::PollingAgent;
use super::stats::{Ratio, median};
use super::{Peer, Row, Settings, measured, skipped, write_file};

/// The names of the rows this module measures, in the order it runs them.
pub const ROWS: [&str; 3] = ["forwarded-p50", "forwarded-p99", "forwarded-download"];

/// How soon a node's presence entries vanish after it stops (the hub's
/// default).
const PRESENCE_TTL: Duration = Duration::from_secs(10);
/// How long node B may take to hear that node A holds the agent's tunnel.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The first call through node B: how long each try may wait for a
/// holder, and how many tries.
const FIRST_CALL_PICKUP: Duration = Duration::from_secs(5);
const FIRST_CALL_ATTEMPTS: usize = 5;
/// How long a timed call may wait for a holder of the agent's tunnel.
const CALL_PICKUP: Duration = Duration::from_secs(10);

const RATIO_IS: &str = "through the other node / through the owning node";

fn unit(name: &str) -> &'static str {
    match name {
        "forwarded-download" => "MB/s",
        _ => "us",
    }
}

fn describe(name: &str, settings: &Settings) -> String {
    match name {
        "forwarded-p50" => format!(
            "GetCapabilities p50 from an operator through hub node B, forwarded to node A, which holds the polling agent's tunnel ({} sequential calls a round)",
            settings.small_calls
        ),
        "forwarded-p99" => "the same at p99".to_owned(),
        _ => format!(
            "download {} MiB from a polling agent through node B, forwarded to node A, verified and fsynced",
            settings.bulk_bytes >> 20
        ),
    }
}

fn skip(name: &'static str, settings: &Settings, why: String) -> Row {
    skipped(name, &describe(name, settings), unit(name), why)
}

/// A row of `(through B, through A)` pairs, the ratio B / A.
fn compared(
    name: &'static str,
    settings: &Settings,
    pairs: &[(f64, f64)],
    peer: &str,
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
    row.ratio_is = Some(RATIO_IS);
    row.target = target;
    row
}

/// Runs the rows of [`ROWS`] that `settings` wants, in that order; all are
/// skipped, with the reason, when etcd or the cluster cannot start.
pub async fn rows(settings: &Settings) -> Vec<Row> {
    let wanted: Vec<&'static str> = ROWS
        .into_iter()
        .filter(|name| settings.wants(name))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let rows = if etcd::installed() {
        measure(settings, &wanted).await
    } else {
        Err(etcd::NOT_INSTALLED.to_owned())
    };
    let rows = rows.unwrap_or_else(|why| {
        wanted
            .iter()
            .map(|name| skip(name, settings, why.clone()))
            .collect()
    });
    rows.iter().for_each(super::print_row);
    rows
}

/// Starts the cluster, measures, and stops the cluster whatever happened.
async fn measure(settings: &Settings, wanted: &[&'static str]) -> Result<Vec<Row>, String> {
    let dir = settings.dir.join("nodes");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let etcd = {
        let dir = dir.clone();
        blocking(move || Etcd::start(&dir).map_err(|error| error.to_string())).await?
    };
    let mut cluster = TwoNodes {
        etcd,
        nodes: Vec::new(),
        serving: CancellationToken::new(),
        agent: None,
    };
    let result = match cluster.start(&dir).await {
        Ok(clients) => Ok(measure_rows(settings, wanted, &clients, &dir).await),
        Err(why) => Err(why),
    };
    cluster.stop().await;
    result
}

/// etcd, the two nodes on it, and the polling agent whose tunnel is on
/// node A.
struct TwoNodes {
    etcd: Etcd,
    nodes: Vec<ClusterNode>,
    serving: CancellationToken,
    agent: Option<PollingAgent>,
}

/// The operator's two ways to the agent.
struct Clients {
    /// Through node B, which forwards to A.
    forwarded: AgentClient,
    /// Through node A, which holds the tunnel.
    owner: AgentClient,
}

impl TwoNodes {
    async fn start(&mut self, dir: &Path) -> Result<Clients, String> {
        let identity = Identity::generate("tentacle-bench-hub")
            .map_err(|error| format!("making the hub nodes' identity: {error}"))?;
        let settings = EtcdSettings::new(vec![self.etcd.endpoint()]);
        let mut urls = Vec::new();
        for id in ["bench-a", "bench-b"] {
            let store = EtcdStore::connect(&settings)
                .await
                .map_err(|error| format!("connecting to the bench's etcd: {error}"))?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|error| format!("binding hub node {id}: {error}"))?;
            let port = listener
                .local_addr()
                .map_err(|error| format!("reading hub node {id}'s address: {error}"))?
                .port();
            let node = Node {
                id: id
                    .parse::<NodeId>()
                    .map_err(|error| format!("node id: {error}"))?,
                address: ListeningAddress::new("127.0.0.1".to_owned(), port),
            };
            let joined = ClusterNode::join(
                store,
                identity.clone(),
                HubSettings::default(),
                node,
                PRESENCE_TTL,
            )
            .await
            .map_err(|error| format!("hub node {id} joining the cluster: {error}"))?;
            serve(joined.hub().clone(), listener, self.serving.clone());
            self.nodes.push(joined);
            urls.push(format!("https://127.0.0.1:{port}"));
        }
        let (a, b) = (self.nodes[0].hub().clone(), self.nodes[1].hub().clone());

        let agent_dir = dir.join("polling");
        let (url, hub_thumbprint) = (urls[0].clone(), identity.thumbprint().to_string());
        let prepared = blocking(move || {
            PollingAgent::prepare(&agent_dir, &url, &hub_thumbprint).map_err(|e| e.to_string())
        })
        .await?;
        let agent = self.agent.insert(prepared);
        let agent_thumbprint = thumbprint(agent.thumbprint())?;
        a.register(TrustedAgent {
            thumbprint: agent_thumbprint,
            name: agent.agent_id().to_owned(),
            mode: AgentMode::Polling,
            address: None,
            roles: Vec::new(),
            environments: Vec::new(),
            previous_thumbprint: None,
            retire_previous_at: None,
        })
        .await
        .map_err(|error| format!("registering the polling agent on node A: {error}"))?;
        agent.start().map_err(|error| error.to_string())?;
        let target: Target = format!("poll://{}", agent.agent_id())
            .parse()
            .map_err(|error| format!("the polling agent's id: {error}"))?;
        until_b_sees_a_holding(&b, &target).await?;

        let client = |url: String, pickup: Option<Duration>| {
            let (identity, target) = (identity.clone(), target.clone());
            async move {
                operator_client(&identity, &url, &target, agent_thumbprint, pickup)
                    .await
                    .map_err(|why| format!("the operator's client for {url}: {why}"))
            }
        };
        // A call that cannot be forwarded fails within CALL_PICKUP rather
        // than the hub's two minutes, so the row says why soon.
        let clients = Clients {
            owner: client(urls[0].clone(), Some(CALL_PICKUP)).await?,
            forwarded: client(urls[1].clone(), Some(CALL_PICKUP)).await?,
        };
        // The first calls prove trust both ways before anything is timed.
        // A forwarded call whose first offer to node A fails waits out the
        // whole pickup timeout (two minutes) for another holder, so the
        // first one through B is tried with a short one, a few times.
        clients
            .owner
            .capabilities()
            .await
            .map_err(|error| format!("the first call through node A: {error}"))?;
        let probe = client(urls[1].clone(), Some(FIRST_CALL_PICKUP)).await?;
        let mut last = String::new();
        for _ in 0..FIRST_CALL_ATTEMPTS {
            match probe.capabilities().await {
                Ok(_) => return Ok(clients),
                Err(error) => last = error.to_string(),
            }
        }
        Err(format!(
            "{FIRST_CALL_ATTEMPTS} first calls through node B failed; the last: {last}"
        ))
    }

    /// Takes both nodes out of etcd's presence, stops serving, then stops
    /// the agent and etcd (on drop).
    async fn stop(self) {
        for node in &self.nodes {
            node.leave().await;
        }
        self.serving.cancel();
        drop(self.agent);
        drop(self.etcd);
    }
}

fn serve(hub: Arc<Hub>, listener: tokio::net::TcpListener, stop: CancellationToken) {
    tokio::spawn(async move {
        if let Err(error) = hub.serve(listener, stop.cancelled_owned()).await {
            tracing::error!(%error, "a bench hub node stopped");
        }
    });
}

/// Waits until node B's view of presence names node A for the agent, so
/// no timed call waits for it.
async fn until_b_sees_a_holding(b: &Hub, target: &Target) -> Result<(), String> {
    let Target::Polling(agent) = target else {
        return Err(format!("{target} is not a polling agent"));
    };
    let cluster = b.cluster().ok_or("node B joined no cluster")?;
    let started = Instant::now();
    while cluster.presence.holders(agent).is_empty() {
        if started.elapsed() > PRESENCE_TIMEOUT {
            return Err(format!(
                "node B did not hear of the agent's tunnel on node A within {PRESENCE_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The operator (this process, with the nodes' identity, which every node
/// takes calls from) calling `target` through the node at `url`.
async fn operator_client(
    identity: &Identity,
    url: &str,
    target: &Target,
    agent: Thumbprint,
    pickup: Option<Duration>,
) -> Result<AgentClient, String> {
    let tls =
        tentacle_proto::tls::client_config(identity, TrustStore::new([identity.thumbprint()]))
            .map_err(|error| error.to_string())?;
    let address: ListeningAddress = url.parse().map_err(|error| format!("{error}"))?;
    let channel = tentacle_proto::dial::channel(&address, tls, &DialSettings::default())
        .await
        .map_err(|error| format!("dialling: {error}"))?;
    let routed =
        HubRouted::new(channel, target, agent, pickup).map_err(|error| error.to_string())?;
    Ok(AgentClient::new(AgentChannel::ViaHub(routed)))
}

async fn measure_rows(
    settings: &Settings,
    wanted: &[&'static str],
    clients: &Clients,
    dir: &Path,
) -> Vec<Row> {
    let mut rows = Vec::new();
    if wanted.contains(&"forwarded-p50") || wanted.contains(&"forwarded-p99") {
        rows.extend(unary_rows(settings, wanted, clients).await);
    }
    if wanted.contains(&"forwarded-download") {
        let name = "forwarded-download";
        rows.push(
            download_row(settings, clients, dir.to_owned())
                .await
                .unwrap_or_else(|why| skip(name, settings, why)),
        );
    }
    rows
}

/// Sequential small calls through each node in rotating order, after the
/// same warm-up as the other small-call rows.
async fn unary_rows(settings: &Settings, wanted: &[&'static str], clients: &Clients) -> Vec<Row> {
    let names: Vec<&'static str> = ["forwarded-p50", "forwarded-p99"]
        .into_iter()
        .filter(|name| wanted.contains(name))
        .collect();
    let measured = async {
        for client in [&clients.forwarded, &clients.owner] {
            sequential(client, WARM_UP).await?;
        }
        let calls = settings.small_calls;
        let mut sides = [
            side(|| sequential(&clients.forwarded, calls)),
            side(|| sequential(&clients.owner, calls)),
        ];
        rotate(settings.rounds, &mut sides).await
    };
    let rounds = match measured.await {
        Ok(rounds) => rounds,
        Err(why) => {
            return names
                .iter()
                .map(|name| skip(name, settings, why.clone()))
                .collect();
        }
    };
    let pairs = |q: f64| -> Vec<(f64, f64)> {
        rounds
            .iter()
            .map(|round| (percentile(&round[0], q), percentile(&round[1], q)))
            .collect()
    };
    let peer = "the same calls through node A, which holds the tunnel, same rounds";
    names
        .iter()
        .map(|name| match *name {
            "forwarded-p50" => compared(name, settings, &pairs(0.5), peer, Some("<= 1.5")),
            _ => compared(name, settings, &pairs(0.99), peer, None),
        })
        .collect()
}

/// The file is uploaded once through node A; then each round downloads it
/// through B and through A, in rotating order.
async fn download_row(settings: &Settings, clients: &Clients, dir: PathBuf) -> Result<Row, String> {
    let bytes = settings.bulk_bytes;
    let source = dir.join("forwarded-source.bin");
    {
        let source = source.clone();
        blocking(move || {
            write_file(&source, bytes).map_err(|e| format!("writing the file to send: {e}"))
        })
        .await?;
    }
    let uploaded = upload(&clients.owner, &source, bytes).await;
    let _ = std::fs::remove_file(&source);
    uploaded?;
    let local = dir.join("forwarded-download.bin");
    let mut sides = [
        side(|| download(&clients.forwarded, &local, bytes)),
        side(|| download(&clients.owner, &local, bytes)),
    ];
    let rounds = rotate(settings.rounds, &mut sides).await?;
    let pairs: Vec<(f64, f64)> = rounds.iter().map(|r| (r[0], r[1])).collect();
    Ok(compared(
        "forwarded-download",
        settings,
        &pairs,
        "the same download through node A, which holds the tunnel, same rounds",
        Some(">= 0.8"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_etcd_every_row_says_how_to_install_it() {
        let settings = Settings::quick(PathBuf::from("/nonexistent"));
        for name in ROWS {
            let row = skip(name, &settings, etcd::NOT_INSTALLED.to_owned());
            assert_eq!(
                row.skipped.as_deref(),
                Some("etcd not installed (apt-get install etcd-server)")
            );
            assert!(row.value.is_none());
            assert!(!row.measure.is_empty(), "{name}");
        }
        assert_eq!(unit("forwarded-download"), "MB/s");
        assert_eq!(unit("forwarded-p50"), "us");
    }

    #[test]
    fn a_compared_row_divides_through_b_by_through_a() {
        let settings = Settings::quick(PathBuf::from("/nonexistent"));
        let row = compared(
            "forwarded-p50",
            &settings,
            &[(300.0, 200.0), (240.0, 200.0)],
            "through A",
            Some("<= 1.5"),
        );
        assert_eq!(row.value, Some(270.0));
        assert_eq!(row.peer.as_ref().map(|p| p.value), Some(200.0));
        let ratio = row.ratio.expect("a ratio");
        assert_eq!(ratio.rounds, vec![1.5, 1.2]);
        assert_eq!(row.ratio_is, Some(RATIO_IS));
    }
}
