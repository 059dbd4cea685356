//! A real etcd cluster for end-to-end tests of the hub that spans several
//! nodes: [`EtcdCluster`] starts N `etcd` processes on loopback, each with
//! its own data directory and log file in one temporary directory, waits
//! until every member is healthy, and can kill, stop and restart members to
//! take quorum away and give it back. [`EtcdCluster::start_tls`] serves
//! clients over https and asks them for a certificate signed by a CA it
//! makes.
//!
//! The harness checks the cluster with `etcdctl` (API v3), independently of
//! the hub's own etcd client, so a test can tell a broken cluster from a
//! broken hub.
//!
//! Needs Debian's `etcd-server` and `etcd-client` (tests/run.sh installs
//! them). [`etcd_or_skip`] is the suite's skip rule: without them a test
//! says it is skipped and passes, except under `CI=true`, where it fails.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's packages put the programs.
const ETCD: &str = "/usr/bin/etcd";
const ETCDCTL: &str = "/usr/bin/etcdctl";

/// Raft timing for a CPU-starved machine. etcd's defaults (100 ms heartbeat,
/// 1 s election timeout) assume a member gets CPU within a few tens of
/// milliseconds; on a 2-core box running a parallel test suite a member can
/// be descheduled for longer than that, its followers miss heartbeats and
/// call elections, and the cluster flaps between leaders in the middle of a
/// test. Ten missed heartbeats of 200 ms before an election keep the usual
/// 1:10 ratio with twice the slack; a lost leader is still replaced within a
/// few seconds.
const HEARTBEAT_MS: &str = "200";
const ELECTION_TIMEOUT_MS: &str = "2000";

/// How long [`EtcdCluster::start`] waits for every member to be healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long SIGTERM may take before [`EtcdCluster::stop`] sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// etcdctl's own bounds: a request without quorum fails after
/// `--command-timeout` instead of waiting for one.
const DIAL_TIMEOUT: &str = "2s";
const COMMAND_TIMEOUT: &str = "5s";
/// etcdctl is killed if it outlives its own timeouts by this much.
const ETCDCTL_GRACE: Duration = Duration::from_secs(15);

/// Starts are retried with new ports when a port picked as free was taken
/// by another test before etcd bound it.
const START_ATTEMPTS: usize = 3;

/// What went wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("etcdctl {args} failed ({status}): {output}")]
    Etcdctl {
        args: String,
        status: String,
        output: String,
    },
    #[error("etcdctl {args} did not finish within {waited:?}; killed")]
    EtcdctlHung { args: String, waited: Duration },
    #[error("members {members:?} not all healthy after {waited:?}: {last}")]
    NotHealthy {
        members: Vec<usize>,
        waited: Duration,
        last: String,
    },
}

/// The PEM files of a TLS cluster: the CA that signed the server's and the
/// client's certificates, and the client's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The server's certificate and key (not for clients).
#[derive(Debug, Clone)]
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
}

/// Which credentials an etcdctl call presents to a TLS cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// The client certificate and key of [`EtcdCluster::tls_files`].
    ClientCertificate,
    /// Only the CA (the server is verified, the client is anonymous).
    None,
}

#[derive(Debug)]
struct Member {
    name: String,
    dir: PathBuf,
    peer_port: u16,
    client_port: u16,
    child: Option<Child>,
}

impl Member {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// N `etcd` processes forming one cluster on 127.0.0.1; all are killed
/// when it is dropped. Members are numbered from 0.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
    tls: Option<(EtcdTlsFiles, ServerTls)>,
    // Last: removed after the processes are killed.
    dir: tempfile::TempDir,
}

/// Whether `etcd` and `etcdctl` can run here.
pub fn etcd_available() -> bool {
    missing_tools().is_none()
}

/// Why `etcd` or `etcdctl` cannot run, if one cannot.
fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    for (program, args) in [(ETCD, ["--version"]), (ETCDCTL, ["version"])] {
        match Command::new(program)
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => missing.push(format!(
                "`{program} {}` exited with {}",
                args[0], output.status
            )),
            Err(error) => missing.push(format!("{program}: {error}")),
        }
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

/// The suite's skip rule: true when etcd can run; otherwise prints that
/// `test` is skipped and returns false, or panics under `CI=true`, where
/// tests/run.sh has installed it.
pub fn etcd_or_skip(test: &str) -> bool {
    let Some(why) = missing_tools() else {
        return true;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "etcd is missing while CI=true ({why}): install Debian's etcd-server and etcd-client \
         (tests/run.sh does)"
    );
    eprintln!(
        "SKIPPED {test}: etcd is missing ({why}); `apt-get install etcd-server etcd-client` \
         runs it"
    );
    false
}

/// `count` distinct loopback ports that were free a moment ago: all are
/// bound at once, so no two are the same.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

impl EtcdCluster {
    /// Starts `members` members over plain http and waits until all are
    /// healthy; panics with their logs if they are not within 30 s.
    pub fn start(members: usize) -> Self {
        Self::start_with(members, false)
    }

    /// Like [`Self::start`], but clients speak https and must present a
    /// certificate signed by the cluster's CA (`--client-cert-auth`); see
    /// [`Self::tls_files`]. Peers stay on plain http over loopback.
    pub fn start_tls(members: usize) -> Self {
        Self::start_with(members, true)
    }

    fn start_with(count: usize, tls: bool) -> Self {
        assert!(count > 0, "a cluster has at least one member");
        let mut last_logs = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let mut cluster = Self::prepare(count, tls);
            for member in 0..count {
                cluster.spawn(member);
            }
            let all: Vec<usize> = (0..count).collect();
            match cluster.wait_healthy(&all, START_TIMEOUT) {
                Ok(()) => return cluster,
                Err(error) => {
                    last_logs = format!("{error}\n{}", cluster.all_logs());
                    // Another test took a port between picking and binding:
                    // try again with new ports. Anything else is a failure.
                    if !last_logs.contains("address already in use") {
                        break;
                    }
                    eprintln!("etcd start attempt {attempt}: a port was taken; retrying");
                }
            }
        }
        panic!("the etcd cluster did not start:\n{last_logs}");
    }

    /// The directories, ports, token and (for TLS) certificates of a new
    /// cluster, nothing started.
    fn prepare(count: usize, tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("etcd-cluster-")
            .tempdir()
            .expect("tempdir");
        let ports = free_ports(2 * count);
        let members = (0..count)
            .map(|i| {
                let member_dir = dir.path().join(format!("member-{i}"));
                std::fs::create_dir_all(&member_dir).expect("member dir");
                Member {
                    name: format!("member-{i}"),
                    dir: member_dir,
                    peer_port: ports[2 * i],
                    client_port: ports[2 * i + 1],
                    child: None,
                }
            })
            .collect();
        let tls = tls.then(|| write_certificates(&dir.path().join("tls")));
        Self {
            members,
            // A unique token: members of another test's cluster, should
            // they ever reach these ports, are refused.
            token: format!("tentacle-tests-{}", uuid::Uuid::new_v4().simple()),
            tls,
            dir,
        }
    }

    fn client_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn client_url(&self, member: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.client_scheme(),
            self.members[member].client_port
        )
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `member`'s process, its output appended to its log.
    /// Over an existing data directory etcd ignores the `--initial-*` flags
    /// and rejoins with the membership it stored.
    fn spawn(&mut self, member: usize) {
        let initial_cluster = self.initial_cluster();
        let client_url = self.client_url(member);
        let m = &self.members[member];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.log_path())
            .expect("open the member's log");
        let mut command = Command::new(ETCD);
        command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(m.data_dir())
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", HEARTBEAT_MS])
            .args(["--election-timeout", ELECTION_TIMEOUT_MS])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some((files, server)) = &self.tls {
            // etcd 3.4 already asks clients for a certificate once
            // --trusted-ca-file is set; --client-cert-auth says so outright.
            command
                .arg("--cert-file")
                .arg(&server.cert)
                .arg("--key-file")
                .arg(&server.key)
                .arg("--trusted-ca-file")
                .arg(&files.ca)
                .arg("--client-cert-auth");
        }
        let child = without_etcd_environment(&mut command)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {ETCD}: {e}"));
        self.members[member].child = Some(child);
    }

    /// The number of members the cluster was started with.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client address, `127.0.0.1:PORT`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The hub's `--store` value for this cluster:
    /// `etcd://127.0.0.1:P1,127.0.0.1:P2,...`.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// The CA and client certificate of a [`Self::start_tls`] cluster.
    pub fn tls_files(&self) -> Option<EtcdTlsFiles> {
        self.tls.as_ref().map(|(files, _)| files.clone())
    }

    /// Member `member`'s directory (its data directory and log are in it).
    pub fn member_dir(&self, member: usize) -> &Path {
        &self.members[member].dir
    }

    /// Everything member `member` logged, over all its starts.
    pub fn log_text(&self, member: usize) -> String {
        std::fs::read_to_string(self.members[member].log_path()).unwrap_or_default()
    }

    /// Every member's log, headed by its name, for a failure message.
    pub fn all_logs(&self) -> String {
        (0..self.members.len())
            .map(|i| format!("--- etcd member {i} log:\n{}", self.log_text(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether member `member`'s process is running.
    pub fn is_running(&mut self, member: usize) -> bool {
        let m = &mut self.members[member];
        match m.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                m.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILLs member `member` (no chance to clean up) and reaps it.
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs member `member` and waits for it to exit (SIGKILL after
    /// 20 s); returns its exit status, `None` if it was not running.
    pub fn stop(&mut self, member: usize) -> Option<ExitStatus> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let mut child = self.members[member].child.take()?;
        let pid = i32::try_from(child.id()).expect("a pid");
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Starts member `member` again (killing it first if it runs) over its
    /// data directory and on its ports, so it rejoins as the same member.
    /// Does not wait; see [`Self::wait_healthy`].
    pub fn restart(&mut self, member: usize) {
        self.kill(member);
        self.spawn(member);
    }

    /// Waits until every member in `members` reports healthy (it is up and
    /// the cluster has a leader and quorum), for at most `timeout`; fails at
    /// once if one of them is not running.
    pub fn wait_healthy(&mut self, members: &[usize], timeout: Duration) -> Result<(), EtcdError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last = String::new();
        loop {
            let mut all = true;
            for &member in members {
                // Only the harness starts members: one that exited (a
                // port taken, a bad flag) will not become healthy.
                if !self.is_running(member) {
                    return Err(EtcdError::NotHealthy {
                        members: members.to_vec(),
                        waited: started.elapsed(),
                        last: format!("member {member} is not running"),
                    });
                }
                if let Err(why) = self.healthy(member) {
                    last = format!("member {member}: {why}");
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EtcdError::NotHealthy {
                    members: members.to_vec(),
                    waited: started.elapsed(),
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One health check of `member`: `/health` over plain http, `etcdctl
    /// endpoint health` with the client certificate over https (where the
    /// endpoint wants a certificate too).
    fn healthy(&self, member: usize) -> Result<(), String> {
        if self.tls.is_some() {
            return self
                .etcdctl(
                    &[member],
                    Credentials::ClientCertificate,
                    &["endpoint", "health"],
                )
                .map(drop)
                .map_err(|e| e.to_string());
        }
        match crate::http_get(self.members[member].client_port, "/health") {
            Some(body) if body.contains(r#""health":"true""#) => Ok(()),
            Some(body) => Err(format!("/health says {body}")),
            None => Err("/health does not answer 200".to_owned()),
        }
    }

    /// Runs `etcdctl --endpoints <members' client URLs> ARGS` (API v3,
    /// bounded by `--dial-timeout` and `--command-timeout`) and returns its
    /// stdout, or its output if it fails.
    pub fn etcdctl(
        &self,
        members: &[usize],
        credentials: Credentials,
        args: &[&str],
    ) -> Result<String, EtcdError> {
        let endpoints = members
            .iter()
            .map(|&m| self.client_url(m))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new(ETCDCTL);
        without_etcd_environment(&mut command)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg(format!("--dial-timeout={DIAL_TIMEOUT}"))
            .arg(format!("--command-timeout={COMMAND_TIMEOUT}"));
        if let Some((files, _)) = &self.tls {
            command.arg("--cacert").arg(&files.ca);
            if credentials == Credentials::ClientCertificate {
                command
                    .arg("--cert")
                    .arg(&files.cert)
                    .arg("--key")
                    .arg(&files.key);
            }
        }
        command.args(args);
        run_bounded(command, &args.join(" "))
    }

    /// `etcdctl put KEY VALUE` through member `member`.
    pub fn put(&self, member: usize, key: &str, value: &str) -> Result<(), EtcdError> {
        self.put_as(member, Credentials::ClientCertificate, key, value)
    }

    /// [`Self::put`] presenting `credentials` (for a TLS cluster).
    pub fn put_as(
        &self,
        member: usize,
        credentials: Credentials,
        key: &str,
        value: &str,
    ) -> Result<(), EtcdError> {
        // `--` so that a value starting with '-' is not an option.
        self.etcdctl(&[member], credentials, &["put", "--", key, value])
            .map(drop)
    }

    /// Retries [`Self::put`] until it succeeds or `timeout` passes (a put
    /// during a leader election fails); returns the last error.
    pub fn put_within(
        &self,
        member: usize,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> Result<(), EtcdError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.put(member, key, value) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() >= deadline => return Err(error),
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// The value of KEY read (linearizably) through member `member`, `None`
    /// if it is not set.
    pub fn get(&self, member: usize, key: &str) -> Result<Option<String>, EtcdError> {
        let out = self.etcdctl(
            &[member],
            Credentials::ClientCertificate,
            &["get", "--print-value-only", "--", key],
        )?;
        // etcdctl ends the value with a newline; an absent key prints nothing.
        Ok((!out.is_empty()).then(|| out.strip_suffix('\n').unwrap_or(&out).to_owned()))
    }

    /// How many members the cluster's membership lists, asked of `member`.
    pub fn member_count(&self, member: usize) -> Result<usize, EtcdError> {
        let out = self.etcdctl(
            &[member],
            Credentials::ClientCertificate,
            &["member", "list", "--write-out=json"],
        )?;
        let list: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| EtcdError::Etcdctl {
                args: "member list".to_owned(),
                status: "exit 0".to_owned(),
                output: format!("not JSON ({e}): {out}"),
            })?;
        Ok(list["members"].as_array().map_or(0, Vec::len))
    }

    /// The temporary directory that holds every member's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in 0..self.members.len() {
            self.kill(member);
        }
    }
}

/// Drops the variables etcd and etcdctl read as flags (`ETCD_*`,
/// `ETCDCTL_*`): one set in the test's environment would change the
/// cluster, or make etcd refuse a flag it shadows.
fn without_etcd_environment(command: &mut Command) -> &mut Command {
    for (name, _) in std::env::vars_os() {
        if name
            .to_str()
            .is_some_and(|n| n.starts_with("ETCD_") || n.starts_with("ETCDCTL_"))
        {
            command.env_remove(name);
        }
    }
    command
}

/// Runs `command` to completion, killing it if it outlives etcdctl's own
/// timeouts by [`ETCDCTL_GRACE`]; stdout on success.
fn run_bounded(mut command: Command, what: &str) -> Result<String, EtcdError> {
    // Files, not pipes: nothing has to drain them while we poll.
    let stdout = tempfile::tempfile().expect("temp file");
    let stderr = tempfile::tempfile().expect("temp file");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("temp file"))
        .stderr(stderr.try_clone().expect("temp file"))
        .spawn()
        .map_err(|source| EtcdError::Spawn {
            program: ETCDCTL.to_owned(),
            source,
        })?;
    let deadline = Instant::now() + ETCDCTL_GRACE;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(EtcdError::EtcdctlHung {
                args: what.to_owned(),
                waited: ETCDCTL_GRACE,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = read_all(stdout);
    if status.success() {
        return Ok(out);
    }
    Err(EtcdError::Etcdctl {
        args: what.to_owned(),
        status: status.to_string(),
        output: format!("{out}{}", read_all(stderr)),
    })
}

fn read_all(mut file: File) -> String {
    use std::io::{Seek, SeekFrom};
    let mut text = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut text);
    text
}

/// Writes a CA, a server certificate for 127.0.0.1 and localhost, and a
/// client certificate, all signed by the CA, as PEM files in `dir`.
fn write_certificates(dir: &Path) -> (EtcdTlsFiles, ServerTls) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    std::fs::create_dir_all(dir).expect("tls dir");
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write PEM");
        path
    };
    let new_key = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");

    let ca_key = new_key();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tentacle tests etcd CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let ca = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>, common_name: &str, usages: Vec<ExtendedKeyUsagePurpose>| {
        let key = new_key();
        let mut params = CertificateParams::new(names).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    // etcd's gRPC gateway dials its own client port with the server's
    // certificate, so that one is a client certificate as well.
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        "etcd",
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let (client_cert, client_key) = leaf(
        Vec::new(),
        "tentacle-hub",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    let files = EtcdTlsFiles {
        ca: write("ca.crt", &ca_cert.pem()),
        cert: write("client.crt", &client_cert),
        key: write("client.key", &client_key),
    };
    let server = ServerTls {
        cert: write("server.crt", &server_cert),
        key: write("server.key", &server_key),
    };
    (files, server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prepared_cluster_has_distinct_ports_and_names_them_in_the_store_url() {
        let cluster = EtcdCluster::prepare(3, false);
        let endpoints = cluster.endpoints();
        let mut ports: Vec<u16> = cluster
            .members
            .iter()
            .flat_map(|m| [m.peer_port, m.client_port])
            .collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6, "peer and client ports are all distinct");
        assert_eq!(
            cluster.store_url(),
            format!("etcd://{},{},{}", endpoints[0], endpoints[1], endpoints[2])
        );
        assert!(endpoints.iter().all(|e| e.starts_with("127.0.0.1:")));
        assert_eq!(cluster.client_url(1), format!("http://{}", endpoints[1]));
        assert_eq!(cluster.initial_cluster().split(',').count(), 3);
        assert!(cluster.tls_files().is_none());
        assert_ne!(cluster.token, EtcdCluster::prepare(1, false).token);
    }

    #[test]
    fn a_tls_cluster_writes_its_pem_files() {
        let cluster = EtcdCluster::prepare(1, true);
        let files = cluster.tls_files().expect("TLS files");
        let read = |path: &Path| std::fs::read_to_string(path).expect("read PEM");
        assert!(read(&files.ca).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(read(&files.cert).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(read(&files.key).contains("PRIVATE KEY-----"));
        assert_ne!(read(&files.ca), read(&files.cert));
        assert!(cluster.client_url(0).starts_with("https://127.0.0.1:"));
    }
}
