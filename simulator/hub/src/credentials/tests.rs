use super::*;

#[test]
fn tokens_work_once_and_api_keys_repeatedly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CredentialStore::new(dir.path().join("credentials.toml"));
    let token = store
        .create(CredentialKind::Token, Some(Duration::from_secs(3600)))
        .expect("token");
    assert!(matches!(
        store.redeem(&token, CredentialKind::ApiKey),
        Err(CredentialError::Invalid)
    ));
    store
        .redeem(&token, CredentialKind::Token)
        .expect("first use");
    assert!(matches!(
        store.redeem(&token, CredentialKind::Token),
        Err(CredentialError::Invalid)
    ));
    let key = store.create(CredentialKind::ApiKey, None).expect("key");
    store.redeem(&key, CredentialKind::ApiKey).expect("use");
    store.redeem(&key, CredentialKind::ApiKey).expect("again");
    let text = std::fs::read_to_string(store.path()).expect("file");
    assert!(
        !text.contains(&key) && !text.contains(&token),
        "secrets are stored hashed"
    );
    let expired = store
        .create(CredentialKind::Token, Some(Duration::ZERO))
        .expect("token");
    assert!(matches!(
        store.redeem(&expired, CredentialKind::Token),
        Err(CredentialError::Invalid)
    ));
}

#[test]
fn a_restored_token_works_again_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CredentialStore::new(dir.path().join("credentials.toml"));
    let token = store
        .create(CredentialKind::Token, Some(Duration::from_secs(3600)))
        .expect("token");
    let used = store.redeem(&token, CredentialKind::Token).expect("use");
    assert!(used.used_a_token());
    assert!(matches!(
        store.redeem(&token, CredentialKind::Token),
        Err(CredentialError::Invalid)
    ));
    store.restore(used).expect("restore");
    store
        .redeem(&token, CredentialKind::Token)
        .expect("usable again");
    assert!(matches!(
        store.redeem(&token, CredentialKind::Token),
        Err(CredentialError::Invalid)
    ));
    // Restoring an API key's use changes nothing: it was never used up.
    let key = store.create(CredentialKind::ApiKey, None).expect("key");
    let used_key = store.redeem(&key, CredentialKind::ApiKey).expect("key use");
    assert!(!used_key.used_a_token());
    store.restore(used_key).expect("no-op");
    let text = std::fs::read_to_string(store.path()).expect("file");
    assert_eq!(
        text.matches("kind =").count(),
        1,
        "only the API key is left: {text}"
    );
}

#[test]
fn concurrent_uses_of_one_token_succeed_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(CredentialStore::new(dir.path().join("credentials.toml")));
    for _ in 0..20 {
        let token = store
            .create(CredentialKind::Token, Some(Duration::from_secs(3600)))
            .expect("token");
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let uses: Vec<_> = (0..4)
            .map(|_| {
                let (store, token, barrier) = (store.clone(), token.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.redeem(&token, CredentialKind::Token).is_ok()
                })
            })
            .collect();
        let accepted = uses
            .into_iter()
            .map(|u| u.join().expect("thread"))
            .filter(|ok| *ok)
            .count();
        assert_eq!(accepted, 1, "a one-time token is accepted exactly once");
    }
}

#[test]
fn a_chosen_api_key_is_stored_hashed_once_and_then_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CredentialStore::new(dir.path().join("credentials.toml"));
    let key = "operator-chosen-key-0123456789";
    assert!(matches!(
        store.redeem(key, CredentialKind::ApiKey),
        Err(CredentialError::Invalid)
    ));
    assert!(
        store
            .add(CredentialKind::ApiKey, key, None)
            .expect("stored")
    );
    // Every later start finds it and writes nothing.
    let before = std::fs::read_to_string(store.path()).expect("file");
    assert!(!store.add(CredentialKind::ApiKey, key, None).expect("again"));
    let after = std::fs::read_to_string(store.path()).expect("file");
    assert_eq!(before, after);
    assert_eq!(after.matches("kind =").count(), 1, "{after}");
    assert!(!after.contains(key), "stored hashed: {after}");
    store.redeem(key, CredentialKind::ApiKey).expect("use");
    store.redeem(key, CredentialKind::ApiKey).expect("reuse");
    // It is an API key, not a token, and only that secret.
    assert!(store.redeem(key, CredentialKind::Token).is_err());
    assert!(
        store
            .redeem("operator-chosen-key-0123456788", CredentialKind::ApiKey)
            .is_err()
    );
}

#[test]
fn a_short_chosen_key_is_refused_without_echoing_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CredentialStore::new(dir.path().join("credentials.toml"));
    let short = "  hunter2-secret ";
    let error = store
        .add(CredentialKind::ApiKey, short, None)
        .expect_err("too short");
    assert!(
        matches!(error, ChosenSecretError::TooShort { chars: 14 }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("at least 16"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(!store.path().exists(), "nothing was written");
    assert!(
        store
            .add(CredentialKind::ApiKey, "exactly-16-chars", None)
            .expect("16 is enough")
    );
}

/// Stores that share no mutex (the hub, and `token create` in another
/// process) are kept apart by the lock file: every created credential
/// works afterwards, every token is used exactly once, and no write brings
/// back a used one.
#[test]
fn stores_with_their_own_handles_lose_no_credential_and_revive_no_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("credentials.toml");
    let used: Vec<String> = {
        let store = CredentialStore::new(&path);
        (0..20)
            .map(|_| {
                store
                    .create(CredentialKind::Token, Some(Duration::from_secs(3600)))
                    .expect("token")
            })
            .collect()
    };
    let creators: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let store = CredentialStore::new(&path);
                (0..10)
                    .map(|i| {
                        let kind = if i % 2 == 0 {
                            CredentialKind::Token
                        } else {
                            CredentialKind::ApiKey
                        };
                        (kind, store.create(kind, None).expect("create"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let redeemer = {
        let (path, used) = (path.clone(), used.clone());
        std::thread::spawn(move || {
            let store = CredentialStore::new(&path);
            for token in &used {
                store.redeem(token, CredentialKind::Token).expect("redeem");
            }
        })
    };
    let created: Vec<_> = creators
        .into_iter()
        .flat_map(|c| c.join().expect("creator"))
        .collect();
    redeemer.join().expect("redeemer");
    let store = CredentialStore::new(&path);
    for token in &used {
        assert!(
            store.redeem(token, CredentialKind::Token).is_err(),
            "a used token stays used"
        );
    }
    assert_eq!(created.len(), 40);
    for (kind, secret) in &created {
        store
            .redeem(secret, *kind)
            .expect("every created credential is stored");
    }
}

#[test]
fn a_held_lock_fails_a_write_in_one_line_naming_the_lock_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CredentialStore::new(dir.path().join("credentials.toml"))
        .with_lock_timeout(Duration::from_millis(100));
    let held = store.file_lock().acquire().expect("hold");
    let error = store
        .create(CredentialKind::ApiKey, None)
        .expect_err("locked");
    let line = error.to_string();
    assert!(
        line.contains("credentials.toml.lock") && !line.contains('\n'),
        "{line}"
    );
    drop(held);
    assert!(!store.path().exists(), "nothing was written");
}
