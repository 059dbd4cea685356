//! `tentacle service` and `tentacle-hub service`: a hardened systemd unit,
//! rendered from a [`UnitSpec`] and managed with `systemctl`.
//!
//! Both binaries share this module: they parse [`ServiceArgs`], and call
//! [`run`] with their [`Program`] and `--home`. [`agent_unit`] and
//! [`hub_unit`] build the specs; `deploy/systemd/` holds what they render for
//! the default instance, and a test keeps those files in step.
//!
//! Deployment scripts run inside the agent's sandbox: `ProtectSystem=strict`
//! leaves the whole file system read-only except the home and the
//! `--read-write` paths, and `NoNewPrivileges=yes` means no script can gain
//! privileges (no `sudo`, no setuid programs). Hardening that would break
//! ordinary scripts is left out on purpose; see [`render`].

use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Where administrators' units live.
pub const UNIT_DIR: &str = "/etc/systemd/system";
/// Exists only while systemd is the running init system (`sd_booted(3)`).
pub const RUNTIME_DIR: &str = "/run/systemd/system";

/// The agent's default time to let calls finish when it stops
/// (`server.shutdown_grace` in tentacle.toml).
pub const AGENT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The agent's default time between SIGTERM and SIGKILL for a script it
/// stops (`scripts.kill_grace`).
pub const AGENT_KILL_GRACE: Duration = Duration::from_secs(5);
/// The hub's default `--drain-grace`.
pub const HUB_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// The hub's open-file limit: one descriptor per tunnel, plus operators.
pub const HUB_LIMIT_NOFILE: u64 = 65_536;

/// A service verb that failed before or while talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(
        "this host does not run systemd ({reason}); use `--print` to see the unit and install it by hand"
    )]
    NoSystemd { reason: String },
    #[error(
        "`--{action}` needs root (it changes {path}); run it with sudo, or use `--print` to see the unit and install it by hand"
    )]
    NeedsRoot { action: Action, path: PathBuf },
    #[error("invalid instance name {0:?}: use letters, digits, `-` and `_` (at most 64)")]
    InvalidInstance(String),
    #[error("invalid user or group name {0:?}")]
    InvalidUser(String),
    #[error(
        "user `{user}` does not exist; create it with `useradd --system --home-dir {home} --shell /usr/sbin/nologin {user}`, or pass --user"
    )]
    UnknownUser { user: String, home: String },
    #[error("{what} {path:?} cannot go into a unit: {reason}")]
    InvalidPath {
        what: &'static str,
        path: PathBuf,
        reason: &'static str,
    },
    #[error(
        "the executable {0} is under a directory ProtectHome=yes hides from the service; copy it to /usr/local/bin and run that copy"
    )]
    HiddenExecutable(PathBuf),
    #[error(
        "{what} {path} does not exist; create it first (systemd cannot make a missing path writable)"
    )]
    MissingPath { what: &'static str, path: PathBuf },
    #[error("invalid unit: {0}")]
    InvalidSpec(String),
    #[error("invalid server flag: {0}")]
    InvalidServerArgs(String),
    #[error("{unit} is not installed (no {path}); run `{command} --install` first")]
    NotInstalled {
        unit: String,
        path: PathBuf,
        command: String,
    },
    #[error("`systemctl {args}` failed with exit code {code}")]
    Systemctl { args: String, code: i32 },
    #[error("could not run systemctl: {0}")]
    SystemctlSpawn(#[source] io::Error),
    #[error("could not find this program's path: {0}")]
    CurrentExe(#[source] io::Error),
    #[error("could not {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `service` verb options shared by `tentacle` and `tentacle-hub`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub action: ActionArgs,
    /// The account the service runs as [default: `tentacle` for the agent,
    /// `tentacle-hub` for the hub]. It must exist at `--install`.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// A named instance: unit `<program>-NAME.service`, home
    /// /var/lib/<program>-NAME unless `--home` names another directory.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// Another directory the service may write to (repeatable). Deployment
    /// scripts run inside the service's sandbox, where ProtectSystem=strict
    /// makes everything but the home read-only: name here what they change.
    #[arg(long = "read-write", value_name = "PATH")]
    pub read_write: Vec<PathBuf>,
}

/// Exactly one thing to do.
#[derive(Debug, Clone, Default, clap::Args)]
#[group(required = true, multiple = false)]
pub struct ActionArgs {
    /// Writes the unit to /etc/systemd/system and enables it (root only).
    #[arg(long)]
    pub install: bool,
    /// Starts the installed service.
    #[arg(long)]
    pub start: bool,
    /// Stops the service; running scripts get the shutdown grace to finish.
    #[arg(long)]
    pub stop: bool,
    /// Restarts the service.
    #[arg(long)]
    pub restart: bool,
    /// Stops and disables the service and removes the unit; the home stays.
    #[arg(long)]
    pub uninstall: bool,
    /// Shows `systemctl status` for the service.
    #[arg(long)]
    pub status: bool,
    /// Prints the unit without installing it (needs neither root nor systemd).
    #[arg(long)]
    pub print: bool,
}

/// What a `service` verb does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Start,
    Stop,
    Restart,
    Uninstall,
    Status,
    Print,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Install => "install",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Restart => "restart",
            Self::Uninstall => "uninstall",
            Self::Status => "status",
            Self::Print => "print",
        })
    }
}

impl ServiceArgs {
    /// The chosen action (clap makes sure there is exactly one; `--print`
    /// when built by hand with none).
    pub fn action(&self) -> Action {
        let a = &self.action;
        [
            (a.install, Action::Install),
            (a.start, Action::Start),
            (a.stop, Action::Stop),
            (a.restart, Action::Restart),
            (a.uninstall, Action::Uninstall),
            (a.status, Action::Status),
        ]
        .into_iter()
        .find_map(|(set, action)| set.then_some(action))
        .unwrap_or(Action::Print)
    }
}

/// The program a unit runs, with what its unit depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// `tentacle run`. The graces come from tentacle.toml (the defaults are
    /// [`AGENT_SHUTDOWN_GRACE`] and [`AGENT_KILL_GRACE`]).
    Agent {
        shutdown_grace: Duration,
        kill_grace: Duration,
    },
    /// `tentacle-hub server SERVER_ARGS`.
    Hub { server_args: Vec<String> },
}

impl Program {
    /// The agent with the default graces.
    pub fn agent() -> Self {
        Self::Agent {
            shutdown_grace: AGENT_SHUTDOWN_GRACE,
            kill_grace: AGENT_KILL_GRACE,
        }
    }

    /// The binary's name, also the unit's stem.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Agent { .. } => "tentacle",
            Self::Hub { .. } => "tentacle-hub",
        }
    }

    /// The account a service runs as without `--user`.
    pub fn default_user(&self) -> &'static str {
        self.name()
    }

    /// `/var/lib/<unit stem>`: where the instance keeps its state by default.
    pub fn default_home(&self, instance: Option<&str>) -> PathBuf {
        Path::new("/var/lib").join(unit_stem(self.name(), instance))
    }
}

/// `tentacle` or `tentacle-NAME`.
fn unit_stem(program: &str, instance: Option<&str>) -> String {
    match instance {
        None => program.to_owned(),
        Some(name) => format!("{program}-{name}"),
    }
}

/// Accepts an instance name: 1 to 64 letters, digits, `-` and `_`.
pub fn validate_instance(name: &str) -> Result<(), SystemdError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(SystemdError::InvalidInstance(name.to_owned()))
    }
}

/// The unit file's name: `tentacle.service`, `tentacle-NAME.service`.
pub fn unit_name(program: &str, instance: Option<&str>) -> Result<String, SystemdError> {
    if let Some(name) = instance {
        validate_instance(name)?;
    }
    Ok(format!("{}.service", unit_stem(program, instance)))
}

/// Accepts a POSIX-portable account name (what `useradd` makes).
pub fn validate_user(name: &str) -> Result<(), SystemdError> {
    let mut chars = name.chars();
    let valid = name.len() <= 32
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(SystemdError::InvalidUser(name.to_owned()))
    }
}

/// Directories `ProtectHome=yes` makes inaccessible to the service.
const HIDDEN_BY_PROTECT_HOME: [&str; 3] = ["/home", "/root", "/run/user"];

/// Whether `ProtectHome=yes` hides `path` from the service.
pub fn hidden_by_protect_home(path: &Path) -> bool {
    HIDDEN_BY_PROTECT_HOME
        .iter()
        .any(|dir| path.starts_with(dir))
}

/// Where one installation of a program lives, resolved from the verb's
/// arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    /// The binary ExecStart runs.
    pub exe: PathBuf,
    /// The instance home (absolute).
    pub home: PathBuf,
    pub user: String,
    pub instance: Option<String>,
    /// Extra ReadWritePaths (absolute).
    pub read_write: Vec<PathBuf>,
}

impl Installation {
    /// Resolves `args` for `program` whose `--home` is `home`:
    /// - a home `ProtectHome=yes` would hide (the hub's per-user default
    ///   `~/.tentacle-hub`, say) cannot work in the unit, so the service
    ///   uses [`Program::default_home`] instead;
    /// - a named instance whose home is the program's default gets a home of
    ///   its own, `/var/lib/<program>-NAME`, so instances never share one.
    pub fn new(
        program: &Program,
        args: &ServiceArgs,
        exe: &Path,
        home: &Path,
    ) -> Result<Self, SystemdError> {
        let instance = args.instance.clone();
        if let Some(name) = &instance {
            validate_instance(name)?;
        }
        let home = absolute("home", home)?;
        let home = if hidden_by_protect_home(&home)
            || (instance.is_some() && home == program.default_home(None))
        {
            program.default_home(instance.as_deref())
        } else {
            home
        };
        let read_write = args
            .read_write
            .iter()
            .map(|path| absolute("read-write path", path))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            exe: exe.to_owned(),
            home,
            user: args
                .user
                .clone()
                .unwrap_or_else(|| program.default_user().to_owned()),
            instance,
            read_write,
        })
    }

    /// `tentacle service` or `tentacle service --instance NAME`: the command
    /// that manages this installation.
    fn command(&self, program: &str) -> String {
        match &self.instance {
            None => format!("{program} service"),
            Some(name) => format!("{program} service --instance {name}"),
        }
    }
}

fn absolute(what: &'static str, path: &Path) -> Result<PathBuf, SystemdError> {
    std::path::absolute(path)
        .map_err(|source| SystemdError::Io {
            what: "resolve",
            path: path.to_owned(),
            source,
        })
        .and_then(|p| {
            if p.as_os_str().is_empty() {
                Err(SystemdError::InvalidPath {
                    what,
                    path: path.to_owned(),
                    reason: "it is empty",
                })
            } else {
                Ok(p)
            }
        })
}

/// Everything a unit file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    /// The file name, e.g. `tentacle.service`.
    pub unit_name: String,
    /// The command that manages this unit, e.g. `tentacle service`; named
    /// in the unit's header and in hints.
    pub command: String,
    /// Comment lines at the top (without `# `).
    pub comment: Vec<String>,
    pub description: String,
    /// ExecStart's argv; the first is an absolute path.
    pub exec_start: Vec<String>,
    pub user: String,
    /// The group; the user's primary group when `None`.
    pub group: Option<String>,
    /// The instance home, the service's only writable place besides
    /// `read_write_paths` (and its private /tmp).
    pub home: PathBuf,
    pub read_write_paths: Vec<PathBuf>,
    /// TimeoutStopSec: how long a stop waits before SIGKILL.
    pub stop_timeout: Duration,
    pub restart_delay: Duration,
    pub limit_nofile: Option<u64>,
    /// `KillMode=process`: a stop ends the main process only and leaves
    /// the unit's other processes running (the agent's detached scripts,
    /// which the next start re-attaches to). Otherwise `KillMode=mixed`.
    pub keep_other_processes_on_stop: bool,
}

impl UnitSpec {
    /// `StateDirectory=` for a home under /var/lib, so that systemd creates it
    /// and gives it to the service's user.
    pub fn state_directory(&self) -> Option<String> {
        let relative = self.home.strip_prefix("/var/lib").ok()?.to_str()?;
        let plain = !relative.is_empty()
            && relative
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            && !relative
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..");
        plain.then(|| relative.to_owned())
    }

    /// Checks that every value can be written into the unit as it is.
    pub fn validate(&self) -> Result<(), SystemdError> {
        let stem = self.unit_name.strip_suffix(".service").unwrap_or("");
        if stem.is_empty()
            || !stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(SystemdError::InvalidSpec(format!(
                "unit name {:?}",
                self.unit_name
            )));
        }
        if self.description.chars().any(char::is_control) {
            return Err(SystemdError::InvalidSpec(
                "the description has control characters".to_owned(),
            ));
        }
        validate_user(&self.user)?;
        if let Some(group) = &self.group {
            validate_user(group)?;
        }
        let Some(exe) = self.exec_start.first() else {
            return Err(SystemdError::InvalidSpec("ExecStart is empty".to_owned()));
        };
        check_path("executable", Path::new(exe))?;
        if exe.contains('$') {
            return Err(SystemdError::InvalidPath {
                what: "executable",
                path: exe.into(),
                reason: "it contains `$`",
            });
        }
        check_path("home", &self.home)?;
        for path in &self.read_write_paths {
            check_path("read-write path", path)?;
        }
        Ok(())
    }
}

fn check_path(what: &'static str, path: &Path) -> Result<(), SystemdError> {
    let invalid = |reason| SystemdError::InvalidPath {
        what,
        path: path.to_owned(),
        reason,
    };
    let text = path.to_str().ok_or_else(|| invalid("it is not UTF-8"))?;
    if !path.is_absolute() {
        return Err(invalid("it is not absolute"));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid("it has control characters"));
    }
    Ok(())
}

/// The agent's unit: `EXE --home HOME run`.
///
/// TimeoutStopSec covers the agent's own stop: calls get `shutdown_grace`,
/// then scripts still running get SIGTERM and `kill_grace` (plus 5 s the
/// agent allows for them to exit), plus 5 s of margin.
pub fn agent_unit(
    installation: &Installation,
    shutdown_grace: Duration,
    kill_grace: Duration,
) -> Result<UnitSpec, SystemdError> {
    let command = installation.command("tentacle");
    let spec = UnitSpec {
        unit_name: unit_name("tentacle", installation.instance.as_deref())?,
        comment: vec![
            format!("Tentacle deployment agent, written by `{command} --print`."),
            "Deployment scripts run inside this sandbox: ProtectSystem=strict leaves the"
                .to_owned(),
            "file system read-only except ReadWritePaths, so add the directories your".to_owned(),
            format!("scripts change with `{command} --install --read-write PATH`."),
            "NoNewPrivileges=yes: scripts cannot gain privileges (no sudo, no setuid).".to_owned(),
        ],
        command,
        description: described("Tentacle deployment agent", installation),
        exec_start: vec![
            path_text(&installation.exe),
            "--home".to_owned(),
            path_text(&installation.home),
            "run".to_owned(),
        ],
        user: installation.user.clone(),
        group: None,
        home: installation.home.clone(),
        read_write_paths: installation.read_write.clone(),
        stop_timeout: shutdown_grace + kill_grace + Duration::from_secs(10),
        restart_delay: Duration::from_secs(5),
        limit_nofile: None,
        // Deployment scripts outlive a stop or restart of the agent (an
        // upgrade of the agent by a script, say); uninstalling stops them.
        keep_other_processes_on_stop: true,
    };
    spec.validate()?;
    Ok(spec)
}

/// The hub's unit: `EXE --home HOME server SERVER_ARGS`, with LimitNOFILE
/// for many tunnels. TimeoutStopSec is the `--drain-grace` among
/// `server_args` (default 30 s) plus 15 s.
pub fn hub_unit(
    installation: &Installation,
    server_args: &[String],
) -> Result<UnitSpec, SystemdError> {
    let drain_grace = drain_grace(server_args)?;
    let command = installation.command("tentacle-hub");
    let mut exec_start = vec![
        path_text(&installation.exe),
        "--home".to_owned(),
        path_text(&installation.home),
        "server".to_owned(),
    ];
    exec_start.extend(server_args.iter().cloned());
    let spec = UnitSpec {
        unit_name: unit_name("tentacle-hub", installation.instance.as_deref())?,
        comment: vec![
            format!("Tentacle hub, written by `{command} --print -- SERVER FLAGS`."),
            format!("Change the flags with `{command} --install -- FLAGS`, or edit ExecStart."),
        ],
        command,
        description: described("Tentacle hub", installation),
        exec_start,
        user: installation.user.clone(),
        group: None,
        home: installation.home.clone(),
        read_write_paths: installation.read_write.clone(),
        stop_timeout: drain_grace + Duration::from_secs(15),
        restart_delay: Duration::from_secs(5),
        limit_nofile: Some(HUB_LIMIT_NOFILE),
        keep_other_processes_on_stop: false,
    };
    spec.validate()?;
    Ok(spec)
}

fn described(what: &str, installation: &Installation) -> String {
    match &installation.instance {
        None => what.to_owned(),
        Some(name) => format!("{what} ({name})"),
    }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The `--drain-grace` among the hub's server flags; `--home` there is
/// refused, since the unit sets it.
fn drain_grace(server_args: &[String]) -> Result<Duration, SystemdError> {
    let mut grace = HUB_DRAIN_GRACE;
    let mut args = server_args.iter();
    while let Some(arg) = args.next() {
        if arg == "--home" || arg.starts_with("--home=") {
            return Err(SystemdError::InvalidServerArgs(
                "give `--home` before `service`, not after `--`".to_owned(),
            ));
        }
        let value = if arg == "--drain-grace" {
            args.next().map(String::as_str)
        } else {
            arg.strip_prefix("--drain-grace=")
        };
        if arg == "--drain-grace" || arg.starts_with("--drain-grace=") {
            let value = value.ok_or_else(|| {
                SystemdError::InvalidServerArgs("`--drain-grace` needs a duration".to_owned())
            })?;
            grace = humantime::parse_duration(value).map_err(|error| {
                SystemdError::InvalidServerArgs(format!("--drain-grace {value}: {error}"))
            })?;
        }
    }
    Ok(grace)
}

/// Quotes one ExecStart argument so that systemd reads it back unchanged:
/// `%` becomes `%%` (specifiers), `$` becomes `$$` (environment
/// substitution), and anything beyond plain characters is double-quoted
/// with C escapes (`\\`, `\"`, `\n`, `\xNN`, …). A lone `;` is quoted too,
/// since bare it separates commands.
pub fn quote_exec_arg(arg: &str) -> String {
    quote(arg, true)
}

/// Quotes a path for a space-separated path list such as ReadWritePaths
/// (`%` becomes `%%`; spaces, quotes and backslashes are quoted). Paths
/// with control characters are refused by [`UnitSpec::validate`].
pub fn quote_path(path: &Path) -> String {
    quote(&path.to_string_lossy(), false)
}

fn quote(text: &str, exec: bool) -> String {
    let plain = !text.is_empty()
        && text.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '/' | '.' | '_' | '-' | ':' | ',' | '=' | '+' | '@' | '%')
                || (exec && c == '$')
        });
    let mut out = String::with_capacity(text.len() + 2);
    if !plain {
        out.push('"');
    }
    for c in text.chars() {
        match c {
            '%' => out.push_str("%%"),
            '$' if exec => out.push_str("$$"),
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let mut buf = [0; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{byte:02x}");
                }
            }
            c => out.push(c),
        }
    }
    if !plain {
        out.push('"');
    }
    out
}

/// Escapes specifiers in free text (Description=).
fn escape_specifiers(text: &str) -> String {
    text.replace('%', "%%")
}

/// Whole seconds, rounded up, as systemd reads them.
fn seconds(duration: Duration) -> String {
    let mut secs = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        secs += 1;
    }
    format!("{secs}s")
}

/// Renders the hardened unit.
///
/// In the sandbox:
/// - `NoNewPrivileges`, `ProtectSystem=strict`, `ProtectHome`, `PrivateTmp`,
///   `ReadWritePaths` (the home and `--read-write` paths), `UMask=0077`;
/// - kernel and privilege hardening no non-root script needs:
///   `ProtectKernelTunables`, `ProtectKernelModules`, `ProtectKernelLogs`,
///   `ProtectControlGroups`, `ProtectHostname`, `RestrictSUIDSGID`,
///   `RestrictRealtime`, `LockPersonality`, `RemoveIPC`.
///
/// Left out, because deployment scripts run arbitrary tools:
/// `MemoryDenyWriteExecute` (breaks JIT runtimes: pwsh/.NET, node, Java),
/// `SystemCallFilter` and `SystemCallArchitectures` (unknown tools, 32-bit
/// installers), `RestrictNamespaces` (rootless podman, bubblewrap),
/// `RestrictAddressFamilies`, `PrivateDevices`/`ProtectClock`/`DevicePolicy`
/// (device access stays with file permissions), `ProtectProc`/`ProcSubset`
/// (scripts look for other users' processes, runtimes read /proc/meminfo),
/// and `CapabilityBoundingSet` (a `--user root` service is root on purpose).
///
/// `KillMode=mixed` (the hub): a stop sends SIGTERM to the main process
/// only, and whatever is left after `TimeoutStopSec` gets SIGKILL.
/// `KillMode=process` (the agent): only the main process is signalled, so
/// the deployment scripts it runs detached keep running through a stop or
/// restart and the next agent re-attaches to them.
pub fn render(spec: &UnitSpec) -> String {
    let mut unit = String::new();
    let mut line = |text: &str| {
        unit.push_str(text);
        unit.push('\n');
    };
    for comment in &spec.comment {
        line(format!("# {comment}").trim_end());
    }
    if !spec.comment.is_empty() {
        line("");
    }
    line("[Unit]");
    line(&format!(
        "Description={}",
        escape_specifiers(&spec.description)
    ));
    line("Wants=network-online.target");
    line("After=network-online.target");
    line("");
    line("[Service]");
    line("Type=exec");
    line(&format!("User={}", spec.user));
    if let Some(group) = &spec.group {
        line(&format!("Group={group}"));
    }
    let exec: Vec<String> = spec.exec_start.iter().map(|a| quote_exec_arg(a)).collect();
    line(&format!("ExecStart={}", exec.join(" ")));
    line("Restart=on-failure");
    line(&format!("RestartSec={}", seconds(spec.restart_delay)));
    if spec.keep_other_processes_on_stop {
        line("# A stop or restart signals the agent alone: running deployment scripts");
        line("# keep going and the next start re-attaches to them. `service --uninstall`");
        line("# stops them.");
        line("KillMode=process");
    } else {
        line("# SIGTERM goes to the main process alone, which gives running scripts its");
        line("# grace period; what is left after TimeoutStopSec gets SIGKILL.");
        line("KillMode=mixed");
    }
    line(&format!("TimeoutStopSec={}", seconds(spec.stop_timeout)));
    if let Some(limit) = spec.limit_nofile {
        line(&format!("LimitNOFILE={limit}"));
    }
    if let Some(state) = spec.state_directory() {
        line(&format!("StateDirectory={state}"));
        line("StateDirectoryMode=0700");
    }
    line("UMask=0077");
    line("NoNewPrivileges=yes");
    line("ProtectSystem=strict");
    line("ProtectHome=yes");
    line("PrivateTmp=yes");
    let writable: Vec<String> = std::iter::once(&spec.home)
        .chain(&spec.read_write_paths)
        .map(|p| quote_path(p))
        .collect();
    line(&format!("ReadWritePaths={}", writable.join(" ")));
    line("ProtectKernelTunables=yes");
    line("ProtectKernelModules=yes");
    line("ProtectKernelLogs=yes");
    line("ProtectControlGroups=yes");
    line("ProtectHostname=yes");
    line("RestrictSUIDSGID=yes");
    line("RestrictRealtime=yes");
    line("LockPersonality=yes");
    line("RemoveIPC=yes");
    line("");
    line("[Install]");
    line("WantedBy=multi-user.target");
    unit
}

/// Runs `systemctl`.
pub trait Systemctl {
    /// Runs `systemctl ARGS` with this process's stdio and returns its exit
    /// code (128 + the signal if a signal ended it). An error means it could
    /// not run at all.
    fn run(&self, args: &[String]) -> io::Result<i32>;
}

impl<F> Systemctl for F
where
    F: Fn(&[String]) -> io::Result<i32>,
{
    fn run(&self, args: &[String]) -> io::Result<i32> {
        self(args)
    }
}

/// The real `systemctl` (or another program standing in for it).
#[derive(Debug, Clone)]
pub struct CommandSystemctl {
    pub program: PathBuf,
}

impl Default for CommandSystemctl {
    fn default() -> Self {
        Self {
            program: PathBuf::from("systemctl"),
        }
    }
}

impl Systemctl for CommandSystemctl {
    fn run(&self, args: &[String]) -> io::Result<i32> {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::Command::new(&self.program)
            .args(args)
            .status()?;
        Ok(status
            .code()
            .or_else(|| status.signal().map(|signal| 128 + signal))
            .unwrap_or(1))
    }
}

type UserCheck = Box<dyn Fn(&str) -> bool>;

/// Performs the actions against a unit directory with `systemctl`; every
/// part of the host is injectable for tests.
pub struct ServiceManager {
    unit_dir: PathBuf,
    runtime_dir: PathBuf,
    root: bool,
    systemctl: Box<dyn Systemctl>,
    user_exists: UserCheck,
}

impl fmt::Debug for ServiceManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceManager")
            .field("unit_dir", &self.unit_dir)
            .field("runtime_dir", &self.runtime_dir)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ServiceManager {
    /// This host: /etc/systemd/system, /run/systemd/system, the real
    /// `systemctl`, the effective user and the user database.
    pub fn system() -> Self {
        Self {
            unit_dir: PathBuf::from(UNIT_DIR),
            runtime_dir: PathBuf::from(RUNTIME_DIR),
            root: nix::unistd::geteuid().is_root(),
            systemctl: Box::new(CommandSystemctl::default()),
            user_exists: Box::new(|name| {
                // An unreadable user database is not proof of absence.
                !matches!(nix::unistd::User::from_name(name), Ok(None))
            }),
        }
    }

    pub fn with_unit_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.unit_dir = dir.into();
        self
    }

    /// The directory whose presence says systemd runs this host.
    pub fn with_runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = dir.into();
        self
    }

    pub fn with_root(mut self, root: bool) -> Self {
        self.root = root;
        self
    }

    pub fn with_systemctl(mut self, systemctl: impl Systemctl + 'static) -> Self {
        self.systemctl = Box::new(systemctl);
        self
    }

    pub fn with_user_check(mut self, exists: impl Fn(&str) -> bool + 'static) -> Self {
        self.user_exists = Box::new(exists);
        self
    }

    /// Where `spec`'s unit file goes.
    pub fn unit_path(&self, spec: &UnitSpec) -> PathBuf {
        self.unit_dir.join(&spec.unit_name)
    }

    /// Does `action`; messages go to `out`, systemctl's own output to this
    /// process's stdio. Returns the exit code for the verb: `--status`
    /// passes on systemctl's (3 for a stopped service), the rest 0.
    pub fn perform(
        &self,
        action: Action,
        spec: &UnitSpec,
        out: &mut dyn Write,
    ) -> Result<u8, SystemdError> {
        if action == Action::Print {
            spec.validate()?;
            write_out(out, &render(spec))?;
            return Ok(0);
        }
        self.ensure_systemd()?;
        let unit = spec.unit_name.clone();
        match action {
            Action::Print => unreachable!("handled above"),
            Action::Install => self.install(spec, out)?,
            Action::Uninstall => self.uninstall(spec, out)?,
            Action::Start | Action::Stop | Action::Restart => {
                self.ensure_installed(spec)?;
                self.systemctl(&[&action.to_string(), &unit])?;
                let done = match action {
                    Action::Start => "started",
                    Action::Stop => "stopped",
                    _ => "restarted",
                };
                write_out(out, &format!("{done} {unit}\n"))?;
            }
            Action::Status => {
                self.ensure_installed(spec)?;
                let args = ["status", "--no-pager", "--full", &unit].map(str::to_owned);
                let code = self
                    .systemctl
                    .run(&args)
                    .map_err(|error| self.spawn_error(error))?;
                return Ok(u8::try_from(code).unwrap_or(1));
            }
        }
        Ok(0)
    }

    fn ensure_systemd(&self) -> Result<(), SystemdError> {
        if self.runtime_dir.is_dir() {
            Ok(())
        } else {
            Err(SystemdError::NoSystemd {
                reason: format!("no {}", self.runtime_dir.display()),
            })
        }
    }

    fn ensure_root(&self, action: Action, spec: &UnitSpec) -> Result<(), SystemdError> {
        if self.root {
            Ok(())
        } else {
            Err(SystemdError::NeedsRoot {
                action,
                path: self.unit_path(spec),
            })
        }
    }

    fn ensure_installed(&self, spec: &UnitSpec) -> Result<(), SystemdError> {
        let path = self.unit_path(spec);
        if path.is_file() {
            Ok(())
        } else {
            Err(SystemdError::NotInstalled {
                unit: spec.unit_name.clone(),
                path,
                command: spec.command.clone(),
            })
        }
    }

    fn spawn_error(&self, error: io::Error) -> SystemdError {
        if error.kind() == io::ErrorKind::NotFound {
            SystemdError::NoSystemd {
                reason: "no systemctl".to_owned(),
            }
        } else {
            SystemdError::SystemctlSpawn(error)
        }
    }

    fn systemctl(&self, args: &[&str]) -> Result<(), SystemdError> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let code = self
            .systemctl
            .run(&args)
            .map_err(|error| self.spawn_error(error))?;
        if code == 0 {
            Ok(())
        } else {
            Err(SystemdError::Systemctl {
                args: args.join(" "),
                code,
            })
        }
    }

    fn install(&self, spec: &UnitSpec, out: &mut dyn Write) -> Result<(), SystemdError> {
        self.ensure_root(Action::Install, spec)?;
        spec.validate()?;
        if let Some(exe) = spec.exec_start.first().map(Path::new)
            && hidden_by_protect_home(exe)
        {
            return Err(SystemdError::HiddenExecutable(exe.to_owned()));
        }
        if !(self.user_exists)(&spec.user) {
            return Err(SystemdError::UnknownUser {
                user: spec.user.clone(),
                home: spec.home.display().to_string(),
            });
        }
        if spec.state_directory().is_none() && !spec.home.is_dir() {
            return Err(SystemdError::MissingPath {
                what: "home",
                path: spec.home.clone(),
            });
        }
        for path in &spec.read_write_paths {
            if !path.exists() {
                return Err(SystemdError::MissingPath {
                    what: "read-write path",
                    path: path.clone(),
                });
            }
        }
        let path = self.unit_path(spec);
        let text = render(spec);
        let previous = std::fs::read_to_string(&path).ok();
        if previous.as_deref() != Some(text.as_str()) {
            write_atomically(&path, &text)?;
        }
        self.systemctl(&["daemon-reload"])?;
        self.systemctl(&["enable", &spec.unit_name])?;
        let message = match previous {
            None => format!(
                "installed {} and enabled it; start it with `{} --start`\n",
                path.display(),
                spec.command
            ),
            Some(old) if old == text => format!(
                "{} is already installed as rendered; it stays enabled\n",
                path.display()
            ),
            Some(_) => format!(
                "updated {}; `{} --restart` applies it\n",
                path.display(),
                spec.command
            ),
        };
        write_out(out, &message)
    }

    fn uninstall(&self, spec: &UnitSpec, out: &mut dyn Write) -> Result<(), SystemdError> {
        self.ensure_root(Action::Uninstall, spec)?;
        let path = self.unit_path(spec);
        if !path.exists() {
            return write_out(
                out,
                &format!("{} is not installed; nothing to do\n", spec.unit_name),
            );
        }
        self.systemctl(&["stop", &spec.unit_name])?;
        self.systemctl(&["disable", &spec.unit_name])?;
        std::fs::remove_file(&path).map_err(|source| SystemdError::Io {
            what: "remove",
            path: path.clone(),
            source,
        })?;
        self.systemctl(&["daemon-reload"])?;
        write_out(
            out,
            &format!(
                "uninstalled {}; the home {} is kept\n",
                spec.unit_name,
                spec.home.display()
            ),
        )
    }
}

fn write_out(out: &mut dyn Write, text: &str) -> Result<(), SystemdError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| SystemdError::Io {
            what: "write to",
            path: PathBuf::from("stdout"),
            source,
        })
}

/// Writes `path` through a temporary file in the same directory and a
/// rename, so systemd never reads half a unit. Mode 0644.
fn write_atomically(path: &Path, text: &str) -> Result<(), SystemdError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let io_error = |what, source| SystemdError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().unwrap_or(OsStr::new("unit"));
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut file = tempfile::Builder::new()
        .prefix(&prefix)
        .tempfile_in(dir)
        .map_err(|e| io_error("write", e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| io_error("write", e))?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| io_error("set the mode of", e))?;
    file.as_file()
        .sync_all()
        .map_err(|e| io_error("write", e))?;
    file.persist(path)
        .map_err(|e| io_error("replace", e.error))?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Builds the unit for `program` from `args` and `home`.
pub fn unit_for(
    program: &Program,
    args: &ServiceArgs,
    exe: &Path,
    home: &Path,
) -> Result<UnitSpec, SystemdError> {
    let installation = Installation::new(program, args, exe, home)?;
    match program {
        Program::Agent {
            shutdown_grace,
            kill_grace,
        } => agent_unit(&installation, *shutdown_grace, *kill_grace),
        Program::Hub { server_args } => hub_unit(&installation, server_args),
    }
}

/// The whole `service` verb on this host: the unit runs this executable
/// (`std::env::current_exe`) with `home`; messages go to stdout. Returns the
/// process's exit code.
pub fn run(program: &Program, args: &ServiceArgs, home: &Path) -> Result<ExitCode, SystemdError> {
    let exe = std::env::current_exe().map_err(SystemdError::CurrentExe)?;
    let spec = unit_for(program, args, &exe, home)?;
    let code = ServiceManager::system().perform(args.action(), &spec, &mut io::stdout().lock())?;
    Ok(ExitCode::from(code))
}

#[cfg(test)]
mod tests;
