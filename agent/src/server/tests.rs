//! The agent's routes over an in-memory pipe: the same handlers any
//! transport serves, with no sockets or TLS.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient;
use tentacle_proto::v1::script_service_client::ScriptServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_client::HealthClient;

use super::*;
use crate::files::{FileSettings, Files};
use crate::scripts::process::ProcessExecutor;
use crate::scripts::{ScriptSettings, Scripts};

async fn in_memory_agent(dir: &std::path::Path, stop: CancellationToken) -> Channel {
    let scripts = Scripts::new(
        ScriptSettings::new(dir.join("work")),
        Arc::new(ProcessExecutor::default()),
    );
    let files = Files::new(FileSettings::new(dir.join("files"))).expect("files");
    let settings = ServeSettings::default();
    let packages = crate::packages::Packages::new(crate::packages::PackageSettings::new(
        dir.join("packages"),
        dir.join("apps"),
    ))
    .expect("packages");
    let services = Services {
        scripts: ScriptApi::new(scripts),
        files: FileApi::new(files),
        packages: PackageApi::new(packages),
        capabilities: CapabilitiesApi::new(),
    };
    let (routes, _health) = routes(services, &settings).await.expect("routes");
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    // One connection, then a stream that stays open until shutdown.
    let incoming = tokio_stream::StreamExt::chain(
        tokio_stream::once(Ok::<_, std::io::Error>(server_io)),
        tokio_stream::pending(),
    );
    tokio::spawn(async move {
        serve(routes, incoming, stop.cancelled_owned(), &settings)
            .await
            .expect("serve");
    });
    let mut client_io = Some(client_io);
    Endpoint::from_static("http://in-memory")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = client_io.take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the in-memory pipe is already used"))
            }
        }))
        .await
        .expect("connect")
}

#[tokio::test]
async fn routes_serve_scripts_capabilities_and_health_over_any_io() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = CancellationToken::new();
    let channel = in_memory_agent(dir.path(), stop.clone()).await;

    let caps = CapabilitiesServiceClient::new(channel.clone())
        .get_capabilities(pb::GetCapabilitiesRequest {})
        .await
        .expect("capabilities")
        .into_inner();
    assert_eq!(caps.agent_version, crate::VERSION);

    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tentacle.v1.ScriptService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut scripts = ScriptServiceClient::new(channel);
    scripts
        .start_script(pb::StartScriptRequest {
            ticket: "mem".into(),
            script_body: "echo in-memory".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    let mut stream = scripts
        .watch_script(pb::WatchScriptRequest {
            ticket: "mem".into(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut text = Vec::new();
    let mut exit = None;
    while let Some(event) = stream.message().await.expect("event") {
        match event.event {
            Some(pb::watch_script_event::Event::Logs(batch)) => {
                text.extend(batch.lines.into_iter().map(|l| l.text))
            }
            Some(pb::watch_script_event::Event::Result(r)) => exit = Some(r.exit_code),
            _ => {}
        }
    }
    assert_eq!(text, ["in-memory"]);
    assert_eq!(exit, Some(0));
    stop.cancel();
}
