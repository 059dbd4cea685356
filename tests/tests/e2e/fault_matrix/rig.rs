//! One agent (and, polling, one hub) behind a fault proxy, the scripts
//! the cells run on it, and what a cell's watcher saw.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tentacle_hub::client::AgentClient;
use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tentacle_proto::identity::Identity;
use tentacle_proto::v1 as pb;
use tentacle_tests::fault_proxy::FaultProxy;
use tentacle_tests::{AgentProcess, HubFixture, Mode, client_identity};

use super::Tier;

/// How long a detected dead connection may take to be noticed on top of a
/// call's deadline: the keepalive and heartbeat timeouts below.
pub(super) const DETECTION: Duration = Duration::from_secs(6);
/// How long the flow may take to complete once the fault is gone.
pub(super) const RECOVERY: Duration = Duration::from_secs(60);

/// Lines every matrix script prints, one every 50 ms.
pub(super) const LINES: usize = 20;

/// One agent (and, polling, one hub) behind a fault proxy.
pub(super) struct Rig {
    pub(super) mode: Mode,
    pub(super) agent: AgentProcess,
    pub(super) hub: Option<HubFixture>,
    pub(super) proxy: FaultProxy,
    pub(super) me: Identity,
    pub(super) tier: Tier,
    /// Scripts append their working directory (one per ticket) here.
    pub(super) runs: PathBuf,
    pub(super) scratch: tempfile::TempDir,
    /// The client used for in-flight cells, kept warm between them.
    pub(super) warm: Option<AgentClient>,
}

/// Fast failure detection on both sides of the proxy, so a frozen path is
/// noticed within [`DETECTION`].
pub(super) const AGENT_CONFIG: &str = "[polling]\nheartbeat_interval = \"1s\"\nheartbeat_timeout = \"3s\"\nconnect_timeout = \"3s\"\nreconnect_initial = \"200ms\"\nreconnect_max = \"1s\"\n\n[server.http2]\nkeepalive_interval = \"1s\"\nkeepalive_timeout = \"2s\"\n";

impl Rig {
    pub(super) async fn start(mode: Mode, tier: Tier) -> Self {
        let me = client_identity();
        let scratch = tempfile::tempdir().expect("scratch dir");
        let runs = scratch.path().join("runs");
        std::fs::write(&runs, "").expect("runs file");
        match mode {
            Mode::Listening => {
                let agent = AgentProcess::start(&[me.thumbprint()], AGENT_CONFIG);
                let upstream = agent.target();
                let upstream = tokio::net::lookup_host((upstream.host(), upstream.port()))
                    .await
                    .expect("agent address")
                    .next()
                    .expect("one address");
                let proxy = FaultProxy::start(upstream).await.expect("proxy");
                Self {
                    mode,
                    agent,
                    hub: None,
                    proxy,
                    me,
                    tier,
                    runs,
                    scratch,
                    warm: None,
                }
            }
            Mode::Polling => {
                let settings = tentacle_hub::HubSettings {
                    pickup_timeout: tier.unary_deadline,
                    heartbeat: tentacle_proto::tunnel::HeartbeatSettings {
                        interval: Duration::from_secs(1),
                        timeout: Duration::from_secs(3),
                    },
                    ..Default::default()
                };
                let hub = HubFixture::start_with(me.clone(), settings, "127.0.0.1:0").await;
                let proxy = FaultProxy::start(hub.address).await.expect("proxy");
                let mut agent = AgentProcess::prepare_polling(
                    &format!("https://{}", proxy.address()),
                    &hub.thumbprint().to_string(),
                );
                agent.configure(AGENT_CONFIG);
                hub.trust(&agent);
                agent.spawn();
                Self {
                    mode,
                    agent,
                    hub: Some(hub),
                    proxy,
                    me,
                    tier,
                    runs,
                    scratch,
                    warm: None,
                }
            }
        }
    }

    /// A client made now: in listening mode a new connection through the
    /// proxy (which may fail under the fault); in polling mode a channel
    /// into the agent's tunnels.
    pub(super) async fn fresh_client(&self) -> Result<AgentClient, String> {
        let client = match &self.hub {
            None => {
                let settings = DialSettings {
                    connect_timeout: self.tier.unary_deadline,
                    http2: tentacle_proto::http2::Http2Settings {
                        keepalive_interval: Some(Duration::from_secs(1)),
                        keepalive_timeout: Duration::from_secs(2),
                        max_frame_bytes: None,
                        ..Default::default()
                    },
                };
                let address = ListeningAddress::new("127.0.0.1", self.proxy.address().port());
                AgentClient::connect_listening(&address, self.agent.thumbprint, &self.me, &settings)
                    .await
                    .map_err(|e| e.to_string())?
            }
            Some(hub) => hub.client(&self.agent).await,
        };
        Ok(client.with_unary_timeout(self.tier.unary_deadline))
    }

    /// The warm client, checked to work through a clear proxy.
    pub(super) async fn warm_client(&mut self) -> AgentClient {
        if let Some(client) = &self.warm
            && client.capabilities().await.is_ok()
        {
            return client.clone();
        }
        let client = retry("a warm client", || async {
            let client = self.fresh_client().await?;
            client.capabilities().await.map_err(|e| e.to_string())?;
            Ok(client)
        })
        .await;
        self.warm = Some(client.clone());
        client
    }

    /// A script that records its run, prints [`LINES`] lines and exits 0;
    /// with `hold`, it sleeps for a minute before its last line instead.
    pub(super) fn script(&self, ticket: &str, hold: bool) -> pb::StartScriptRequest {
        let tail = if hold { "sleep 60; " } else { "" };
        pb::StartScriptRequest {
            ticket: ticket.to_owned(),
            script_body: format!(
                "pwd >> '{runs}'; for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.05; \
                 done; {tail}echo done",
                runs = self.runs.display()
            ),
            ..Default::default()
        }
    }

    /// How many times the script of `ticket` ran.
    pub(super) fn runs_of(&self, ticket: &str) -> usize {
        std::fs::read_to_string(&self.runs)
            .expect("runs file")
            .lines()
            .filter(|dir| dir.ends_with(&format!("/{ticket}")))
            .count()
    }

    pub(super) fn upstream_alive(&self) {
        assert!(
            tentacle_tests::process_alive(self.agent.pid() as i32),
            "the agent process died during the matrix; log:\n{}",
            self.agent.log_text()
        );
    }
}

/// Retries `attempt` until it succeeds, for at most [`RECOVERY`].
pub(super) async fn retry<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < RECOVERY {
        match tokio::time::timeout(Duration::from_secs(30), attempt()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(error)) => last = error,
            Err(_) => last = "the attempt hung for 30 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what} did not recover within {RECOVERY:?} after the fault cleared: {last}");
}

/// Lines seen by one watcher, checked for order and duplicates as they come.
#[derive(Debug, Default, Clone)]
pub(super) struct Seen(Arc<Mutex<Vec<pb::LogLine>>>);

impl Seen {
    pub(super) fn push(&self, line: &pb::LogLine) {
        let mut lines = self.0.lock().expect("lines");
        if let Some(last) = lines.last() {
            assert_eq!(
                line.sequence,
                last.sequence + 1,
                "a line was lost or repeated: {:?} after {:?}",
                line.text,
                last.text
            );
        }
        lines.push(line.clone());
    }

    pub(super) fn last_sequence(&self) -> u64 {
        self.0
            .lock()
            .expect("lines")
            .last()
            .map_or(0, |l| l.sequence)
    }

    pub(super) fn texts(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("lines")
            .iter()
            .map(|l| l.text.clone())
            .collect()
    }
}

pub(super) fn expected_lines(finished: bool) -> Vec<String> {
    let mut lines: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    if finished {
        lines.push("done".into());
    }
    lines
}
