//! A script's output: an append-only JSON-lines file plus an in-memory index
//! of where each line starts, so any range of sequences can be read back
//! without holding the output in memory.
//!
//! Architecture Invariant: sequences start at 1 and increase by one per line;
//! a line is on disk (flushed to the file) before its sequence is published,
//! so a reader never sees a sequence it cannot read.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    Agent,
}

/// One stored line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub seq: u64,
    pub stream: Stream,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub text: String,
}

/// Limits for one read.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimit {
    pub max_lines: usize,
    /// At least one line is returned even if it alone is larger.
    pub max_bytes: usize,
}

#[derive(Debug)]
struct Index {
    file: File,
    /// Byte offset of each line; `offsets[i]` is the line with sequence i+1.
    offsets: Vec<u64>,
    end: u64,
}

impl Index {
    /// Indexes complete lines past `end`. With `cut_torn_tail`, a partial
    /// last line is cut off (its writer is gone and this one appends next).
    fn catch_up(&mut self, cut_torn_tail: bool) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        if len > self.end {
            let mut reader = BufReader::new(&self.file);
            reader.seek(SeekFrom::Start(self.end))?;
            let mut reader = reader.take(len - self.end);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                self.offsets.push(self.end);
                self.end += n as u64;
            }
        }
        if cut_torn_tail && len != self.end {
            self.file.set_len(self.end)?;
        }
        Ok(())
    }
}

/// The output of one script.
#[derive(Debug, Clone)]
pub struct ScriptLog {
    path: PathBuf,
    index: Arc<Mutex<Index>>,
    last_seq: watch::Sender<u64>,
}

impl ScriptLog {
    /// Creates the file, or opens an existing one and indexes it. A torn last
    /// line (the agent died mid-write) is cut off: the caller is the file's
    /// only writer from now on.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, true)
    }

    /// Opens a log that another process (a detached script's host) is
    /// still writing: complete lines are indexed, a partial last line is
    /// left for its writer to finish, and [`ScriptLog::catch_up`] indexes
    /// what it appends later.
    pub fn open_following(path: &Path) -> io::Result<Self> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, cut_torn_tail: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let mut index = Index {
            file,
            offsets: Vec::new(),
            end: 0,
        };
        index.catch_up(cut_torn_tail)?;
        let last = index.offsets.len() as u64;
        Ok(Self {
            path: path.to_owned(),
            index: Arc::new(Mutex::new(index)),
            last_seq: watch::Sender::new(last),
        })
    }

    /// Indexes and publishes the complete lines another process appended
    /// since the last look; returns the newest sequence.
    pub fn catch_up(&self) -> io::Result<u64> {
        let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        index.catch_up(false)?;
        let last = index.offsets.len() as u64;
        drop(index);
        self.last_seq.send_if_modified(|seq| {
            let changed = *seq != last;
            *seq = last;
            changed
        });
        Ok(last)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence of the newest line, 0 when there is none.
    pub fn last_sequence(&self) -> u64 {
        *self.last_seq.borrow()
    }

    /// Wakes on every newly published line.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.last_seq.subscribe()
    }

    /// Appends lines in order and publishes their sequences.
    pub fn append(&self, lines: impl IntoIterator<Item = (Stream, String)>) -> io::Result<u64> {
        let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        // A detached script's host may have written since this handle last
        // looked; it is gone whenever the agent itself appends, so what it
        // left half written is cut.
        index.catch_up(true)?;
        let time_ms = now_ms();
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        let mut seq = index.offsets.len() as u64;
        for (stream, text) in lines {
            seq += 1;
            offsets.push(index.end + buf.len() as u64);
            let record = LogRecord {
                seq,
                stream,
                time_ms,
                text,
            };
            serde_json::to_writer(&mut buf, &record).map_err(io::Error::other)?;
            buf.push(b'\n');
        }
        if buf.is_empty() {
            return Ok(seq);
        }
        index.file.write_all(&buf)?;
        index.end += buf.len() as u64;
        index.offsets.extend(offsets);
        drop(index);
        self.last_seq.send_replace(seq);
        Ok(seq)
    }

    /// Lines with a sequence greater than `after`, within `limit`.
    pub fn read_after(&self, after: u64, limit: ReadLimit) -> io::Result<Vec<LogRecord>> {
        let (start, end, file) = {
            let index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
            let first = usize::try_from(after).unwrap_or(usize::MAX);
            if first >= index.offsets.len() || limit.max_lines == 0 {
                return Ok(Vec::new());
            }
            let last = index
                .offsets
                .len()
                .min(first.saturating_add(limit.max_lines));
            let start = index.offsets[first];
            let end = index.offsets.get(last).copied().unwrap_or(index.end);
            (start, end, index.file.try_clone()?)
        };
        // Read no more than the byte limit (plus one line's worth, so one
        // oversized line still comes through).
        let wanted = (end - start).min(limit.max_bytes as u64 + MAX_RECORD_OVERHEAD);
        let mut bytes = vec![0u8; usize::try_from(wanted).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut bytes, start)?;
        let mut records = Vec::new();
        let mut used = 0usize;
        for raw in bytes.split_inclusive(|b| *b == b'\n') {
            if raw.last() != Some(&b'\n') {
                break;
            }
            if !records.is_empty() && used + raw.len() > limit.max_bytes {
                break;
            }
            used += raw.len();
            let record: LogRecord = serde_json::from_slice(raw).map_err(io::Error::other)?;
            records.push(record);
        }
        if records.is_empty() && end > start {
            // A single line larger than the read window: read it whole.
            let mut reader = BufReader::new(file);
            reader.seek(SeekFrom::Start(start))?;
            let mut raw = Vec::new();
            reader
                .by_ref()
                .take(end - start)
                .read_until(b'\n', &mut raw)?;
            records.push(serde_json::from_slice(&raw).map_err(io::Error::other)?);
        }
        Ok(records)
    }
}

/// Room for the JSON framing around a line's text.
const MAX_RECORD_OVERHEAD: u64 = 256;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: ReadLimit = ReadLimit {
        max_lines: usize::MAX,
        max_bytes: usize::MAX / 2,
    };

    #[test]
    fn sequences_are_dense_and_reads_resume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ScriptLog::open(&dir.path().join("output.log")).expect("open");
        let rx = log.subscribe();
        log.append([
            (Stream::Stdout, "one".into()),
            (Stream::Stderr, "two".into()),
        ])
        .expect("append");
        assert!(rx.has_changed().expect("alive"));
        log.append([(Stream::Agent, "three".into())])
            .expect("append");
        let all = log.read_after(0, ALL).expect("read");
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(all[1].stream, Stream::Stderr);
        let rest = log.read_after(2, ALL).expect("read");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].text, "three");
        assert!(log.read_after(3, ALL).expect("read").is_empty());
        let page = log
            .read_after(
                0,
                ReadLimit {
                    max_lines: 2,
                    max_bytes: 1 << 20,
                },
            )
            .expect("read");
        assert_eq!(page.len(), 2);
    }

    #[test]
    fn byte_limit_still_returns_one_oversized_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = ScriptLog::open(&dir.path().join("output.log")).expect("open");
        log.append([
            (Stream::Stdout, "x".repeat(5000)),
            (Stream::Stdout, "y".into()),
        ])
        .expect("append");
        let page = log
            .read_after(
                0,
                ReadLimit {
                    max_lines: 10,
                    max_bytes: 10,
                },
            )
            .expect("read");
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].text.len(), 5000);
    }

    #[test]
    fn reopening_reindexes_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        {
            let log = ScriptLog::open(&path).expect("open");
            log.append([(Stream::Stdout, "kept".into())])
                .expect("append");
        }
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"seq\":2,\"str"))
            .expect("tear");
        let log = ScriptLog::open(&path).expect("reopen");
        assert_eq!(log.last_sequence(), 1);
        log.append([(Stream::Agent, "after".into())])
            .expect("append");
        let all = log.read_after(0, ALL).expect("read");
        assert_eq!(
            all.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
            ["kept", "after"]
        );
        assert_eq!(all[1].seq, 2);
    }

    #[test]
    fn a_follower_indexes_another_writers_lines_and_leaves_its_partial_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("output.log");
        let writer = ScriptLog::open(&path).expect("writer");
        writer
            .append([(Stream::Stdout, "one".into())])
            .expect("append");
        // The writer is mid-line when the follower opens the file.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"seq\":2,\"str"))
            .expect("partial");
        let follower = ScriptLog::open_following(&path).expect("follow");
        assert_eq!(follower.last_sequence(), 1);
        let rx = follower.subscribe();
        // Not cut: its writer finishes it.
        let partial = br#"eam":"stdout","time_ms":5,"text":"two"}"#;
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(partial)?;
                f.write_all(b"\n")
            })
            .expect("finish the line");
        assert!(!rx.has_changed().expect("alive"), "nothing published yet");
        assert_eq!(follower.catch_up().expect("catch up"), 2);
        assert!(rx.has_changed().expect("alive"));
        assert_eq!(follower.catch_up().expect("again"), 2, "idempotent");
        // Once the other writer is gone, the follower appends after it.
        follower
            .append([(Stream::Agent, "three".into())])
            .expect("append");
        let all = follower.read_after(0, ALL).expect("read");
        assert_eq!(
            all.iter()
                .map(|r| (r.seq, r.text.as_str()))
                .collect::<Vec<_>>(),
            [(1, "one"), (2, "two"), (3, "three")]
        );
    }
}
