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
