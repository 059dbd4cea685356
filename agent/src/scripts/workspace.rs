//! The directory a script runs in: the script file, its extra files, the
//! output log, the state file, and for a detached script the records of its
//! host and of how it ended.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Ticket;

/// File names the agent keeps for itself; extra files may not use the prefix.
pub const RESERVED_PREFIX: &str = "tentacle-";
const STATE_FILE: &str = "tentacle-state.json";
const OUTPUT_LOG: &str = "tentacle-output.log";
/// Which process hosts a detached script ([`super::host::HostRecord`]).
const HOST_RECORD: &str = "tentacle-host.json";
/// How a detached script ended ([`super::host::ExitRecord`]).
const EXIT_RECORD: &str = "tentacle-exit.json";

/// Where a script is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Running,
    Complete,
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub ticket: String,
    pub phase: Phase,
    pub exit_code: i32,
    pub created_ms: i64,
    pub completed_ms: Option<i64>,
    /// The isolation mutex a running script holds, so an agent that
    /// re-attaches to it takes the mutex again before serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutex: Option<HeldMutex>,
    /// When a running script's execution timeout expires, so it still
    /// applies after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

/// An isolation mutex a script holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMutex {
    pub name: String,
    pub exclusive: bool,
}

/// One ticket's directory under the agent's work root.
#[derive(Debug, Clone)]
pub struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    /// Creates the directory; fails if it already exists.
    pub fn create(work_root: &Path, ticket: &Ticket) -> io::Result<Self> {
        fs::create_dir_all(work_root)?;
        let dir = work_root.join(ticket.as_str());
        fs::create_dir(&dir)?;
        Ok(Self { dir })
    }

    pub fn open(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn output_log(&self) -> PathBuf {
        self.dir.join(OUTPUT_LOG)
    }

    pub fn host_record(&self) -> PathBuf {
        self.dir.join(HOST_RECORD)
    }

    pub fn exit_record(&self) -> PathBuf {
        self.dir.join(EXIT_RECORD)
    }

    pub fn script_path(&self, extension: &str) -> PathBuf {
        self.dir
            .join(format!("{RESERVED_PREFIX}script.{extension}"))
    }

    /// Writes an extra file; `name` must already be validated.
    pub fn write_file(&self, name: &str, content: &[u8]) -> io::Result<()> {
        fs::write(self.dir.join(name), content)
    }

    pub fn read_state(&self) -> io::Result<StateFile> {
        let bytes = fs::read(self.dir.join(STATE_FILE))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    /// Replaces the state file through a rename, so it is never half written.
    pub fn write_state(&self, state: &StateFile) -> io::Result<()> {
        let temp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        fs::write(&temp, serde_json::to_vec(state).map_err(io::Error::other)?)?;
        fs::rename(temp, self.dir.join(STATE_FILE))
    }

    pub fn delete(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// An extra file name the agent will not write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFileName {
    #[error("extra file name `{0}` is not valid: use a plain file name without `/`")]
    NotPlain(String),
    #[error(
        "extra file name `{0}` is reserved: names starting with `{RESERVED_PREFIX}` belong to the agent"
    )]
    Reserved(String),
}

/// Checks that an extra file's name is a plain name the agent does not use.
pub fn validate_file_name(name: &str) -> Result<(), InvalidFileName> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255;
    if !plain {
        return Err(InvalidFileName::NotPlain(name.to_owned()));
    }
    if name.starts_with(RESERVED_PREFIX) || name.starts_with(&format!(".{RESERVED_PREFIX}")) {
        return Err(InvalidFileName::Reserved(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_extra_names_are_checked() {
        let root = tempfile::tempdir().expect("tempdir");
        let ticket = Ticket::parse("t1").expect("ticket");
        let ws = Workspace::create(root.path(), &ticket).expect("create");
        assert!(Workspace::create(root.path(), &ticket).is_err(), "exists");
        let state = StateFile {
            ticket: "t1".into(),
            phase: Phase::Running,
            exit_code: 0,
            created_ms: 1,
            completed_ms: None,
            mutex: None,
            deadline_ms: None,
        };
        ws.write_state(&state).expect("write");
        assert_eq!(ws.read_state().expect("read"), state);
        assert!(validate_file_name("app.conf").is_ok());
        for bad in ["", "..", "a/b"] {
            assert_eq!(
                validate_file_name(bad),
                Err(InvalidFileName::NotPlain(bad.into())),
                "{bad}"
            );
        }
        let reserved = validate_file_name("tentacle-state.json").expect_err("reserved");
        assert_eq!(
            reserved.to_string(),
            "extra file name `tentacle-state.json` is reserved: names starting with `tentacle-` belong to the agent"
        );
        let slash = validate_file_name("a/b").expect_err("slash");
        assert!(slash.to_string().contains("without `/`"), "{slash}");
        ws.delete().expect("delete");
        assert!(!ws.dir().exists());
    }
}
