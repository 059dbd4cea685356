//! The tickets this agent completed and then forgot: once `CompleteScript`
//! or the cleaner deletes a workspace, the ticket's result lives on here, so
//! a repeated `StartScript` is answered with that result instead of running
//! the script again.
//!
//! The record is one append-only text file in the work root,
//! [`FILE_NAME`], one line per ticket:
//!
//! ```text
//! <ticket> <exit code> <completed ms> <recorded ms>\n
//! ```
//!
//! Tickets are `[A-Za-z0-9._-]`, so a space can never be part of one. The
//! name starts with a dot, which no ticket may, so the file can never be
//! mistaken for a workspace.
//!
//! Architecture Invariant: an entry is on disk and synced before the
//! workspace it stands for is deleted, so at every moment a completed ticket
//! is known by its workspace, its entry, or both.
//!
//! Crashes: only the last line can be torn, and only a line that ends in a
//! newline counts, so a torn line is ignored (it could otherwise parse as a
//! shorter number). Lines that do not parse are skipped and counted; the
//! file is then rewritten with what was kept.
//!
//! Bounds: at most `max_entries` entries, each for at most `max_age` after it
//! was recorded; oldest first. The file is rewritten to just those entries
//! (through a temporary file and a rename) at load and whenever dead lines
//! outnumber live ones by [`COMPACT_SLACK`] or more, so it never holds more
//! than `2 × max_entries + COMPACT_SLACK` lines of at most [`MAX_LINE_BYTES`].

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::Ticket;

/// The record's file name inside the work root.
pub const FILE_NAME: &str = ".tentacle-completed-tickets";
const TEMP_NAME: &str = ".tentacle-completed-tickets.tmp";

/// A longer line cannot be an entry: a 128-byte ticket and three numbers
/// with their signs fit in under 200 bytes.
pub const MAX_LINE_BYTES: usize = 256;

/// Dead lines tolerated before a rewrite even when few entries are live, so
/// a small record is not rewritten on every append.
pub const COMPACT_SLACK: usize = 1024;

/// What is remembered of a forgotten ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    pub exit_code: i32,
    /// When the script completed, in milliseconds since the Unix epoch.
    pub completed_ms: i64,
    /// When the workspace was forgotten and the entry written. The age bound
    /// counts from here, so a ticket is refused for the whole life of its
    /// workspace plus `max_age`, whatever the cleaner's settings.
    pub recorded_ms: i64,
}

/// How much is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Entries kept; the oldest go first. 0 keeps none.
    pub max_entries: usize,
    /// Entries older than this are dropped.
    pub max_age: Duration,
}

/// What a load found in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Entries now remembered.
    pub kept: usize,
    /// Lines that were not an entry: garbage, overlong, or a torn last line.
    pub unreadable_lines: usize,
}

/// The record of forgotten tickets; shared by every call on one work root.
#[derive(Debug)]
pub struct Tombstone {
    dir: PathBuf,
    path: PathBuf,
    temp: PathBuf,
    bounds: Bounds,
    /// [`COMPACT_SLACK`]; smaller in tests.
    compact_slack: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The file has been read. Until then it is never rewritten, so a file
    /// that could not be read is not replaced by what memory happens to hold.
    loaded: bool,
    /// A failed read was already logged; keeps a broken file from logging on
    /// every call that retries it.
    read_error_logged: bool,
    /// Oldest first, in the order they were recorded. `entries[i]` has
    /// sequence `first_seq + i`.
    entries: VecDeque<(Ticket, Completed)>,
    first_seq: u64,
    /// The sequence of each ticket's newest entry.
    newest: HashMap<Ticket, u64>,
    /// Lines in the file, live or not; decides when to rewrite it.
    file_lines: usize,
    /// The file may end without a newline, which the next append must not
    /// extend.
    torn_tail: bool,
}

impl State {
    fn push(&mut self, ticket: Ticket, completed: Completed) {
        let seq = self.first_seq + self.entries.len() as u64;
        self.newest.insert(ticket.clone(), seq);
        self.entries.push_back((ticket, completed));
    }

    fn pop_front(&mut self) {
        if let Some((ticket, _)) = self.entries.pop_front() {
            if self.newest.get(&ticket) == Some(&self.first_seq) {
                self.newest.remove(&ticket);
            }
            self.first_seq += 1;
        }
    }

    /// Drops the oldest entries while there are too many or they are too old.
    fn enforce(&mut self, bounds: Bounds, now_ms: i64) {
        let cutoff = cutoff(bounds, now_ms);
        while self.entries.len() > bounds.max_entries
            || self
                .entries
                .front()
                .is_some_and(|(_, c)| c.recorded_ms < cutoff)
        {
            self.pop_front();
        }
    }

    fn get(&self, ticket: &Ticket, cutoff: i64) -> Option<Completed> {
        let seq = *self.newest.get(ticket)?;
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        let (_, completed) = self.entries.get(index)?;
        // An entry behind a newer one is not dropped by `enforce`; the wall
        // clock can step back, so check each entry's own age too.
        (completed.recorded_ms >= cutoff).then_some(*completed)
    }

    /// Entries still in force, oldest first.
    fn live(&self, cutoff: i64) -> impl Iterator<Item = &(Ticket, Completed)> + '_ {
        self.entries
            .iter()
            .zip(self.first_seq..)
            .filter(move |((ticket, completed), seq)| {
                self.newest.get(ticket) == Some(seq) && completed.recorded_ms >= cutoff
            })
            .map(|(entry, _)| entry)
    }
}

fn cutoff(bounds: Bounds, now_ms: i64) -> i64 {
    let age_ms = i64::try_from(bounds.max_age.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_sub(age_ms)
}

impl Tombstone {
    /// The record in `work_root`; nothing is read until it is first used.
    pub fn new(work_root: &Path, bounds: Bounds) -> Self {
        Self {
            dir: work_root.to_owned(),
            path: work_root.join(FILE_NAME),
            temp: work_root.join(TEMP_NAME),
            bounds,
            compact_slack: COMPACT_SLACK,
            state: Mutex::new(State::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file afresh and rewrites it if anything in it was dropped.
    /// A file that cannot be read leaves memory as it was, and if it was
    /// never read, it is tried again on next use.
    pub fn load(&self, now_ms: i64) -> io::Result<Loaded> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.load_locked(&mut state, now_ms)
    }

    fn load_locked(&self, state: &mut State, now_ms: i64) -> io::Result<Loaded> {
        let (fresh, unreadable_lines) = read_file(&self.path, self.bounds, now_ms)?;
        *state = fresh;
        let kept = state.live(cutoff(self.bounds, now_ms)).count();
        if (state.file_lines != kept || state.torn_tail)
            && let Err(error) = self.compact(state, now_ms)
        {
            tracing::warn!(path = %self.path.display(), %error, "could not rewrite the record of completed tickets; it is still usable as it is");
        }
        Ok(Loaded {
            kept,
            unreadable_lines,
        })
    }

    /// Reads the file on first use; logs a failure once and tries again on
    /// the next call.
    fn ensure_loaded(&self, state: &mut State, now_ms: i64) {
        if state.loaded {
            return;
        }
        match self.load_locked(state, now_ms) {
            Ok(_) => {}
            Err(error) => {
                if !state.read_error_logged {
                    state.read_error_logged = true;
                    tracing::error!(path = %self.path.display(), %error, "could not read the record of completed tickets; tickets in it may run again until it can be read");
                }
            }
        }
    }

    /// The result of `ticket`, if it was forgotten within the bounds.
    pub fn lookup(&self, ticket: &Ticket, now_ms: i64) -> Option<Completed> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.ensure_loaded(&mut state, now_ms);
        state.get(ticket, cutoff(self.bounds, now_ms))
    }

    /// Entries in force now.
    pub fn count(&self, now_ms: i64) -> usize {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.ensure_loaded(&mut state, now_ms);
        state.live(cutoff(self.bounds, now_ms)).count()
    }

    /// Remembers `ticket` and syncs it to disk. When this fails the caller
    /// must keep the workspace, or the ticket could run again.
    pub fn record(&self, ticket: &Ticket, completed: Completed) -> io::Result<()> {
        if self.bounds.max_entries == 0 {
            return Ok(());
        }
        let now_ms = completed.recorded_ms;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.ensure_loaded(&mut state, now_ms);
        if state.get(ticket, cutoff(self.bounds, now_ms)).is_some() {
            // Two forgets of one run (CompleteScript racing the cleaner):
            // the first entry stands.
            return Ok(());
        }
        // Unsure how the file ends: start on a fresh line. The empty line
        // this may leave is skipped on load.
        let fresh_line = state.torn_tail || !state.loaded;
        let mut line = String::with_capacity(MAX_LINE_BYTES);
        if fresh_line {
            line.push('\n');
        }
        line.push_str(&format_line(ticket, &completed));
        if let Err(error) = self.append(line.as_bytes()) {
            // Part of the line may have reached the file.
            state.torn_tail = true;
            return Err(error);
        }
        state.torn_tail = false;
        state.file_lines += 1 + usize::from(fresh_line);
        state.push(ticket.clone(), completed);
        state.enforce(self.bounds, now_ms);
        let live = state.newest.len();
        if state.loaded
            && state.file_lines >= live + live.max(self.compact_slack)
            && let Err(error) = self.compact(&mut state, now_ms)
        {
            tracing::warn!(path = %self.path.display(), %error, "could not rewrite the record of completed tickets; it keeps growing until it can be");
        }
        Ok(())
    }

    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let existed = fs::symlink_metadata(&self.path).is_ok();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        if !existed {
            // A new file's name is durable only once its directory is.
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Rewrites the file to the live entries, through a rename so a crash
    /// leaves either the old file or the new one.
    fn compact(&self, state: &mut State, now_ms: i64) -> io::Result<()> {
        let cutoff = cutoff(self.bounds, now_ms);
        let live: Vec<(Ticket, Completed)> = state.live(cutoff).cloned().collect();
        let mut text = String::with_capacity(live.len() * 64);
        for (ticket, completed) in &live {
            text.push_str(&format_line(ticket, completed));
        }
        {
            let mut temp = File::create(&self.temp)?;
            temp.write_all(text.as_bytes())?;
            temp.sync_all()?;
        }
        fs::rename(&self.temp, &self.path)?;
        // The file is the new one from here on, whether or not the
        // directory sync below succeeds.
        state.entries.clear();
        state.newest.clear();
        state.first_seq = 0;
        state.file_lines = live.len();
        state.torn_tail = false;
        for (ticket, completed) in live {
            state.push(ticket, completed);
        }
        sync_dir(&self.dir)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn format_line(ticket: &Ticket, completed: &Completed) -> String {
    format!(
        "{ticket} {} {} {}\n",
        completed.exit_code, completed.completed_ms, completed.recorded_ms
    )
}

fn parse_line(line: &[u8]) -> Option<(Ticket, Completed)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut fields = text.split(' ');
    let ticket = Ticket::parse(fields.next()?).ok()?;
    let completed = Completed {
        exit_code: fields.next()?.parse().ok()?,
        completed_ms: fields.next()?.parse().ok()?,
        recorded_ms: fields.next()?.parse().ok()?,
    };
    fields.next().is_none().then_some((ticket, completed))
}

/// The entries in `path` within `bounds`, and how many lines were not
/// entries. A missing file is an empty record.
fn read_file(path: &Path, bounds: Bounds, now_ms: i64) -> io::Result<(State, usize)> {
    let mut state = State {
        loaded: true,
        ..State::default()
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok((state, 0)),
        Err(error) => return Err(error),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::with_capacity(MAX_LINE_BYTES + 1);
    let mut unreadable = 0;
    while let Some(terminated) = next_line(&mut reader, &mut line)? {
        state.file_lines += 1;
        if !terminated {
            // Only ever the last line: the agent stopped while appending it.
            state.torn_tail = true;
            unreadable += 1;
            break;
        }
        if line.len() > MAX_LINE_BYTES || line.last() != Some(&b'\n') {
            unreadable += 1;
            continue;
        }
        let body = &line[..line.len() - 1];
        if body.is_empty() {
            continue;
        }
        match parse_line(body) {
            Some((ticket, completed)) => {
                state.push(ticket, completed);
                state.enforce(bounds, now_ms);
            }
            None => unreadable += 1,
        }
    }
    Ok((state, unreadable))
}

/// Reads the next line into `line`, newline included, keeping at most
/// [`MAX_LINE_BYTES`] + 1 bytes of it so garbage without newlines cannot
/// fill memory. `None` at the end; `Some(false)` for a last line without a
/// newline, `Some(true)` for a line that ended in one (which an overlong
/// line's kept part may lack).
fn next_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> io::Result<Option<bool>> {
    line.clear();
    let mut read_any = false;
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(read_any.then_some(false));
        }
        read_any = true;
        let (chunk_len, done) = match available.iter().position(|b| *b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        // Past the cap the rest of the line is dropped; the caller sees a
        // line longer than any entry and skips it.
        let room = (MAX_LINE_BYTES + 1).saturating_sub(line.len());
        line.extend_from_slice(&available[..chunk_len.min(room)]);
        reader.consume(chunk_len);
        if done {
            return Ok(Some(true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 24 * 60 * 60 * 1000;

    fn bounds(max_entries: usize, max_age_days: u64) -> Bounds {
        Bounds {
            max_entries,
            max_age: Duration::from_secs(max_age_days * 24 * 60 * 60),
        }
    }

    fn ticket(name: &str) -> Ticket {
        Ticket::parse(name).expect("ticket")
    }

    fn done(exit_code: i32, recorded_ms: i64) -> Completed {
        Completed {
            exit_code,
            completed_ms: recorded_ms - 5,
            recorded_ms,
        }
    }

    #[test]
    fn entries_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Tombstone::new(dir.path(), bounds(10, 7));
        record.record(&ticket("a"), done(3, 1000)).expect("record");
        record
            .record(&ticket("b"), done(-43, 2000))
            .expect("record");
        let again = Tombstone::new(dir.path(), bounds(10, 7));
        assert_eq!(
            again.load(3000).expect("load"),
            Loaded {
                kept: 2,
                unreadable_lines: 0
            }
        );
        assert_eq!(again.lookup(&ticket("a"), 3000), Some(done(3, 1000)));
        assert_eq!(again.lookup(&ticket("b"), 3000), Some(done(-43, 2000)));
        assert_eq!(again.lookup(&ticket("c"), 3000), None);
    }

    #[test]
    fn the_count_bound_evicts_the_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Tombstone::new(dir.path(), bounds(3, 7));
        for (i, name) in ["t1", "t2", "t3", "t4", "t5"].iter().enumerate() {
            record
                .record(&ticket(name), done(0, 1000 + i as i64))
                .expect("record");
        }
        let now = 2000;
        assert_eq!(record.count(now), 3);
        assert_eq!(record.lookup(&ticket("t1"), now), None);
        assert_eq!(record.lookup(&ticket("t2"), now), None);
        for kept in ["t3", "t4", "t5"] {
            assert!(record.lookup(&ticket(kept), now).is_some(), "{kept}");
        }
        // The file still holds the evicted lines until it is compacted; a
        // reload applies the same bound, so they stay gone.
        let again = Tombstone::new(dir.path(), bounds(3, 7));
        assert_eq!(again.load(now).expect("load").kept, 3);
        assert_eq!(again.lookup(&ticket("t2"), now), None);
        assert!(again.lookup(&ticket("t3"), now).is_some());
        // The load rewrote the file to the live entries only.
        let text = fs::read_to_string(again.path()).expect("read");
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn the_age_bound_drops_old_entries_now_and_after_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Tombstone::new(dir.path(), bounds(100, 7));
        let start = 100 * DAY_MS;
        record
            .record(&ticket("old"), done(1, start))
            .expect("record");
        record
            .record(&ticket("young"), done(2, start + 5 * DAY_MS))
            .expect("record");
        let later = start + 8 * DAY_MS;
        assert_eq!(record.lookup(&ticket("old"), later), None, "8 days old");
        assert_eq!(
            record.lookup(&ticket("young"), later).map(|c| c.exit_code),
            Some(2),
            "3 days old"
        );
        let again = Tombstone::new(dir.path(), bounds(100, 7));
        assert_eq!(again.load(later).expect("load").kept, 1);
        assert_eq!(again.lookup(&ticket("old"), later), None);
        assert!(again.lookup(&ticket("young"), later).is_some());
    }

    #[test]
    fn torn_and_garbage_lines_are_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"good1 4 10 20\n");
        bytes.extend_from_slice(b"\xff\xfe not utf-8\n");
        bytes.extend_from_slice(b"bad/ticket 1 2 3\n");
        bytes.extend_from_slice(b"good2 5 10 20 extra\n");
        bytes.extend_from_slice(&[b'x'; 10_000]);
        bytes.push(b'\n');
        bytes.extend_from_slice(b"good3 6 10 20\n");
        // Torn: "good4 7 10 2000" cut short would read as recorded at 2.
        bytes.extend_from_slice(b"good4 7 10 2");
        fs::write(&path, &bytes).expect("write");
        let record = Tombstone::new(dir.path(), bounds(100, 7));
        let loaded = record.load(30).expect("load");
        assert_eq!(
            loaded,
            Loaded {
                kept: 2,
                unreadable_lines: 5
            }
        );
        assert_eq!(record.lookup(&ticket("good1"), 30), Some(done_at(4)));
        assert_eq!(record.lookup(&ticket("good3"), 30), Some(done_at(6)));
        assert_eq!(record.lookup(&ticket("good2"), 30), None);
        assert_eq!(record.lookup(&ticket("good4"), 30), None);
        // Rewritten clean, and appends land on lines of their own.
        record.record(&ticket("next"), done(8, 40)).expect("record");
        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(text, "good1 4 10 20\ngood3 6 10 20\nnext 8 35 40\n");
    }

    fn done_at(exit_code: i32) -> Completed {
        Completed {
            exit_code,
            completed_ms: 10,
            recorded_ms: 20,
        }
    }

    #[test]
    fn an_append_after_a_torn_tail_that_could_not_be_rewritten_starts_a_new_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        fs::write(&path, b"kept 1 10 20\ntorn 2 1").expect("write");
        // A directory where the rewrite's temporary file goes makes the
        // rewrite fail, so the torn tail stays in the file.
        fs::create_dir(dir.path().join(TEMP_NAME)).expect("block the rewrite");
        let record = Tombstone::new(dir.path(), bounds(100, 7));
        assert_eq!(record.load(30).expect("load").kept, 1);
        record
            .record(&ticket("later"), done(3, 40))
            .expect("record");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "kept 1 10 20\ntorn 2 1\nlater 3 35 40\n"
        );
        let again = Tombstone::new(dir.path(), bounds(100, 7));
        assert_eq!(
            again.load(50).expect("load"),
            Loaded {
                kept: 2,
                unreadable_lines: 1
            }
        );
        assert_eq!(again.lookup(&ticket("later"), 50), Some(done(3, 40)));
        assert_eq!(again.lookup(&ticket("torn"), 50), None);
    }

    #[test]
    fn the_file_stays_bounded_by_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let max = 10;
        let slack = 16;
        let mut record = Tombstone::new(dir.path(), bounds(max, 7));
        record.compact_slack = slack;
        let mut longest = 0;
        for i in 0..200i64 {
            record
                .record(&ticket(&format!("t{i}")), done(0, 1000 + i))
                .expect("record");
            let lines = fs::read_to_string(record.path())
                .expect("read")
                .lines()
                .count();
            assert!(lines <= 2 * max + slack, "{lines} lines at {i}");
            longest = longest.max(lines);
        }
        // It did grow past the live entries before each rewrite.
        assert!(longest > max, "{longest}");
        assert_eq!(record.count(10_000), max);
        assert!(record.lookup(&ticket("t199"), 10_000).is_some());
        assert!(record.lookup(&ticket("t190"), 10_000).is_some());
        assert!(record.lookup(&ticket("t189"), 10_000).is_none());
    }

    #[test]
    fn a_repeated_record_keeps_the_first_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Tombstone::new(dir.path(), bounds(10, 7));
        record.record(&ticket("a"), done(3, 1000)).expect("record");
        record.record(&ticket("a"), done(9, 2000)).expect("again");
        assert_eq!(record.lookup(&ticket("a"), 3000), Some(done(3, 1000)));
        let text = fs::read_to_string(record.path()).expect("read");
        assert_eq!(text.lines().count(), 1, "{text}");
    }

    #[test]
    fn zero_entries_keeps_nothing_and_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Tombstone::new(dir.path(), bounds(0, 7));
        record.record(&ticket("a"), done(3, 1000)).expect("record");
        assert_eq!(record.lookup(&ticket("a"), 1000), None);
        assert!(!record.path().exists());
    }
}
