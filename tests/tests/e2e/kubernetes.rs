//! The Kubernetes manifests (`deploy/kubernetes`): `kubectl kustomize`
//! renders the base, the example overlay and the cluster overlay (the hub
//! as three nodes on etcd), `kubernetes-validate --strict`
//! checks them offline against the schemas of Kubernetes 1.30 and 1.37,
//! and the rendered objects are read back (YAML to JSON with the venv's
//! PyYAML) to check what a schema cannot: every container hardened and
//! sized, the probes, the homes on claims, the hub's port, the Indexed Job's
//! shards, no secret inlined, the commands the images' entry points.
//!
//! One test also runs what the rendered pods would run: the hub, an agent
//! (twice, over the same home) and two simulator shards, with the pods'
//! commands, arguments and environment taken from the rendered YAML, their
//! volumes as directories and the Service as a loopback port, so a flag or
//! a variable that a program does not know fails here, not in a cluster.
//!
//! Needs `kubectl` (its built-in kustomize) and the venv that
//! `tests/python/setup-k8s-validate.sh` makes at `<workspace>/.venv-k8s`
//! (or `$TENTACLE_K8S_VENV`). Without them the tests fail when `CI=true`,
//! and otherwise print what they skipped and pass.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tentacle_tests::{bin, free_port};

/// The Kubernetes versions whose (strict) schemas the manifests must pass:
/// the oldest this layout supports (`backoffLimitPerIndex` is on by default
/// from 1.29) and the newest that kubernetes-validate 1.37.0 bundles.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The user every image runs as.
const USER: i64 = 10001;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_owned()
}

fn kubernetes_dir() -> PathBuf {
    workspace().join("deploy/kubernetes")
}

fn venv() -> PathBuf {
    std::env::var_os("TENTACLE_K8S_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv-k8s"))
}

/// Whether `kubectl` and the venv are there; panics under `CI=true` when
/// they are not.
fn have_tools(test: &str) -> bool {
    let mut missing = Vec::new();
    match Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    {
        Ok(output) if output.status.success() => {}
        Ok(output) => missing.push(format!(
            "`kubectl version --client` exited with {}",
            output.status
        )),
        Err(error) => missing.push(format!("kubectl: {error}")),
    }
    for tool in ["kubernetes-validate", "python"] {
        let path = venv().join("bin").join(tool);
        if !path.is_file() {
            missing.push(format!("{} is missing", path.display()));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the Kubernetes tools are missing while CI=true ({why}): install kubectl and run \
         tests/python/setup-k8s-validate.sh"
    );
    eprintln!(
        "SKIPPED kubernetes::{test}: {why}; install kubectl and run \
         tests/python/setup-k8s-validate.sh"
    );
    false
}

/// Output with stdout and stderr, for assertion messages.
fn both(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `kubectl kustomize deploy/kubernetes/<dir>`.
fn kustomize(dir: &str) -> String {
    let path = kubernetes_dir().join(dir);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed: {}",
        path.display(),
        both(&output)
    );
    String::from_utf8(output.stdout).expect("kustomize writes UTF-8")
}

/// `kubernetes-validate --strict` on `yaml` against every version.
fn validate(yaml: &str) -> Output {
    let mut file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    file.write_all(yaml.as_bytes()).expect("write manifests");
    let mut command = Command::new(venv().join("bin/kubernetes-validate"));
    command.args(["--strict", "--quiet"]);
    for version in KUBERNETES_VERSIONS {
        command.args(["-k", version]);
    }
    command
        .arg(file.path())
        .output()
        .expect("run kubernetes-validate")
}

/// Asserts that `yaml` passes, without a warning.
fn assert_valid(what: &str, yaml: &str) {
    let output = validate(yaml);
    let text = both(&output);
    assert!(output.status.success(), "{what} does not validate: {text}");
    assert!(
        !text.contains("WARN") && !text.contains("ERROR"),
        "{what}: kubernetes-validate says: {text}"
    );
}

/// The YAML documents as JSON, through the venv's PyYAML.
fn parse(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write YAML");
    let output = child.wait_with_output().expect("python");
    assert!(output.status.success(), "PyYAML: {}", both(&output));
    match serde_json::from_slice(&output.stdout).expect("JSON") {
        Value::Array(docs) => docs,
        other => panic!("not a list of documents: {other}"),
    }
}

/// A rendered directory: its text and its objects.
struct Rendered {
    name: &'static str,
    text: String,
    docs: Vec<Value>,
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rendered({}, {} objects)", self.name, self.docs.len())
    }
}

fn render(name: &'static str) -> Rendered {
    let text = kustomize(name);
    let docs = parse(&text);
    Rendered { name, text, docs }
}

/// The base and the overlays.
fn renders() -> Vec<Rendered> {
    vec![
        render("base"),
        render("overlays/example"),
        render("overlays/cluster"),
    ]
}

/// The overlay whose hub is three nodes sharing their state in etcd.
const CLUSTER: &str = "overlays/cluster";

/// How many hub replicas a rendered directory runs.
fn hub_replicas(rendered: &Rendered) -> u64 {
    if rendered.name == CLUSTER { 3 } else { 1 }
}

/// The pod that reads the simulator's reports (not in the kustomization).
fn tools_pod() -> (String, Vec<Value>) {
    let text = std::fs::read_to_string(kubernetes_dir().join("tools/sim-reports.yaml"))
        .expect("read tools/sim-reports.yaml");
    let docs = parse(&text);
    (text, docs)
}

fn kind_name(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The object of `kind` called `name`.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            panic!(
                "no {kind}/{name} in {:?}",
                docs.iter().map(kind_name).collect::<Vec<_>>()
            )
        })
}

/// The object of `kind` whose name is `name` plus kustomize's hash suffix.
fn generated<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let matches: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .and_then(|n| n.strip_prefix(name))
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|hash| hash.len() == 10)
        })
        .collect();
    assert_eq!(matches.len(), 1, "one generated {kind} {name}-<hash>");
    matches[0]
}

fn name_of(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().expect("a name")
}

/// The pod specs of the workloads: (object, pod spec, long-running).
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value, bool)> {
    docs.iter()
        .filter_map(|doc| {
            let spec = match doc["kind"].as_str()? {
                "StatefulSet" | "Deployment" | "DaemonSet" | "Job" => {
                    &doc["spec"]["template"]["spec"]
                }
                "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                "Pod" => &doc["spec"],
                _ => return None,
            };
            let serves = matches!(
                doc["kind"].as_str(),
                Some("StatefulSet" | "Deployment" | "DaemonSet")
            );
            Some((kind_name(doc), spec, serves))
        })
        .collect()
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A pod's containers and init containers: (container, is init).
fn containers(pod: &Value) -> Vec<(&Value, bool)> {
    list(&pod["initContainers"])
        .iter()
        .map(|c| (c, true))
        .chain(list(&pod["containers"]).iter().map(|c| (c, false)))
        .collect()
}

/// The one container named `name` of a pod spec.
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod)
        .into_iter()
        .map(|(c, _)| c)
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(value: &Value) -> Vec<String> {
    list(value)
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

/// A container's env entry by name.
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    list(&container["env"])
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{} has no env {name}", container["name"]))
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    env(container, name)["value"]
        .as_str()
        .unwrap_or_else(|| panic!("env {name} has no literal value"))
}

/// Where a container mounts the volume `volume`.
fn mount_path<'a>(container: &'a Value, volume: &str) -> &'a str {
    list(&container["volumeMounts"])
        .iter()
        .find(|m| m["name"] == volume)
        .and_then(|m| m["mountPath"].as_str())
        .unwrap_or_else(|| panic!("{} does not mount {volume}", container["name"]))
}

/// The instructions of the image's Dockerfile that the manifests repeat:
/// ENTRYPOINT, CMD (JSON arrays) and ENV (KEY=VALUE pairs).
#[derive(Debug)]
struct Image {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
}

fn image(reference: &str) -> Image {
    let name = reference.split(':').next().expect("an image name");
    let file = match name {
        "tentacle-agent" => "agent",
        "tentacle-hub" => "hub",
        "tentacle-sim" => "sim",
        other => panic!("unknown image {other}"),
    };
    let text =
        std::fs::read_to_string(workspace().join(format!("deploy/docker/{file}.Dockerfile")))
            .expect("read the Dockerfile");
    // Continuation lines joined, comments dropped.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instruction = |word: &str| -> Option<String> {
        joined
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(word))
            .map(|rest| rest.trim().to_owned())
    };
    let array = |word: &str| -> Vec<String> {
        let text = instruction(word).unwrap_or_else(|| panic!("{file}.Dockerfile has no {word}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{word} {text}: {e}"))
    };
    let env = instruction("ENV ")
        .map(|text| {
            text.split_whitespace()
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    Image {
        entrypoint: array("ENTRYPOINT "),
        cmd: array("CMD "),
        env,
    }
}

/// `securityContext.<field>` of the container, else of the pod.
fn effective<'a>(pod: &'a Value, container: &'a Value, field: &str) -> &'a Value {
    let own = &container["securityContext"][field];
    if own.is_null() {
        &pod["securityContext"][field]
    } else {
        own
    }
}

#[test]
fn base_and_example_overlay_render_and_validate() {
    if !have_tools("base_and_example_overlay_render_and_validate") {
        return;
    }
    for rendered in renders() {
        assert_valid(rendered.name, &rendered.text);
        let kinds: Vec<String> = rendered.docs.iter().map(kind_name).collect();
        for wanted in [
            "Service/tentacle-hub",
            "StatefulSet/tentacle-hub",
            "Service/tentacle-agent",
            "StatefulSet/tentacle-agent",
            "Job/tentacle-sim",
        ] {
            assert!(
                kinds.iter().any(|k| k == wanted),
                "{}: no {wanted} in {kinds:?}",
                rendered.name
            );
        }
    }
    let (text, _) = tools_pod();
    assert_valid("tools/sim-reports.yaml", &text);
}

/// A schema check that can fail: a broken manifest, and the rendered base
/// with one field misspelt, are refused.
#[test]
fn validation_refuses_broken_manifests() {
    if !have_tools("validation_refuses_broken_manifests") {
        return;
    }
    let broken = "apiVersion: apps/v1\n\
                  kind: Deployment\n\
                  metadata:\n  name: broken\n\
                  spec:\n  replicas: two\n  selector:\n    matchLabels: {app: broken}\n  \
                  template:\n    metadata:\n      labels: {app: broken}\n    spec:\n      \
                  containers:\n        - name: broken\n          image: broken\n";
    let output = validate(broken);
    assert!(
        !output.status.success(),
        "a string replica count passed: {}",
        both(&output)
    );
    assert!(both(&output).contains("spec.replicas"), "{}", both(&output));

    let base = kustomize("base");
    let field = "readOnlyRootFilesystem:";
    assert!(base.contains(field));
    let misspelt = base.replacen(field, "readOnlyRootFileSystem:", 1);
    let output = validate(&misspelt);
    assert!(
        !output.status.success(),
        "a misspelt field passed: {}",
        both(&output)
    );
    assert!(
        both(&output).contains("readOnlyRootFileSystem"),
        "the error names the field: {}",
        both(&output)
    );
}

/// Every container: non-root (10001), no privilege escalation, no
/// capabilities, a read-only root filesystem, requests and limits; the
/// long-running ones have startup, readiness and liveness probes; no pod
/// gets a service account token or the Services' variables.
#[test]
fn every_container_is_hardened_sized_and_probed() {
    if !have_tools("every_container_is_hardened_sized_and_probed") {
        return;
    }
    let mut sets: Vec<(String, Vec<Value>)> = renders()
        .into_iter()
        .map(|r| (r.name.to_owned(), r.docs))
        .collect();
    sets.push(("tools".to_owned(), tools_pod().1));
    for (set, docs) in &sets {
        let pods = pod_specs(docs);
        assert!(!pods.is_empty(), "{set}: no workloads");
        for (workload, pod, serves) in pods {
            let at = format!("{set}: {workload}");
            assert_eq!(pod["automountServiceAccountToken"], false, "{at}");
            assert_eq!(pod["enableServiceLinks"], false, "{at}");
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{at}"
            );
            for (c, init) in containers(pod) {
                let at = format!("{at} container {}", c["name"]);
                assert_eq!(
                    effective(pod, c, "runAsNonRoot"),
                    true,
                    "{at}: runAsNonRoot"
                );
                assert_eq!(
                    effective(pod, c, "runAsUser").as_i64(),
                    Some(USER),
                    "{at}: runAsUser"
                );
                assert_eq!(
                    effective(pod, c, "runAsGroup").as_i64(),
                    Some(USER),
                    "{at}: runAsGroup"
                );
                let security = &c["securityContext"];
                assert_eq!(security["allowPrivilegeEscalation"], false, "{at}");
                assert_eq!(
                    security["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{at}"
                );
                assert!(security["capabilities"]["add"].is_null(), "{at}");
                assert!(
                    security["privileged"].is_null() || security["privileged"] == false,
                    "{at}"
                );
                // Every container here can run on a read-only root.
                assert_eq!(security["readOnlyRootFilesystem"], true, "{at}");
                for bound in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        assert!(
                            c["resources"][bound][resource].is_string(),
                            "{at}: no {bound}.{resource}"
                        );
                    }
                }
                if serves && !init {
                    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                        let command = strings(&c[probe]["exec"]["command"]);
                        assert_eq!(
                            command.get(1).map(String::as_str),
                            Some("probe"),
                            "{at}: {probe}"
                        );
                        assert!(
                            c[probe]["timeoutSeconds"].as_i64() > Some(3),
                            "{at}: {probe} outlasts --timeout 3s"
                        );
                    }
                }
            }
        }
    }
}

/// The agents' StatefulSet keeps each home on a claim and names each agent
/// after its pod; the hub's keeps its home on a claim too.
#[test]
fn statefulsets_keep_their_homes_on_claims() {
    if !have_tools("statefulsets_keep_their_homes_on_claims") {
        return;
    }
    for rendered in renders() {
        for (set, container_name, home_variable) in [
            ("tentacle-agent", "agent", "TENTACLE_HOME"),
            ("tentacle-hub", "hub", "TENTACLE_HUB_HOME"),
        ] {
            let at = format!("{}: {set}", rendered.name);
            let sts = object(&rendered.docs, "StatefulSet", set);
            let claims = list(&sts["spec"]["volumeClaimTemplates"]);
            let home = claims
                .iter()
                .find(|c| c["metadata"]["name"] == "home")
                .unwrap_or_else(|| panic!("{at}: no volumeClaimTemplate `home`"));
            assert_eq!(
                home["spec"]["accessModes"],
                serde_json::json!(["ReadWriteOnce"]),
                "{at}"
            );
            assert!(
                home["spec"]["resources"]["requests"]["storage"].is_string(),
                "{at}"
            );
            let pod = &sts["spec"]["template"]["spec"];
            assert!(
                list(&pod["volumes"]).iter().all(|v| v["name"] != "home"),
                "{at}: a pod volume `home` would shadow the claim"
            );
            let c = container(pod, container_name);
            let mounted = mount_path(c, "home");
            assert_eq!(
                mounted,
                env_value(c, home_variable),
                "{at}: the home is the claim"
            );
            let image = image(c["image"].as_str().expect("image"));
            let image_home = image
                .env
                .iter()
                .find(|(k, _)| k == home_variable)
                .map(|(_, v)| v.as_str());
            assert_eq!(
                Some(mounted),
                image_home,
                "{at}: the image's {home_variable}"
            );
            assert_eq!(
                sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"]
                    .as_str()
                    .unwrap_or("Retain"),
                "Retain",
                "{at}"
            );
        }
        let agents = object(&rendered.docs, "StatefulSet", "tentacle-agent");
        let agent = container(&agents["spec"]["template"]["spec"], "agent");
        assert_eq!(env_value(agent, "TENTACLE_MODE"), "polling");
        assert_eq!(
            env_value(agent, "TENTACLE_SERVER"),
            "https://tentacle-hub:10943"
        );
        assert_eq!(
            env(agent, "TENTACLE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name",
            "the agent is named after its pod"
        );
        // Pod names (<statefulset>-<ordinal>) pass the agent's name rule.
        assert!(name_of(agents).len() + 6 <= 128);
        assert!(agents["spec"]["serviceName"] == "tentacle-agent");
        let hub = object(&rendered.docs, "StatefulSet", "tentacle-hub");
        assert_eq!(
            hub["spec"]["replicas"].as_u64(),
            Some(hub_replicas(&rendered)),
            "{}: one hub, its registry on one volume, unless the nodes share etcd",
            rendered.name
        );
    }
}

/// The hub's Service exposes 10943 and routes it to the hub's tunnel port.
#[test]
fn the_hub_service_exposes_10943() {
    if !have_tools("the_hub_service_exposes_10943") {
        return;
    }
    for rendered in renders() {
        let at = rendered.name;
        let service = object(&rendered.docs, "Service", "tentacle-hub");
        let ports = list(&service["spec"]["ports"]);
        assert_eq!(ports.len(), 1, "{at}");
        assert_eq!(ports[0]["port"], 10943, "{at}");
        assert_eq!(ports[0]["protocol"], "TCP", "{at}");
        let hub = object(&rendered.docs, "StatefulSet", "tentacle-hub");
        let template = &hub["spec"]["template"];
        for (key, value) in service["spec"]["selector"].as_object().expect("a selector") {
            assert_eq!(
                &template["metadata"]["labels"][key], value,
                "{at}: the selector picks the hub"
            );
        }
        let c = container(&template["spec"], "hub");
        let port = list(&c["ports"])
            .iter()
            .find(|p| p["name"] == ports[0]["targetPort"])
            .unwrap_or_else(|| panic!("{at}: no container port {}", ports[0]["targetPort"]));
        assert_eq!(port["containerPort"], 10943, "{at}");
        let args = strings(&c["args"]);
        let listen = args.iter().position(|a| a == "--listen").expect("--listen");
        assert_eq!(args[listen + 1], "0.0.0.0:10943", "{at}");
    }
}

/// `--shard job/N` after Kubernetes' `$(VAR)` expansion of the sim's args.
fn shard_argument(sim: &Value) -> String {
    let args = strings(&sim["args"]);
    let at = args.iter().position(|a| a == "--shard").expect("--shard");
    let mut shard = args[at + 1].clone();
    for entry in list(&sim["env"]) {
        if let (Some(name), Some(value)) = (entry["name"].as_str(), entry["value"].as_str()) {
            shard = shard.replace(&format!("$({name})"), value);
        }
    }
    shard
}

/// The simulator is an Indexed Job, created suspended, whose N shards
/// (`--shard job/N`) are its N completions, all at once.
#[test]
fn the_simulator_is_an_indexed_job_of_shards() {
    if !have_tools("the_simulator_is_an_indexed_job_of_shards") {
        return;
    }
    let renders = renders();
    let shards_of = [2_u64, 4, 2];
    assert_eq!(renders.len(), shards_of.len(), "a shard count per render");
    for (rendered, shards) in renders.into_iter().zip(shards_of) {
        let at = rendered.name;
        let job = object(&rendered.docs, "Job", "tentacle-sim");
        let spec = &job["spec"];
        assert_eq!(spec["completionMode"], "Indexed", "{at}");
        assert_eq!(
            spec["suspend"], true,
            "{at}: applying never starts a load test"
        );
        assert_eq!(spec["completions"].as_u64(), Some(shards), "{at}");
        assert_eq!(
            spec["parallelism"].as_u64(),
            Some(shards),
            "{at}: every shard at once"
        );
        assert_eq!(spec["backoffLimitPerIndex"], 0, "{at}");
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never", "{at}");
        let sim = container(pod, "sim");
        assert_eq!(shard_argument(sim), format!("job/{shards}"), "{at}");
        let args = strings(&sim["args"]);
        assert_eq!(args[0], "run", "{at}");
        let hub = args.iter().position(|a| a == "--hub").expect("--hub");
        assert_eq!(args[hub + 1], "https://tentacle-hub:10943", "{at}");
        // The scenario comes from the generated ConfigMap and loads.
        let scenario_path = &args[args
            .iter()
            .position(|a| a == "--scenario")
            .expect("--scenario")
            + 1];
        let (dir, file) = scenario_path.rsplit_once('/').expect("a path");
        assert_eq!(mount_path(sim, "scenario"), dir, "{at}");
        let volume = list(&pod["volumes"])
            .iter()
            .find(|v| v["name"] == "scenario")
            .expect("the scenario volume");
        let configmap = generated(&rendered.docs, "ConfigMap", "tentacle-sim-scenario");
        assert_eq!(
            volume["configMap"]["name"], configmap["metadata"]["name"],
            "{at}"
        );
        let text = configmap["data"][file]
            .as_str()
            .expect("the scenario's text");
        let scenario =
            tentacle_sim::scenario::Scenario::parse(file, text).expect("the scenario loads");
        assert_eq!(
            scenario.fleet.agents as u64 % shards,
            0,
            "{at}: shards of equal size"
        );
    }
}

/// No Secret is rendered, nothing secret is in a ConfigMap or a literal
/// value, and the workloads reference the two Secrets the README makes.
#[test]
fn secrets_are_referenced_not_inlined() {
    if !have_tools("secrets_are_referenced_not_inlined") {
        return;
    }
    for rendered in renders() {
        let at = rendered.name;
        assert!(
            rendered.docs.iter().all(|d| d["kind"] != "Secret"),
            "{at}: a Secret is rendered"
        );
        for needle in ["PRIVATE KEY", "BEGIN CERTIFICATE"] {
            assert!(
                !rendered.text.contains(needle),
                "{at}: {needle} in the manifests"
            );
        }
        let mut referenced = BTreeMap::<String, Vec<String>>::new();
        for (workload, pod, _) in pod_specs(&rendered.docs) {
            for volume in list(&pod["volumes"]) {
                if let Some(name) = volume["secret"]["secretName"].as_str() {
                    let keys = list(&volume["secret"]["items"])
                        .iter()
                        .filter_map(|i| i["key"].as_str().map(str::to_owned))
                        .collect::<Vec<_>>();
                    let keys = if keys.is_empty() {
                        vec!["tls.crt".to_owned(), "tls.key".to_owned()]
                    } else {
                        keys
                    };
                    referenced.entry(name.to_owned()).or_default().extend(keys);
                }
            }
            for (c, _) in containers(pod) {
                for entry in list(&c["env"]) {
                    let name = entry["name"].as_str().unwrap_or("?");
                    let secret = &entry["valueFrom"]["secretKeyRef"];
                    if let Some(secret_name) = secret["name"].as_str() {
                        referenced
                            .entry(secret_name.to_owned())
                            .or_default()
                            .push(secret["key"].as_str().expect("a key").to_owned());
                    }
                    // Credentials come from a Secret, never as a literal.
                    if name.contains("API_KEY") || name.contains("TOKEN") {
                        assert!(
                            entry["value"].is_null() && secret.is_object(),
                            "{at}: {workload} sets {name} other than from a Secret"
                        );
                    }
                }
            }
        }
        for keys in referenced.values_mut() {
            keys.sort();
            keys.dedup();
        }
        let mut wanted = BTreeMap::from([
            (
                "tentacle-hub-identity".to_owned(),
                vec!["tls.crt".to_owned(), "tls.key".to_owned()],
            ),
            (
                "tentacle-registration".to_owned(),
                vec!["api-key".to_owned()],
            ),
        ]);
        if at == CLUSTER {
            wanted.insert(
                "tentacle-hub-etcd".to_owned(),
                vec![
                    "ca.crt".to_owned(),
                    "tls.crt".to_owned(),
                    "tls.key".to_owned(),
                ],
            );
        }
        assert_eq!(referenced, wanted, "{at}");
        // The hub's key path points into the Secret's mount.
        let hub = object(&rendered.docs, "StatefulSet", "tentacle-hub");
        let c = container(&hub["spec"]["template"]["spec"], "hub");
        let identity = mount_path(c, "identity");
        for variable in ["TENTACLE_HUB_CERTIFICATE", "TENTACLE_HUB_KEY"] {
            assert!(
                env_value(c, variable).starts_with(&format!("{identity}/")),
                "{at}: {variable} is in the identity Secret"
            );
        }
    }
}

/// Each container runs its image's entry point (the agent's with tini as
/// PID 1), the agent and hub their images' default commands, and the
/// images' homes.
#[test]
fn containers_run_their_images_entry_points() {
    if !have_tools("containers_run_their_images_entry_points") {
        return;
    }
    for rendered in renders() {
        let at = rendered.name;
        for (kind, workload, name, same_cmd) in [
            ("StatefulSet", "tentacle-agent", "agent", true),
            ("StatefulSet", "tentacle-hub", "hub", true),
            ("Job", "tentacle-sim", "sim", false),
        ] {
            let doc = object(&rendered.docs, kind, workload);
            let c = container(&doc["spec"]["template"]["spec"], name);
            let image = image(c["image"].as_str().expect("image"));
            assert_eq!(strings(&c["command"]), image.entrypoint, "{at}: {workload}");
            let args = strings(&c["args"]);
            if at == CLUSTER && workload == "tentacle-hub" {
                // The image's command, then the cluster's flags.
                assert!(args.starts_with(&image.cmd), "{at}: {workload}: {args:?}");
                assert!(args.len() > image.cmd.len(), "{at}: {workload}: {args:?}");
            } else if same_cmd {
                assert_eq!(args, image.cmd, "{at}: {workload}");
            }
            for (key, value) in &image.env {
                if let Some(entry) = list(&c["env"]).iter().find(|e| &e["name"] == key) {
                    assert_eq!(
                        entry["value"].as_str(),
                        Some(value.as_str()),
                        "{at}: {workload} {key}"
                    );
                }
            }
        }
    }
}

/// What only the overlay sets: the namespace, the agents' count and roles,
/// the thumbprint's generated ConfigMap (referenced under its hashed name),
/// and the shards following the Job's completions.
#[test]
fn the_example_overlay_sets_what_a_user_changes() {
    if !have_tools("the_example_overlay_sets_what_a_user_changes") {
        return;
    }
    let rendered = render("overlays/example");
    for doc in &rendered.docs {
        assert_eq!(
            doc["metadata"]["namespace"],
            "tentacle",
            "{}",
            kind_name(doc)
        );
    }
    let agents = object(&rendered.docs, "StatefulSet", "tentacle-agent");
    assert_eq!(agents["spec"]["replicas"], 3);
    let agent = container(&agents["spec"]["template"]["spec"], "agent");
    assert_eq!(env_value(agent, "TENTACLE_ROLES"), "web,worker");
    assert_eq!(env_value(agent, "TENTACLE_ENVIRONMENTS"), "staging");
    // The patch replaced the value, and did not add a second entry.
    assert_eq!(
        list(&agent["env"])
            .iter()
            .filter(|e| e["name"] == "TENTACLE_ROLES")
            .count(),
        1
    );
    let thumbprint = generated(&rendered.docs, "ConfigMap", "tentacle-hub");
    let hashed = name_of(thumbprint);
    assert!(
        thumbprint["data"]["thumbprint"]
            .as_str()
            .is_some_and(|t| t.contains("REPLACE-ME"))
    );
    let sim = object(&rendered.docs, "Job", "tentacle-sim");
    for c in [agent, container(&sim["spec"]["template"]["spec"], "sim")] {
        let reference = list(&c["env"])
            .iter()
            .find_map(|e| e["valueFrom"]["configMapKeyRef"]["name"].as_str())
            .expect("a ConfigMap reference");
        assert_eq!(reference, hashed);
    }
    for doc in &rendered.docs {
        for c in pod_specs(std::slice::from_ref(doc))
            .into_iter()
            .flat_map(|(_, pod, _)| containers(pod))
            .map(|(c, _)| c)
        {
            let image = c["image"].as_str().expect("image");
            assert!(image.ends_with(":0.1.0"), "{image}");
        }
    }
}

/// The etcd endpoints the cluster overlay ships with (README.md there says
/// how to change them).
const CLUSTER_STORE: &str = "etcd://etcd-0.etcd:2379,etcd-1.etcd:2379,etcd-2.etcd:2379";

/// The value after `flag` in `args`, which must hold it exactly once.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == flag)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{flag} once in {args:?}");
    args.get(at[0] + 1)
        .unwrap_or_else(|| panic!("{flag} has no value in {args:?}"))
}

/// The cluster overlay: three hub replicas behind the Service agents and
/// operators use, a headless Service that gives each node the DNS name it
/// advertises, every replica's arguments (as Kubernetes expands them for
/// its pod) pointing at etcd with the client certificate from a Secret,
/// and all of them mounting the one identity Secret.
#[test]
fn the_cluster_overlay_runs_three_hub_nodes_on_etcd() {
    if !have_tools("the_cluster_overlay_runs_three_hub_nodes_on_etcd") {
        return;
    }
    let rendered = render(CLUSTER);
    let docs = &rendered.docs;
    for doc in docs {
        assert_eq!(
            doc["metadata"]["namespace"],
            "tentacle",
            "{}",
            kind_name(doc)
        );
    }
    let hub = object(docs, "StatefulSet", "tentacle-hub");
    let namespace = hub["metadata"]["namespace"].as_str().expect("namespace");
    let replicas = hub["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 3);
    assert_eq!(hub["spec"]["serviceName"], "tentacle-hub-nodes");
    let template = &hub["spec"]["template"];
    let pod = &template["spec"];
    let c = container(pod, "hub");
    let selects_the_hub = |selector: &Value, what: &str| {
        let selector = selector.as_object().expect("a selector");
        assert!(!selector.is_empty(), "{what}");
        for (key, value) in selector {
            assert_eq!(
                &template["metadata"]["labels"][key], value,
                "{what} picks the hub's pods"
            );
        }
    };

    // Node to node: headless, every pod in DNS from its start, on the
    // hub's port.
    let nodes = object(docs, "Service", "tentacle-hub-nodes");
    assert_eq!(nodes["spec"]["clusterIP"], "None");
    assert_eq!(nodes["spec"]["publishNotReadyAddresses"], true);
    selects_the_hub(&nodes["spec"]["selector"], "tentacle-hub-nodes");
    let ports = list(&nodes["spec"]["ports"]);
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["port"], 10943);
    let target = list(&c["ports"])
        .iter()
        .find(|p| p["name"] == ports[0]["targetPort"])
        .expect("the target port is the hub's");
    assert_eq!(target["containerPort"], 10943);

    // Agents and operators: the base's Service, load-balanced, not headless.
    let service = object(docs, "Service", "tentacle-hub");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert!(service["spec"]["clusterIP"].is_null());
    selects_the_hub(&service["spec"]["selector"], "tentacle-hub");
    let budget = object(docs, "PodDisruptionBudget", "tentacle-hub");
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    selects_the_hub(
        &budget["spec"]["selector"]["matchLabels"],
        "the PodDisruptionBudget",
    );

    // The pod's name and namespace from the downward API.
    for (variable, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            env(c, variable)["valueFrom"]["fieldRef"]["fieldPath"],
            field,
            "{variable}"
        );
    }

    // The etcd client files: a Secret, read-only, its keys under the
    // names the flags give.
    let etcd_dir = mount_path(c, "etcd-client");
    let etcd_volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == "etcd-client")
        .expect("the etcd-client volume");
    assert_eq!(etcd_volume["secret"]["secretName"], "tentacle-hub-etcd");
    let items: Vec<(&str, &str)> = list(&etcd_volume["secret"]["items"])
        .iter()
        .map(|i| {
            (
                i["key"].as_str().expect("key"),
                i["path"].as_str().expect("path"),
            )
        })
        .collect();
    assert_eq!(
        items,
        [
            ("ca.crt", "ca.crt"),
            ("tls.crt", "tls.crt"),
            ("tls.key", "tls.key")
        ]
    );

    // The one identity, from one Secret, in every replica's template.
    let identity = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == "identity")
        .expect("the identity volume");
    assert_eq!(identity["secret"]["secretName"], "tentacle-hub-identity");
    let identity_dir = mount_path(c, "identity");
    for (mount, volume) in [(etcd_dir, "etcd-client"), (identity_dir, "identity")] {
        let entry = list(&c["volumeMounts"])
            .iter()
            .find(|m| m["name"] == volume)
            .expect("mounted");
        assert_eq!(entry["readOnly"], true, "{volume} at {mount}");
    }
    for variable in ["TENTACLE_HUB_CERTIFICATE", "TENTACLE_HUB_KEY"] {
        assert!(
            env_value(c, variable).starts_with(&format!("{identity_dir}/")),
            "{variable} is in the identity Secret"
        );
    }

    // Every replica's arguments, as the kubelet expands them for its pod.
    let raw = strings(&c["args"]);
    for ordinal in 0..replicas {
        let pod_name = format!("{}-{ordinal}", name_of(hub));
        let args: Vec<String> = raw
            .iter()
            .map(|a| {
                a.replace("$(POD_NAME)", &pod_name)
                    .replace("$(POD_NAMESPACE)", namespace)
            })
            .collect();
        let at = format!("{pod_name}: {args:?}");
        assert!(args.iter().all(|a| !a.contains("$(")), "{at}");
        assert_eq!(args[0], "server", "{at}");
        let store = flag_value(&args, "--store");
        assert!(store.starts_with("etcd://"), "{at}");
        assert_eq!(store, CLUSTER_STORE, "{at}");
        assert_eq!(flag_value(&args, "--node-id"), pod_name, "{at}");
        assert_eq!(
            flag_value(&args, "--advertise"),
            format!("https://{pod_name}.tentacle-hub-nodes.{namespace}.svc:10943"),
            "{at}"
        );
        for (flag, key) in [
            ("--etcd-ca", "ca.crt"),
            ("--etcd-cert", "tls.crt"),
            ("--etcd-key", "tls.key"),
        ] {
            assert_eq!(flag_value(&args, flag), format!("{etcd_dir}/{key}"), "{at}");
        }
    }

    // Nothing secret inlined: no Secret object, no PEM, no key material in
    // a literal value.
    assert!(docs.iter().all(|d| d["kind"] != "Secret"));
    for needle in ["PRIVATE KEY", "BEGIN CERTIFICATE"] {
        assert!(!rendered.text.contains(needle), "{needle} in the manifests");
    }
    for entry in list(&c["env"]) {
        let value = entry["value"].as_str().unwrap_or_default();
        assert!(!value.contains("-----"), "{} inlines a PEM", entry["name"]);
    }
}

/// kustomize reads only its own directory, so the base carries a copy of
/// simulator/scenarios/smoke.toml: it must equal the original except for
/// what it marks "Kubernetes:" (its name and description, every agent
/// polling, no in-process hub restart).
#[test]
fn the_kubernetes_scenario_follows_the_shipped_smoke_scenario() {
    let read = |path: &str| -> toml::Table {
        let text = std::fs::read_to_string(workspace().join(path)).expect("read scenario");
        tentacle_sim::scenario::Scenario::parse(path, &text).expect("the scenario loads");
        text.parse().expect("TOML")
    };
    let mut original = read("simulator/scenarios/smoke.toml");
    let mut copy = read("deploy/kubernetes/base/scenarios/smoke.toml");
    assert_eq!(copy["fleet"]["listening_fraction"].as_float(), Some(0.0));
    assert_eq!(
        copy["chaos"]["weights"]["hub_restart"].as_integer(),
        Some(0)
    );
    assert_ne!(copy["name"], original["name"]);
    for table in [&mut original, &mut copy] {
        table.remove("name");
        table.remove("description");
        let fleet = table["fleet"].as_table_mut().expect("[fleet]");
        fleet.remove("listening_fraction");
        let weights = table["chaos"]["weights"]
            .as_table_mut()
            .expect("[chaos.weights]");
        weights.remove("hub_restart");
    }
    assert_eq!(
        copy, original,
        "the copy drifted from simulator/scenarios/smoke.toml"
    );
}

// --- running the rendered pods ------------------------------------------------

/// A small polling-only scenario that stands in for smoke.toml when the
/// rendered Job's shards run here.
const TINY_POLLING: &str = r#"
name = "kubernetes-tiny"
time_limit = "2m"
[fleet]
agents = 4
listening_fraction = 0.0
[fleet.scripts]
min_duration = "50ms"
max_duration = "200ms"
min_lines = 2
max_lines = 4
[[stage]]
kind = "health"
concurrency = 4
[[stage]]
kind = "scripts"
waves = 1
concurrency = 4
"#;

/// What the cluster would hold besides the rendered objects: the Secrets
/// and ConfigMaps by name, and the claims' directories.
#[derive(Debug)]
struct Cluster {
    root: PathBuf,
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    configmaps: BTreeMap<String, BTreeMap<String, String>>,
    /// `from` → `to`: the Service's name and port as a loopback address.
    network: Vec<(String, String)>,
}

/// One container of a rendered pod, as a local process's command line.
#[derive(Debug)]
struct Local {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The probes' commands, remapped the same way.
    probes: Vec<Vec<String>>,
}

impl Cluster {
    /// Directories for the pod's volumes (claims under the pod's name, so
    /// a pod started again finds its home) and the remapping of its
    /// mount paths onto them.
    fn volumes(&self, pod_name: &str, pod: &Value, claims: &[Value]) -> BTreeMap<String, PathBuf> {
        let mut dirs = BTreeMap::new();
        for claim in claims {
            let name = claim["metadata"]["name"].as_str().expect("claim name");
            let dir = self.root.join("claims").join(format!("{name}-{pod_name}"));
            std::fs::create_dir_all(&dir).expect("claim dir");
            dirs.insert(name.to_owned(), dir);
        }
        for volume in list(&pod["volumes"]) {
            let name = volume["name"].as_str().expect("volume name");
            let dir = self.root.join("pods").join(pod_name).join(name);
            if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
                let dir = self.root.join("claims").join(claim);
                std::fs::create_dir_all(&dir).expect("claim dir");
                dirs.insert(name.to_owned(), dir);
                continue;
            }
            std::fs::create_dir_all(&dir).expect("volume dir");
            let (source, data, mode) = if let Some(secret) = volume["secret"]["secretName"].as_str()
            {
                (
                    &volume["secret"],
                    &self.secrets[secret],
                    volume["secret"]["defaultMode"].as_u64(),
                )
            } else if let Some(configmap) = volume["configMap"]["name"].as_str() {
                (&volume["configMap"], &self.configmaps[configmap], None)
            } else {
                assert!(volume["emptyDir"].is_object(), "unknown volume {volume}");
                dirs.insert(name.to_owned(), dir);
                continue;
            };
            let items: Vec<(String, String)> = if list(&source["items"]).is_empty() {
                data.keys().map(|k| (k.clone(), k.clone())).collect()
            } else {
                list(&source["items"])
                    .iter()
                    .map(|i| {
                        (
                            i["key"].as_str().expect("key").to_owned(),
                            i["path"].as_str().expect("path").to_owned(),
                        )
                    })
                    .collect()
            };
            for (key, path) in items {
                let file = dir.join(path);
                // Written again for each container of the pod; read-only
                // (defaultMode) after the first time.
                let _ = std::fs::remove_file(&file);
                std::fs::write(&file, &data[&key]).expect("write a volume file");
                if let Some(mode) = mode {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = u32::try_from(mode).expect("a file mode");
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                        .expect("chmod");
                }
            }
            dirs.insert(name.to_owned(), dir);
        }
        dirs
    }

    /// The container `name` of `pod` as a local command: its image's ENV,
    /// then its env (literals, Secret and ConfigMap keys, the downward
    /// API), its `$(VAR)`s expanded, paths under its mounts moved onto the
    /// volumes' directories, the Service and the metrics address onto
    /// loopback ports.
    fn local(
        &self,
        pod_name: &str,
        completion_index: Option<usize>,
        pod: &Value,
        claims: &[Value],
        name: &str,
    ) -> Local {
        let c = container(pod, name);
        let volumes = self.volumes(pod_name, pod, claims);
        let mut mounts: Vec<(String, PathBuf)> = list(&c["volumeMounts"])
            .iter()
            .map(|m| {
                let volume = m["name"].as_str().expect("mount name");
                (
                    m["mountPath"].as_str().expect("mount path").to_owned(),
                    volumes
                        .get(volume)
                        .unwrap_or_else(|| panic!("{name} mounts the unknown volume {volume}"))
                        .clone(),
                )
            })
            .collect();
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let mut network = self.network.clone();
        network.push((
            "127.0.0.1:9100".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ));
        let remap = |value: &str| -> String {
            let mut value = value.to_owned();
            for (from, to) in &network {
                value = value.replace(from, to);
            }
            for (path, dir) in &mounts {
                if value == *path {
                    return dir.display().to_string();
                }
                if let Some(rest) = value.strip_prefix(&format!("{path}/")) {
                    return dir.join(rest).display().to_string();
                }
            }
            value
        };

        let image = image(c["image"].as_str().expect("image"));
        let mut env: Vec<(String, String)> = image.env.clone();
        let set = |env: &mut Vec<(String, String)>, key: &str, value: String| {
            env.retain(|(k, _)| k != key);
            env.push((key.to_owned(), value));
        };
        if let Some(index) = completion_index {
            set(&mut env, "JOB_COMPLETION_INDEX", index.to_string());
        }
        for entry in list(&c["env"]) {
            let key = entry["name"].as_str().expect("env name");
            let from = &entry["valueFrom"];
            let value = if let Some(value) = entry["value"].as_str() {
                value.to_owned()
            } else if let Some(name) = from["secretKeyRef"]["name"].as_str() {
                self.secrets[name][from["secretKeyRef"]["key"].as_str().expect("key")].clone()
            } else if let Some(name) = from["configMapKeyRef"]["name"].as_str() {
                self.configmaps[name][from["configMapKeyRef"]["key"].as_str().expect("key")].clone()
            } else {
                match from["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.name") => pod_name.to_owned(),
                    Some("metadata.annotations['batch.kubernetes.io/job-completion-index']") => {
                        completion_index.expect("a Job's pod").to_string()
                    }
                    other => panic!("{name}: env {key} from {other:?} is not simulated here"),
                }
            };
            set(&mut env, key, value);
        }
        let expand = |text: &str| -> String {
            let mut text = text.to_owned();
            for (key, value) in &env {
                text = text.replace(&format!("$({key})"), value);
            }
            text
        };
        let mut command: Vec<String> = strings(&c["command"]).iter().map(|s| expand(s)).collect();
        let args: Vec<String> = strings(&c["args"]).iter().map(|s| expand(s)).collect();
        // tini is the image's PID 1; here the program runs directly.
        if command.first().map(String::as_str) == Some("/usr/bin/tini") {
            let end = command.iter().position(|a| a == "--").expect("tini ... --");
            command.drain(..=end);
        }
        let program = |path: &str| -> PathBuf {
            match path.strip_prefix("/usr/local/bin/") {
                Some(binary) => bin(binary),
                None => PathBuf::from(path),
            }
        };
        let mut all: Vec<String> = command.into_iter().chain(args).collect();
        let first = all.remove(0);
        let probes = ["startupProbe", "readinessProbe", "livenessProbe"]
            .iter()
            .filter_map(|p| c[*p]["exec"]["command"].as_array())
            .map(|command| {
                command
                    .iter()
                    .enumerate()
                    .map(|(i, part)| {
                        let part = part.as_str().expect("a string");
                        if i == 0 {
                            program(part).display().to_string()
                        } else {
                            remap(&expand(part))
                        }
                    })
                    .collect()
            })
            .collect();
        Local {
            program: program(&first),
            args: all.iter().map(|a| remap(a)).collect(),
            env: env.iter().map(|(k, v)| (k.clone(), remap(v))).collect(),
            probes,
        }
    }
}

impl Local {
    fn command(&self, program: &Path, args: &[String]) -> Command {
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Starts it, its stderr (the logs) in `log`.
    fn spawn(&self, log: &Path) -> Running {
        let file = std::fs::File::create(log).expect("log file");
        let child = self
            .command(&self.program, &self.args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program.display()));
        Running {
            child,
            log: log.to_owned(),
        }
    }

    /// Runs every probe until all pass at once, or panics after `timeout`.
    fn wait_until_probes_pass(&self, running: &mut Running, timeout: Duration) {
        assert!(!self.probes.is_empty(), "no probes");
        let deadline = Instant::now() + timeout;
        loop {
            let outputs: Vec<Output> = self
                .probes
                .iter()
                .map(|probe| {
                    self.command(Path::new(&probe[0]), &probe[1..])
                        .output()
                        .expect("run a probe")
                })
                .collect();
            if outputs.iter().all(|o| o.status.success()) {
                return;
            }
            if let Ok(Some(status)) = running.child.try_wait() {
                panic!(
                    "{} exited with {status}: {}",
                    self.program.display(),
                    running.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the probes of {} still fail: {}; log: {}",
                self.program.display(),
                outputs.iter().map(both).collect::<Vec<_>>().join(" / "),
                running.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A started container; killed when dropped.
#[derive(Debug)]
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet sends it, and the exit status.
    fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = i32::try_from(self.child.id()).expect("a pid");
        kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
        self.wait(timeout)
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {timeout:?}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of `tentacle-hub server trust list` (thumbprint, mode, name,
/// address, roles, environments) for the agent `name`.
fn entries_named<'a>(listed: &'a str, name: &str) -> Vec<&'a str> {
    listed
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some(name))
        .collect()
}

/// The hub, an agent and the simulator's shards, run from the rendered
/// base with the real binaries: the flags and variables the manifests give
/// them are the ones they take, the probes pass, the agent registers once
/// under its pod's name and keeps its certificate over a restart, and each
/// shard of the Indexed Job plays its slice against the hub.
#[test]
fn rendered_pods_run_with_the_real_binaries() {
    if !have_tools("rendered_pods_run_with_the_real_binaries") {
        return;
    }
    let rendered = render("base");
    let docs = &rendered.docs;
    let dir = tempfile::tempdir().expect("tempdir");

    // The hub's identity and the API key, made as the README makes them.
    let made = dir.path().join("hub-identity");
    let output = Command::new(bin("tentacle-hub"))
        .arg("new-certificate")
        .arg("--home")
        .arg(&made)
        .env_remove("TENTACLE_HUB_CERTIFICATE")
        .env_remove("TENTACLE_HUB_KEY")
        .output()
        .expect("new-certificate");
    assert!(output.status.success(), "{}", both(&output));
    let output = Command::new(bin("tentacle-hub"))
        .arg("show-thumbprint")
        .arg("--home")
        .arg(&made)
        .env_remove("TENTACLE_HUB_CERTIFICATE")
        .env_remove("TENTACLE_HUB_KEY")
        .output()
        .expect("show-thumbprint");
    assert!(output.status.success(), "{}", both(&output));
    let thumbprint = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let read = |file: &str| std::fs::read_to_string(made.join(file)).expect("read the identity");
    let api_key = uuid::Uuid::new_v4().simple().to_string();

    let hub_port = free_port();
    let scenario = generated(docs, "ConfigMap", "tentacle-sim-scenario");
    let mut scenario_data: BTreeMap<String, String> =
        serde_json::from_value(scenario["data"].clone()).expect("ConfigMap data");
    for text in scenario_data.values_mut() {
        TINY_POLLING.clone_into(text);
    }
    let cluster = Cluster {
        root: dir.path().join("cluster"),
        secrets: BTreeMap::from([
            (
                "tentacle-hub-identity".to_owned(),
                BTreeMap::from([
                    ("tls.crt".to_owned(), read("tentacle-hub.crt.pem")),
                    ("tls.key".to_owned(), read("tentacle-hub.key.pem")),
                ]),
            ),
            (
                "tentacle-registration".to_owned(),
                BTreeMap::from([("api-key".to_owned(), api_key.clone())]),
            ),
        ]),
        configmaps: BTreeMap::from([
            (
                "tentacle-hub".to_owned(),
                BTreeMap::from([("thumbprint".to_owned(), format!("{thumbprint}\n"))]),
            ),
            (name_of(scenario).to_owned(), scenario_data),
        ]),
        network: vec![
            (
                "tentacle-hub:10943".to_owned(),
                format!("127.0.0.1:{hub_port}"),
            ),
            (
                "tentacle-hub/10943".to_owned(),
                format!("127.0.0.1/{hub_port}"),
            ),
            ("0.0.0.0:10943".to_owned(), format!("127.0.0.1:{hub_port}")),
        ],
    };
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs");

    // The hub.
    let hub_set = object(docs, "StatefulSet", "tentacle-hub");
    let hub_claims = list(&hub_set["spec"]["volumeClaimTemplates"]);
    let hub = cluster.local(
        "tentacle-hub-0",
        None,
        &hub_set["spec"]["template"]["spec"],
        hub_claims,
        "hub",
    );
    let mut hub_process = hub.spawn(&logs.join("hub.log"));
    hub.wait_until_probes_pass(&mut hub_process, Duration::from_secs(60));
    assert!(
        hub_process.log_text().contains("stored the API key"),
        "the hub stores the Secret's API key: {}",
        hub_process.log_text()
    );
    let hub_env = |name: &str| -> String {
        hub.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("the hub has no {name}"))
    };
    let hub_home = PathBuf::from(hub_env("TENTACLE_HUB_HOME"));
    assert!(
        !hub_home.join("tentacle-hub.key.pem").exists(),
        "the key stays in the Secret"
    );
    let trusted = || -> String {
        let output = Command::new(bin("tentacle-hub"))
            .arg("--home")
            .arg(&hub_home)
            .args(["server", "trust", "list"])
            .env_remove("TENTACLE_HUB_CERTIFICATE")
            .env_remove("TENTACLE_HUB_KEY")
            .output()
            .expect("trust list");
        assert!(output.status.success(), "{}", both(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };

    // An agent, started twice over the same home.
    let agent_set = object(docs, "StatefulSet", "tentacle-agent");
    let agent_claims = list(&agent_set["spec"]["volumeClaimTemplates"]);
    let agent_pod = &agent_set["spec"]["template"]["spec"];
    let agent = cluster.local("tentacle-agent-0", None, agent_pod, agent_claims, "agent");
    let mut agent_process = agent.spawn(&logs.join("agent-1.log"));
    agent.wait_until_probes_pass(&mut agent_process, Duration::from_secs(60));
    let first = agent_process.log_text();
    assert!(
        first.contains("registered"),
        "the first start registers: {first}"
    );
    let listed = trusted();
    let entries = entries_named(&listed, "tentacle-agent-0");
    assert_eq!(entries.len(), 1, "{listed}");
    assert!(
        entries[0].contains("polling") && entries[0].contains("roles=web"),
        "{listed}"
    );
    let agent_thumbprint = entries[0]
        .split_whitespace()
        .next()
        .expect("thumbprint")
        .to_owned();
    let status = agent_process.terminate(Duration::from_secs(40));
    assert!(
        status.success(),
        "SIGTERM stops the agent cleanly: {status}"
    );

    let mut agent_process = agent.spawn(&logs.join("agent-2.log"));
    agent.wait_until_probes_pass(&mut agent_process, Duration::from_secs(60));
    let second = agent_process.log_text();
    assert!(
        !second.lines().any(|l| l.contains(" registered")),
        "a restart does not register again: {second}"
    );
    let listed = trusted();
    let entries = entries_named(&listed, "tentacle-agent-0");
    assert_eq!(entries.len(), 1, "{listed}");
    assert!(
        entries[0].starts_with(&agent_thumbprint),
        "the same certificate: {listed}"
    );

    // The simulator's shards, as the Indexed Job runs them: the init
    // container first, then every index at once.
    let job = object(docs, "Job", "tentacle-sim");
    let shards = usize::try_from(job["spec"]["completions"].as_u64().expect("completions"))
        .expect("a count");
    let job_pod = &job["spec"]["template"]["spec"];
    let mut running = Vec::new();
    for index in 0..shards {
        let pod_name = format!("tentacle-sim-{index}");
        let wait = cluster.local(&pod_name, Some(index), job_pod, &[], "wait-for-hub");
        let output = wait
            .command(&wait.program, &wait.args)
            .output()
            .expect("run wait-for-hub");
        assert!(output.status.success(), "wait-for-hub: {}", both(&output));
        assert!(
            both(&output).contains("accepts connections"),
            "{}",
            both(&output)
        );
        let sim = cluster.local(&pod_name, Some(index), job_pod, &[], "sim");
        let out = sim.args[sim.args.iter().position(|a| a == "--out").expect("--out") + 1].clone();
        running.push((
            sim.spawn(&logs.join(format!("{pod_name}.log"))),
            PathBuf::from(out),
        ));
    }
    for (index, (process, out)) in running.iter_mut().enumerate() {
        let status = process.wait(Duration::from_secs(150));
        assert!(
            status.success(),
            "shard {index} failed ({status}): {}",
            process.log_text()
        );
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("report.json")).expect("the shard's report.json"),
        )
        .expect("JSON");
        assert_eq!(
            report["shards"][0]["shard"],
            format!("{}/{shards}", index + 1),
            "index {index} plays shard {}/{shards}",
            index + 1
        );
        assert!(out.join("report.html").is_file());
    }
    let listed = trusted();
    for i in 0..4 {
        let name = format!("virtual-{i}");
        assert_eq!(
            entries_named(&listed, &name).len(),
            1,
            "{name} registered: {listed}"
        );
    }
    drop(agent_process);
    let status = hub_process.terminate(Duration::from_secs(45));
    assert!(status.success(), "SIGTERM stops the hub cleanly: {status}");
}
