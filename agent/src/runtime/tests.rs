//! Agents assembled through the builder run the agent's own code path: the
//! cleaner, the free-space checks, health at shutdown, and the swapped
//! parts where they belong.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use futures::future::BoxFuture;
use sha2::Digest;
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::*;
use crate::config::PollingServer;
use crate::files::{FakeFreeSpace, FileError, UploadHeader, UploadSink};
use crate::polling::dialer::Dialed;
use crate::scripts::{
    Interpreter, IsolationLevel, Job, Outcome, OutputSink, StartRequest, Stream, Ticket,
};

/// Records each job and whether its workspace existed while it ran.
#[derive(Debug, Default)]
struct Recording {
    jobs: Mutex<Vec<(String, bool)>>,
}

impl Executor for Arc<Recording> {
    fn execute(
        &self,
        job: Job,
        output: OutputSink,
        _stop: CancellationToken,
    ) -> BoxFuture<'static, Outcome> {
        let jobs = self.clone();
        async move {
            output.write([(Stream::Stdout, "recorded".to_owned())]);
            jobs.jobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((job.ticket, job.workspace.is_dir()));
            Outcome::Exited(0)
        }
        .boxed()
    }
}

/// Counts dial attempts and fails each one.
#[derive(Debug, Default)]
struct CountingDialer(AtomicUsize);

impl Dialer for CountingDialer {
    fn dial<'a>(
        &'a self,
        _hub: &'a ListeningAddress,
        _timeout: Duration,
    ) -> BoxFuture<'a, std::io::Result<Dialed>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        async { Err(std::io::Error::other("no network in this test")) }.boxed()
    }
}

fn config(dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::default();
    config.scripts.work_dir = dir.join("work");
    config.files.root = dir.join("files");
    config.packages.cache_dir = dir.join("packages");
    config.packages.apps_dir = dir.join("apps");
    config.listen.address = IpAddr::V4(Ipv4Addr::LOCALHOST);
    config.listen.port = 0;
    config.server.shutdown_grace = Duration::from_secs(2);
    config
}

fn in_memory(home: &Path, config: AgentConfig) -> (AgentBuilder, Identity) {
    let identity = Identity::generate("builder test agent").expect("identity");
    let builder = Agent::builder(Home::new(home)).config_source(ConfigSource::InMemory {
        config,
        identity: identity.clone(),
    });
    (builder, identity)
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_built_agent_runs_scripts_on_its_executor_and_cleans_expired_workspaces() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(dir.path());
    config.scripts.workspace_max_age = Duration::from_millis(1);
    config.scripts.cleanup_interval = Duration::from_millis(50);
    let recording = Arc::new(Recording::default());
    let (builder, _) = in_memory(dir.path(), config);
    let agent = builder
        .executor(Arc::new(recording.clone()))
        .build()
        .expect("build");
    assert!(
        !Home::new(dir.path()).config_path().exists(),
        "an in-memory agent needs no tentacle.toml"
    );
    let scripts = agent.scripts().clone();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(agent.serve(None, stop.clone().cancelled_owned()));

    let ticket = Ticket::parse("expires-soon").expect("ticket");
    scripts
        .start(StartRequest {
            ticket: ticket.clone(),
            body: "ignored by the recording executor".into(),
            interpreter: Interpreter::Sh,
            arguments: vec![],
            environment: vec![],
            files: vec![],
            isolation: IsolationLevel::None,
            mutex_name: String::new(),
            mutex_timeout: None,
            execution_timeout: None,
            sensitive_values: vec![],
        })
        .expect("start");
    let workspace = dir.path().join("work").join("expires-soon");
    eventually("the script ran", || {
        !recording
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    })
    .await;
    assert_eq!(
        *recording
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        [("expires-soon".to_owned(), true)],
        "the builder's executor ran the job in its workspace"
    );
    eventually("the cleaner deleted the expired workspace", || {
        !workspace.exists()
    })
    .await;
    assert_eq!(scripts.active(), 0);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the agent stops")
        .expect("join")
        .expect("serve");
}

#[tokio::test]
async fn health_is_serving_until_shutdown_begins_then_not_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = Identity::generate("builder test control plane").expect("identity");
    let mut config = config(dir.path());
    config.trust.thumbprints = vec![control.thumbprint()];
    let wrapped = Arc::new(AtomicUsize::new(0));
    let layer = {
        let wrapped = wrapped.clone();
        StreamLayer::new(move |io| {
            wrapped.fetch_add(1, Ordering::Relaxed);
            io
        })
    };
    let (builder, identity) = in_memory(dir.path(), config);
    let agent = builder
        .executor(Arc::new(Arc::new(Recording::default())))
        .stream_layer(layer)
        .build()
        .expect("build");
    let listener = agent.bind().await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(agent.serve(Some(listener), stop.clone().cancelled_owned()));

    let tls =
        tentacle_proto::tls::client_config(&control, TrustStore::new([identity.thumbprint()]))
            .expect("tls");
    let channel = dial::channel(
        &ListeningAddress::new("127.0.0.1", port),
        tls,
        &DialSettings::default(),
    )
    .await
    .expect("pinned mTLS to the built agent");
    assert_eq!(
        wrapped.load(Ordering::Relaxed),
        1,
        "the accepted connection went through the layer"
    );
    let service = "tentacle.v1.ScriptService".to_owned();
    let mut health = HealthClient::new(channel);
    let checked = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .expect("check")
        .into_inner();
    assert_eq!(checked.status, ServingStatus::Serving as i32);
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest { service })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    stop.cancel();
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a status change once shutdown begins")
        .expect("watch")
        .expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    drop(health);
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the agent stops within its grace period")
        .expect("join")
        .expect("serve");
}

#[tokio::test]
async fn polling_dials_through_the_builders_dialer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(dir.path());
    config.listen.enabled = false;
    config.polling.enabled = true;
    config.polling.agent_id = "built".into();
    config.polling.reconnect_initial = Duration::from_millis(10);
    config.polling.reconnect_max = Duration::from_millis(20);
    config.polling.servers = vec![PollingServer {
        url: "https://127.0.0.1:9".into(),
        thumbprint: tentacle_proto::Thumbprint::of_der(b"hub"),
    }];
    let dialer = Arc::new(CountingDialer::default());
    let (builder, _) = in_memory(dir.path(), config);
    let agent = builder
        .executor(Arc::new(Arc::new(Recording::default())))
        .dialer(dialer.clone())
        .build()
        .expect("build");
    let stop = CancellationToken::new();
    let serving = tokio::spawn(agent.serve(None, stop.clone().cancelled_owned()));
    eventually("the tunnel is retried through the dialer", || {
        dialer.0.load(Ordering::Relaxed) >= 2
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the agent stops")
        .expect("join")
        .expect("serve");
}

#[tokio::test]
async fn the_builders_disk_and_sink_govern_file_and_package_uploads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(FakeFreeSpace::new(0));
    let (builder, _) = in_memory(dir.path(), config(dir.path()));
    let agent = builder
        .executor(Arc::new(Arc::new(Recording::default())))
        .upload_sink(UploadSink::Discard)
        .free_space(disk.clone())
        .build()
        .expect("build");
    let body = b"a virtual upload".to_vec();
    let sha256 = hex::encode(sha2::Sha256::digest(&body));
    let upload = |name: &str| {
        let header = UploadHeader {
            path: name.into(),
            size: body.len() as u64,
            sha256: sha256.clone(),
        };
        agent
            .files
            .upload(header, futures::stream::iter([Ok(body.clone())]))
    };
    let refused = upload("full.bin").await.expect_err("the fake disk is full");
    assert!(matches!(refused, FileError::DiskFull { .. }), "{refused}");
    let refused = agent
        .packages
        .upload(
            &sha256,
            body.len() as u64,
            futures::stream::iter([Ok(body.clone())]),
        )
        .await
        .expect_err("packages see the same disk");
    assert!(
        refused.to_string().contains("not enough disk space"),
        "{refused}"
    );

    disk.set(u64::MAX);
    let info = upload("kept.bin").await.expect("room on the fake disk");
    assert_eq!(info.sha256, sha256);
    assert!(
        !dir.path().join("files").join("kept.bin").exists(),
        "the discarding sink stored nothing"
    );
    let cached = agent
        .packages
        .upload(
            &sha256,
            body.len() as u64,
            futures::stream::iter([Ok(body.clone())]),
        )
        .await
        .expect("packages are stored even when file uploads are discarded");
    assert!(cached.present);
}
