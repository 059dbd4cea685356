use super::*;

#[test]
fn upsert_list_and_remove_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = AgentTrustFile::new(dir.path().join("agents.toml"));
    assert!(file.load().expect("empty").is_empty());
    let a = TrustedAgent {
        thumbprint: Thumbprint::of_der(b"a"),
        name: "web-01".into(),
        mode: AgentMode::Polling,
        address: None,
        roles: vec!["web".into()],
        environments: vec!["prod".into()],
        previous_thumbprint: None,
        retire_previous_at: None,
    };
    assert!(a.matches("web", "prod") && a.matches("", "") && !a.matches("db", ""));
    file.upsert(a.clone()).expect("add");
    let mut renamed = a.clone();
    renamed.name = "web-02".into();
    file.upsert(renamed.clone()).expect("replace");
    assert_eq!(file.load().expect("load"), [renamed]);
    assert!(file.remove(&a.thumbprint).expect("remove"));
    assert!(!file.remove(&a.thumbprint).expect("again"));
}

fn agent(name: &str) -> TrustedAgent {
    TrustedAgent {
        thumbprint: Thumbprint::of_der(name.as_bytes()),
        name: name.into(),
        mode: AgentMode::Polling,
        address: None,
        roles: Vec::new(),
        environments: Vec::new(),
        previous_thumbprint: None,
        retire_previous_at: None,
    }
}

/// The hub and a `server trust` command in another process each hold
/// their own handle on the file; the cache never hides the other's edit.
#[test]
fn a_cached_load_still_sees_another_writers_edits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agents.toml");
    let hub = AgentTrustFile::new(&path);
    let cli = AgentTrustFile::new(&path);
    hub.upsert(agent("web-01")).expect("hub adds");
    assert_eq!(hub.load().expect("cached"), [agent("web-01")]);
    // Same length, written at once: only the inode tells them apart.
    cli.save(&[agent("web-02")]).expect("cli replaces");
    assert_eq!(hub.load().expect("reloaded"), [agent("web-02")]);
    cli.upsert(agent("web-03")).expect("cli adds");
    hub.upsert(agent("web-04")).expect("hub adds again");
    let names: Vec<String> = cli
        .load()
        .expect("load")
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["web-02", "web-03", "web-04"]);
}

/// A registration may not take a name from another agent, but the same
/// agent (by either thumbprint while it rotates) may register again.
#[test]
fn a_registration_takes_no_name_from_another_agent() {
    let mut agents = vec![agent("web-01")];
    let mut impostor = agent("web-01");
    impostor.thumbprint = Thumbprint::of_der(b"impostor");
    assert_eq!(
        register_into(&mut agents, impostor.clone()),
        Err(NameTaken {
            name: "web-01".into(),
            owner: agent("web-01").thumbprint,
        })
    );
    assert_eq!(agents, [agent("web-01")], "unchanged");

    let mut again = agent("web-01");
    again.roles = vec!["db".into()];
    register_into(&mut agents, again.clone()).expect("the same agent");
    assert_eq!(agents, [again.clone()]);

    let mut rotated = again.clone();
    rotated.previous_thumbprint = Some(rotated.thumbprint);
    rotated.thumbprint = Thumbprint::of_der(b"web-01-new");
    register_into(&mut agents, rotated.clone()).expect("the same agent, rotating");
    assert_eq!(agents, [rotated]);

    // An operator's upsert is not checked: it hands the name over.
    upsert_into(&mut agents, impostor.clone());
    assert_eq!(agents, [impostor]);
}

#[test]
fn an_update_that_changes_nothing_does_not_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = AgentTrustFile::new(dir.path().join("agents.toml"));
    let (added, agents) = file
        .update(|agents| register_into(agents, agent("web-01")))
        .expect("update");
    assert!(added.is_ok());
    assert_eq!(agents, [agent("web-01")]);
    let written = FileStamp::of(file.path()).expect("stamp");
    let mut impostor = agent("web-01");
    impostor.thumbprint = Thumbprint::of_der(b"impostor");
    let (refused, agents) = file
        .update(|agents| register_into(agents, impostor))
        .expect("update");
    assert!(refused.is_err());
    assert_eq!(agents, [agent("web-01")]);
    assert_eq!(
        FileStamp::of(file.path()).expect("stamp"),
        written,
        "not rewritten"
    );
    assert_eq!(file.load().expect("load"), [agent("web-01")]);
}

/// Entries are rendered once and reused; what reaches the disk still
/// follows every change, as a fresh reader of the file sees it.
#[test]
fn a_changed_entry_is_written_again_and_a_fresh_reader_sees_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agents.toml");
    let file = AgentTrustFile::new(&path);
    let (a, b, c) = (agent("web-01"), agent("web-02"), agent("web-03"));
    file.upsert_all(vec![a.clone(), b.clone()]).expect("first");
    let mut rotated = b.clone();
    rotated.roles = vec!["db".into()];
    rotated.previous_thumbprint = Some(Thumbprint::of_der(b"old"));
    rotated.retire_previous_at = Some(1_900_000_000);
    file.upsert_all(vec![rotated.clone(), c.clone()])
        .expect("second");
    assert!(file.remove(&a.thumbprint).expect("remove"));
    let fresh = AgentTrustFile::new(&path);
    assert_eq!(fresh.load().expect("load"), [rotated, c]);
    let text = std::fs::read_to_string(&path).expect("read");
    assert_eq!(text.matches("[[agent]]").count(), 2, "{text}");
}

/// Handles that share no mutex (as the hub and `server trust add` in
/// another process do) are kept apart by the lock file alone: every
/// writer's entries survive, however the writes interleave.
#[test]
fn writers_with_their_own_handles_lose_no_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agents.toml");
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let path = path.clone();
            std::thread::spawn(move || {
                let file = AgentTrustFile::new(&path);
                for i in 0..25 {
                    file.upsert(agent(&format!("w{w}-{i}"))).expect("upsert");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    let stored = AgentTrustFile::new(&path).load().expect("load");
    assert_eq!(stored.len(), 8 * 25);
}

/// A writer that cannot take the lock in time says which file is locked,
/// and changes nothing.
#[test]
fn a_held_lock_fails_a_write_in_one_line_naming_the_lock_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agents.toml");
    let file = AgentTrustFile::new(&path).with_lock_timeout(std::time::Duration::from_millis(100));
    file.upsert(agent("web-01")).expect("first");
    let held = file.file_lock().acquire().expect("hold");
    let error = file.upsert(agent("web-02")).expect_err("locked");
    let line = error.to_string();
    assert!(
        line.contains("agents.toml.lock") && !line.contains('\n'),
        "{line}"
    );
    drop(held);
    assert_eq!(file.load().expect("load"), [agent("web-01")]);
}

/// The writes are durable: the data file is whole and no temporary file
/// is left beside it.
#[test]
fn a_write_leaves_only_the_file_and_its_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = AgentTrustFile::new(dir.path().join("agents.toml"));
    file.upsert(agent("web-01")).expect("write");
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["agents.toml", "agents.toml.lock"]);
}
