//! One trace per script execution, in a real telemetry backend (Arize
//! Phoenix): the control plane's call, the hub (in polling mode), the
//! agent's handler and the script form one trace with correct parent links,
//! and the script sees a TRACEPARENT naming its own span.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tentacle_tests::{AgentProcess, HubHome, free_port, http_get, stdout_of};

/// `phoenix serve` on free ports with its own working directory.
struct Phoenix {
    child: Child,
    http: u16,
    grpc: u16,
    _dir: tempfile::TempDir,
}

impl Phoenix {
    fn start() -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let venv = std::env::var_os("TENTACLE_PHOENIX_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".venv-phoenix"));
        let binary = venv.join("bin/phoenix");
        assert!(
            binary.is_file(),
            "{} is missing: run tests/python/setup-phoenix.sh (tests/run.sh does)",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (http, grpc) = (free_port(), free_port());
        let child = Command::new(binary)
            .arg("serve")
            .env("PHOENIX_WORKING_DIR", dir.path())
            .env("PHOENIX_HOST", "127.0.0.1")
            .env("PHOENIX_PORT", http.to_string())
            .env("PHOENIX_GRPC_PORT", grpc.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start phoenix");
        let phoenix = Self {
            child,
            http,
            grpc,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if phoenix.get("/healthz").is_some()
                && std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok()
            {
                return phoenix;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("phoenix did not start within 2 minutes");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// A GET against the query API; `None` until it answers 200.
    fn get(&self, path: &str) -> Option<String> {
        http_get(self.http, path)
    }

    /// Every span of `trace_id`, once at least `min` have arrived.
    fn spans_of(&self, trace_id: &str, min: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut spans = Vec::new();
        while Instant::now() < deadline {
            if let Some(body) = self.get("/v1/projects/default/spans?limit=1000")
                && let Ok(page) = serde_json::from_str::<Value>(&body)
            {
                spans = page["data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["context"]["trace_id"] == trace_id)
                    .cloned()
                    .collect();
                if spans.len() >= min {
                    return spans;
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "only {} spans of trace {trace_id} arrived: {spans:#?}",
            spans.len()
        );
    }
}

impl Drop for Phoenix {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TRACEPARENT the script printed: (trace id, span id).
fn printed_traceparent(stdout: &str) -> (String, String) {
    let value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TRACEPARENT="))
        .unwrap_or_else(|| panic!("the script printed no TRACEPARENT: {stdout}"));
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn by_id(spans: &[Value]) -> HashMap<String, &Value> {
    spans
        .iter()
        .map(|s| {
            (
                s["context"]["span_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                s,
            )
        })
        .collect()
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

/// Follows parent links from `span` to the root; returns the names.
fn ancestry(spans: &HashMap<String, &Value>, span: &Value) -> Vec<String> {
    let mut names = vec![span["name"].as_str().unwrap_or_default().to_owned()];
    let mut current = span;
    while let Some(parent) = current["parent_id"].as_str().and_then(|p| spans.get(p)) {
        names.push(parent["name"].as_str().unwrap_or_default().to_owned());
        current = parent;
    }
    names
}

#[test]
fn each_execution_is_one_trace_from_the_control_plane_into_the_script() {
    let phoenix = Phoenix::start();
    let otel = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), phoenix.endpoint())];

    let sim = HubHome(tempfile::tempdir().expect("tempdir"), otel.clone());
    stdout_of(&sim.run(&["new-certificate"]));
    let (mut hub, hub_address) = sim.serve();
    let hub_url = format!("https://{hub_address}");
    let hub_thumbprint = sim.thumbprint();

    // A polling agent, trusted by the hub.
    let mut poller = AgentProcess::prepare_polling(&hub_url, &hub_thumbprint);
    let poller_id = poller.agent_id();
    let poller_thumbprint = poller.thumbprint.to_string();
    sim.trust_polling(&poller);
    poller.env = otel.clone();
    poller.spawn();

    // A listening agent that trusts the control plane.
    let mut listener = AgentProcess::prepare(&[hub_thumbprint.parse().expect("thumbprint")], "");
    listener.env = otel.clone();
    listener.spawn();

    let script = "echo \"TRACEPARENT=$TRACEPARENT\"";
    let poll_target = format!("poll://{poller_id}");
    let listen_target = format!("https://{}", listener.address.expect("listening"));
    let listener_thumbprint = listener.thumbprint.to_string();
    for (mode, target, thumbprint) in [
        ("polling", poll_target.as_str(), poller_thumbprint.as_str()),
        (
            "listening",
            listen_target.as_str(),
            listener_thumbprint.as_str(),
        ),
    ] {
        let out = sim.run(&[
            "exec",
            "--target",
            target,
            "--thumbprint",
            thumbprint,
            "--hub",
            &hub_url,
            "--script",
            script,
        ]);
        let stdout = stdout_of(&out);
        let (trace_id, script_span_id) = printed_traceparent(&stdout);

        // exec, its calls (start, watch, complete), the agent's handlers and
        // the script; in polling mode the hub's handlers and calls as well.
        let expected = if mode == "polling" { 11 } else { 8 };
        let spans = phoenix.spans_of(&trace_id, expected);
        let index = by_id(&spans);
        let scripts = named(&spans, "script");
        assert_eq!(scripts.len(), 1, "{mode}: one script span in {spans:#?}");
        let script_span = scripts[0];
        assert_eq!(
            script_span["context"]["span_id"],
            script_span_id.as_str(),
            "{mode}: TRACEPARENT names the script span"
        );
        assert_eq!(script_span["attributes"]["exit_code"], 0, "{mode}");

        let chain = ancestry(&index, script_span);
        let expected_chain: Vec<String> = match mode {
            "polling" => vec![
                "script".into(),
                "agent tentacle.v1.ScriptService/StartScript".into(),
                "call tentacle.v1.ScriptService/StartScript".into(),
                "hub tentacle.v1.ScriptService/StartScript".into(),
                "call tentacle.v1.ScriptService/StartScript".into(),
                format!("exec {target}"),
            ],
            _ => vec![
                "script".into(),
                "agent tentacle.v1.ScriptService/StartScript".into(),
                "call tentacle.v1.ScriptService/StartScript".into(),
                format!("exec {target}"),
            ],
        };
        assert_eq!(
            chain, expected_chain,
            "{mode}: parent links from the script to the root"
        );
        // The whole execution is one trace: watching and completing too.
        for method in ["WatchScript", "CompleteScript"] {
            let agent_span = format!("agent tentacle.v1.ScriptService/{method}");
            assert_eq!(
                named(&spans, &agent_span).len(),
                1,
                "{mode}: {agent_span} in the trace"
            );
        }
    }
    let _ = hub.kill();
    let _ = hub.wait();
}
