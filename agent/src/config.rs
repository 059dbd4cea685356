//! The instance home and its `tentacle.toml`.
//!
//! Every setting has a safe default, so a new instance's file only needs what
//! the user changed. Relative paths are relative to the home.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tentacle_proto::Thumbprint;

use crate::files::FileSettings;
use crate::packages::PackageSettings;
use crate::polling::{HubEndpoint, PollingSettings, ProxySettings};
use crate::scripts::ScriptSettings;
use crate::scripts::process::ProcessSettings;
use tentacle_proto::dial::ListeningAddress;
use tentacle_proto::http2::Http2Settings;
use tentacle_proto::trust::CertificateValidity;
use tentacle_proto::tunnel::HeartbeatSettings;

/// The file name of the configuration inside the home.
pub const CONFIG_FILE: &str = "tentacle.toml";

/// Why the configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no instance at {0}: run `tentacle create-instance --home {0}` first")]
    NoInstance(PathBuf),
    #[error("could not read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid configuration: {source}")]
    Parse { path: PathBuf, source: ParseError },
    #[error("could not write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// `tentacle.toml` text that is not a configuration. Shown on one line: the
/// TOML parser's own message, which names the offending key or value, and
/// where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", .0.message(), span_hint(.0))]
pub struct ParseError(toml::de::Error);

/// Why the polling settings cannot be used; each says which command fixes it.
#[derive(Debug, thiserror::Error)]
pub enum PollingConfigError {
    #[error("polling needs an agent id: set one with `tentacle configure --agent-id NAME`")]
    NoAgentId,
    #[error(
        "polling is enabled but no hub is configured: add one with `tentacle configure --mode polling --server https://HOST:10943 --server-thumbprint T`"
    )]
    NoHub,
    #[error(transparent)]
    HubAddress(#[from] tentacle_proto::dial::ParseTargetError),
}

/// An instance home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// `path` made absolute against the home.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.dir.join(path)
        }
    }

    pub fn exists(&self) -> bool {
        self.config_path().is_file()
    }

    pub fn load(&self) -> Result<AgentConfig, ConfigError> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ConfigError::NoInstance(self.dir.clone())
            } else {
                ConfigError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        AgentConfig::parse(&text).map_err(|source| ConfigError::Parse { path, source })
    }

    /// Writes through a temporary file and a rename, so a running agent that
    /// reloads the file never reads half of it.
    pub fn save(&self, config: &AgentConfig) -> Result<(), ConfigError> {
        let path = self.config_path();
        let err = |source| ConfigError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let text = toml::to_string_pretty(config).map_err(|e| err(io::Error::other(e)))?;
        let temp = self
            .dir
            .join(format!(".{CONFIG_FILE}.tmp-{}", std::process::id()));
        std::fs::write(&temp, text).map_err(err)?;
        std::fs::rename(&temp, &path).map_err(err)
    }
}

/// `tentacle.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub listen: ListenConfig,
    pub trust: TrustConfig,
    pub certificate: CertificateConfig,
    pub scripts: ScriptsConfig,
    pub files: FilesConfig,
    pub server: ServerConfig,
    pub polling: PollingConfig,
    pub packages: PackagesConfig,
    /// Hubs this agent registered with (`register-with`); they are told
    /// about a new certificate by `rotate-certificate`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<PollingServer>,
}

impl AgentConfig {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        toml::from_str(text).map_err(ParseError)
    }

    pub fn script_settings(&self, home: &Home) -> ScriptSettings {
        let mut settings = ScriptSettings::new(home.resolve(&self.scripts.work_dir));
        settings.default_mutex_timeout = self.scripts.default_mutex_timeout;
        settings.workspace_max_age = self.scripts.workspace_max_age;
        settings.cleanup_interval = self.scripts.cleanup_interval;
        // `ScriptSettings::page_limit` keeps these sane, whatever is here.
        settings.default_page_lines = self.scripts.default_page_lines;
        settings.max_page_lines = self.scripts.max_page_lines;
        settings.max_page_bytes = self.scripts.max_page_bytes;
        settings.completed_tickets_max = self.scripts.completed_tickets_max;
        settings.completed_tickets_max_age = self.scripts.completed_tickets_max_age;
        settings
    }

    pub fn process_settings(&self) -> ProcessSettings {
        ProcessSettings {
            kill_grace: self.scripts.kill_grace,
            output_drain_timeout: self.scripts.output_drain_timeout,
            max_line_bytes: self.scripts.max_line_bytes,
            host_program: None,
        }
    }

    pub fn file_settings(&self, home: &Home) -> FileSettings {
        let mut settings = FileSettings::new(home.resolve(&self.files.root));
        settings.max_upload_bytes = self.files.max_upload_bytes;
        settings.min_free_bytes = self.files.min_free_bytes;
        settings
    }
}

impl AgentConfig {
    /// The polling settings, or why they cannot be used.
    pub fn polling_settings(&self) -> Result<PollingSettings, PollingConfigError> {
        let polling = &self.polling;
        if polling.agent_id.is_empty() {
            return Err(PollingConfigError::NoAgentId);
        }
        if polling.servers.is_empty() {
            return Err(PollingConfigError::NoHub);
        }
        let hubs = polling
            .servers
            .iter()
            .map(|server| {
                Ok(HubEndpoint {
                    address: server.url.parse::<ListeningAddress>()?,
                    thumbprint: server.thumbprint,
                })
            })
            .collect::<Result<Vec<_>, PollingConfigError>>()?;
        Ok(PollingSettings {
            agent_id: polling.agent_id.clone(),
            hubs,
            tunnels: polling.tunnels.max(1),
            heartbeat: HeartbeatSettings {
                interval: polling.heartbeat_interval,
                timeout: polling.heartbeat_timeout,
            },
            reconnect_initial: polling.reconnect_initial,
            reconnect_max: polling.reconnect_max,
            connect_timeout: polling.connect_timeout,
            shutdown_grace: self.server.shutdown_grace,
            dialer: std::sync::Arc::new(crate::polling::TcpDialer {
                proxy: polling.proxy.clone(),
            }),
            certificate_validity: self.trust.certificate_validity,
        })
    }
}

impl AgentConfig {
    pub fn package_settings(&self, home: &Home) -> PackageSettings {
        let mut settings = PackageSettings::new(
            home.resolve(&self.packages.cache_dir),
            home.resolve(&self.packages.apps_dir),
        );
        settings.max_cache_bytes = self.packages.max_cache_bytes;
        settings.max_age = self.packages.max_age;
        settings.max_package_bytes = self.packages.max_package_bytes;
        settings.max_extracted_bytes = self.packages.max_extracted_bytes;
        settings.min_free_bytes = self.files.min_free_bytes;
        settings
    }
}

/// The package cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackagesConfig {
    pub cache_dir: PathBuf,
    /// Packages are extracted into <apps_dir>/<application>/<digest prefix>.
    pub apps_dir: PathBuf,
    pub max_cache_bytes: u64,
    /// Cached packages unused for this long are deleted.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    pub max_package_bytes: u64,
    pub max_extracted_bytes: u64,
}

impl Default for PackagesConfig {
    fn default() -> Self {
        let defaults = PackageSettings::new(PathBuf::new(), PathBuf::new());
        Self {
            cache_dir: PathBuf::from("packages"),
            apps_dir: PathBuf::from("apps"),
            max_cache_bytes: defaults.max_cache_bytes,
            max_age: defaults.max_age,
            max_package_bytes: defaults.max_package_bytes,
            max_extracted_bytes: defaults.max_extracted_bytes,
        }
    }
}

/// A new random agent id: 20 lowercase letters and digits.
pub fn new_agent_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// Polling mode: the agent dials its hubs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollingConfig {
    pub enabled: bool,
    /// The name hubs address this agent by: `poll://<agent_id>`.
    pub agent_id: String,
    /// The hubs to dial. Servers pinned to the same thumbprint are nodes of
    /// one hub cluster (they share its certificate and registry): the agent
    /// keeps that group's tunnels on ONE of them at a time, starting on the
    /// node its id hashes to (`sha256(agent_id) % nodes`, so a fleet
    /// spreads evenly), and moves to the next node in this list, wrapping
    /// around, when the current one cannot be reached or sends a drain
    /// (after a drain at once, within the first reconnect window's jitter;
    /// otherwise within the usual backoff). Servers pinned to different
    /// thumbprints are independent hubs and each gets its own tunnels. A
    /// single load-balanced name is a cluster of one address.
    pub servers: Vec<PollingServer>,
    /// Tunnels kept open to each hub (to one node of each cluster).
    pub tunnels: u32,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A tunnel that hears nothing for this long is reopened.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// The first reconnect waits a random time up to this; failures double it.
    #[serde(with = "humantime_serde")]
    pub reconnect_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// An HTTP CONNECT proxy; without one, HTTPS_PROXY is honoured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxySettings>,
}

impl Default for PollingConfig {
    fn default() -> Self {
        let heartbeat = HeartbeatSettings::default();
        Self {
            enabled: false,
            agent_id: String::new(),
            servers: Vec::new(),
            tunnels: 1,
            heartbeat_interval: heartbeat.interval,
            heartbeat_timeout: heartbeat.timeout,
            reconnect_initial: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            proxy: None,
        }
    }
}

/// A hub a polling agent dials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollingServer {
    /// `https://HOST:PORT`.
    pub url: String,
    pub thumbprint: Thumbprint,
}

fn span_hint(error: &toml::de::Error) -> String {
    error
        .span()
        .map(|span| format!(" (at byte {})", span.start))
        .unwrap_or_default()
}

/// Listening mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    pub enabled: bool,
    pub address: IpAddr,
    pub port: u16,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: tentacle_proto::dial::DEFAULT_LISTENING_PORT,
        }
    }
}

/// Servers whose certificates this agent accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustConfig {
    pub thumbprints: Vec<Thumbprint>,
    /// Whether a trusted peer's certificate must also be within its
    /// validity dates: `"ignored"` (the default: the thumbprint alone
    /// decides, as Octopus Tentacle's 100-year certificates expect) or
    /// `"enforced"`. Applies to the agent's server and to the hubs it
    /// polls, from the next handshake; see SECURITY.md.
    pub certificate_validity: CertificateValidity,
}

/// Where this agent's own certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertificateConfig {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl Default for CertificateConfig {
    fn default() -> Self {
        Self {
            certificate: PathBuf::from("tentacle.crt.pem"),
            key: PathBuf::from("tentacle.key.pem"),
        }
    }
}

/// Script execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptsConfig {
    pub work_dir: PathBuf,
    #[serde(with = "humantime_serde")]
    pub default_mutex_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub output_drain_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub workspace_max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    pub max_line_bytes: usize,
    /// Log lines in one GetStatus reply when the caller asks for 0 (its
    /// default), and in one WatchScript batch.
    pub default_page_lines: usize,
    /// A caller asking for more lines in one reply gets this many.
    pub max_page_lines: usize,
    /// Log bytes in one reply or batch (one longer line still goes whole).
    pub max_page_bytes: usize,
    /// Completed tickets remembered after their workspace is deleted, so
    /// they never run again; the oldest are forgotten first.
    pub completed_tickets_max: usize,
    /// How long a completed ticket is remembered after its workspace is
    /// deleted.
    #[serde(with = "humantime_serde")]
    pub completed_tickets_max_age: Duration,
}

impl Default for ScriptsConfig {
    fn default() -> Self {
        let scripts = ScriptSettings::new(PathBuf::new());
        let process = ProcessSettings::default();
        Self {
            work_dir: PathBuf::from("work"),
            default_mutex_timeout: scripts.default_mutex_timeout,
            kill_grace: process.kill_grace,
            output_drain_timeout: process.output_drain_timeout,
            workspace_max_age: scripts.workspace_max_age,
            cleanup_interval: scripts.cleanup_interval,
            max_line_bytes: process.max_line_bytes,
            default_page_lines: scripts.default_page_lines,
            max_page_lines: scripts.max_page_lines,
            max_page_bytes: scripts.max_page_bytes,
            completed_tickets_max: scripts.completed_tickets_max,
            completed_tickets_max_age: scripts.completed_tickets_max_age,
        }
    }
}

/// File transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    pub root: PathBuf,
    pub max_upload_bytes: u64,
    pub min_free_bytes: u64,
}

impl Default for FilesConfig {
    fn default() -> Self {
        let files = FileSettings::new(PathBuf::new());
        Self {
            root: PathBuf::from("files"),
            max_upload_bytes: files.max_upload_bytes,
            min_free_bytes: files.min_free_bytes,
        }
    }
}

/// Network limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once on the listening port; a new
    /// connection beyond it drops the oldest unfinished handshake if that
    /// one is older than `evict_handshakes_after`, so a slowloris cannot
    /// keep a real client out.
    pub max_handshakes: usize,
    /// How long a handshake may be under way before a newcomer may take
    /// its slot when every slot is taken (younger ones keep theirs, and the
    /// newcomer is closed).
    #[serde(with = "humantime_serde")]
    pub evict_handshakes_after: Duration,
    /// Connections open at once on the listening port, handshakes included.
    pub max_connections: usize,
    /// The largest gRPC message accepted (StartScript carries extra files).
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    /// How long running calls may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often the configuration is re-read for trust changes.
    #[serde(with = "humantime_serde")]
    pub trust_reload_interval: Duration,
    /// HTTP/2 keepalive, flow-control windows and frame size, for the
    /// listening server and the server inside each tunnel (which never
    /// pings). Every key is optional.
    pub http2: Http2Settings,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: tentacle_proto::incoming::DEFAULT_MAX_HANDSHAKES,
            evict_handshakes_after: tentacle_proto::incoming::DEFAULT_EVICT_HANDSHAKES_AFTER,
            max_connections: tentacle_proto::incoming::DEFAULT_MAX_CONNECTIONS,
            max_message_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 1024,
            shutdown_grace: Duration::from_secs(30),
            trust_reload_interval: Duration::from_secs(1),
            http2: Http2Settings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_partial_files_fill_in() {
        let config = AgentConfig::default();
        let text = toml::to_string_pretty(&config).expect("serialize");
        assert_eq!(AgentConfig::parse(&text), Ok(config));
        let partial = AgentConfig::parse("[listen]\nport = 1234\n").expect("parse");
        assert_eq!(partial.listen.port, 1234);
        assert!(partial.listen.enabled);
        assert_eq!(partial.scripts.kill_grace, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_and_bad_thumbprints_are_reported() {
        let unknown = AgentConfig::parse("[listen]\nprot = 1\n")
            .expect_err("typo")
            .to_string();
        assert!(unknown.contains("prot"), "{unknown}");
        assert!(!unknown.contains('\n'), "one line: {unknown}");
        let bad = AgentConfig::parse("[trust]\nthumbprints = [\"abc\"]\n")
            .expect_err("bad")
            .to_string();
        assert!(bad.contains("64 hex"), "{bad}");
        assert!(bad.contains("(at byte "), "{bad}");
    }

    #[test]
    fn a_bad_file_names_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::new(dir.path());
        std::fs::write(home.config_path(), "[listen]\nprot = 1\n").expect("write");
        let err = home.load().expect_err("typo");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(CONFIG_FILE), "{message}");
        assert!(message.contains("prot"), "{message}");
    }

    #[test]
    fn polling_errors_say_which_command_fixes_them() {
        let mut config = AgentConfig::default();
        config.polling.enabled = true;
        let no_id = config.polling_settings().expect_err("no agent id");
        assert!(matches!(no_id, PollingConfigError::NoAgentId), "{no_id:?}");
        assert!(no_id.to_string().contains("--agent-id"), "{no_id}");
        config.polling.agent_id = "agent1".into();
        let no_hub = config.polling_settings().expect_err("no hub");
        assert!(matches!(no_hub, PollingConfigError::NoHub), "{no_hub:?}");
        assert!(no_hub.to_string().contains("--server"), "{no_hub}");
        config.polling.servers.push(PollingServer {
            url: "http://hub:10943".into(),
            thumbprint: "a".repeat(64).parse().expect("thumbprint"),
        });
        let bad_url = config.polling_settings().expect_err("bad url");
        assert!(
            matches!(bad_url, PollingConfigError::HubAddress(_)),
            "{bad_url:?}"
        );
        assert!(
            bad_url.to_string().contains("http://hub:10943"),
            "{bad_url}"
        );
        config.polling.servers[0].url = "https://hub:10943".into();
        let settings = config.polling_settings().expect("valid");
        assert_eq!(settings.hubs.len(), 1);
    }

    #[test]
    fn script_page_and_tombstone_settings_reach_the_script_settings() {
        let config = AgentConfig::parse(
            "[scripts]\nmax_page_lines = 50\ndefault_page_lines = 20\nmax_page_bytes = 4096\ncompleted_tickets_max = 7\ncompleted_tickets_max_age = \"2days\"\n",
        )
        .expect("parse");
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = config.script_settings(&Home::new(dir.path()));
        assert_eq!(
            (
                settings.default_page_lines,
                settings.max_page_lines,
                settings.max_page_bytes
            ),
            (20, 50, 4096)
        );
        assert_eq!(settings.completed_tickets_max, 7);
        assert_eq!(
            settings.completed_tickets_max_age,
            Duration::from_secs(2 * 24 * 60 * 60)
        );
        let defaults = ScriptSettings::new(PathBuf::new());
        let scripts = ScriptsConfig::default();
        assert_eq!(
            scripts.completed_tickets_max,
            defaults.completed_tickets_max
        );
        assert_eq!(scripts.max_page_lines, defaults.max_page_lines);
    }

    #[test]
    fn http2_limits_are_settings_checked_when_the_file_is_read() {
        let config =
            AgentConfig::parse("[server.http2]\nkeepalive_interval = \"10s\"\n").expect("parse");
        assert_eq!(
            config.server.http2.keepalive_interval,
            Some(Duration::from_secs(10))
        );
        assert_eq!(config.server.http2.max_frame_bytes, Some(256 * 1024));
        let error = AgentConfig::parse("[server.http2]\nmax_frame_bytes = 1\n").expect_err("small");
        assert!(error.to_string().contains("16 KiB"), "{error}");
    }

    #[test]
    fn validity_and_accept_limits_are_settings() {
        let defaults = AgentConfig::default();
        assert_eq!(
            defaults.trust.certificate_validity,
            CertificateValidity::Ignored
        );
        assert_eq!(defaults.server.max_handshakes, 1024);
        let config = AgentConfig::parse(
            "[trust]\ncertificate_validity = \"enforced\"\n[server]\nmax_handshakes = 8\nevict_handshakes_after = \"250ms\"\nmax_connections = 16\n[server.http2]\nmax_header_list_bytes = 4096\n",
        )
        .expect("parse");
        assert_eq!(
            config.trust.certificate_validity,
            CertificateValidity::Enforced
        );
        assert_eq!(
            (config.server.max_handshakes, config.server.max_connections),
            (8, 16)
        );
        assert_eq!(
            config.server.evict_handshakes_after,
            Duration::from_millis(250)
        );
        assert_eq!(config.server.http2.max_header_list_bytes, Some(4096));
        let typo = AgentConfig::parse("[trust]\ncertificate_validity = \"strict\"\n")
            .expect_err("unknown value");
        assert!(typo.to_string().contains("enforced"), "{typo}");
    }

    #[test]
    fn a_missing_instance_says_how_to_make_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Home::new(dir.path().join("nope"))
            .load()
            .expect_err("missing");
        assert!(err.to_string().contains("create-instance"), "{err}");
    }
}
