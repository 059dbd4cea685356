use super::*;

fn thumbprint(byte: char) -> Thumbprint {
    byte.to_string().repeat(64).parse().expect("thumbprint")
}

fn hub(port: u16, thumb: char) -> HubEndpoint {
    HubEndpoint {
        address: format!("https://127.0.0.1:{port}")
            .parse()
            .expect("address"),
        thumbprint: thumbprint(thumb),
    }
}

fn random_id(rng: &mut impl rand::Rng) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..20)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

#[test]
fn servers_sharing_a_thumbprint_are_one_group_in_configured_order() {
    let hubs = [
        hub(1, 'a'),
        hub(2, 'b'),
        hub(3, 'a'),
        hub(1, 'a'),
        hub(4, 'a'),
    ];
    let groups = group_by_thumbprint(&hubs);
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(groups[0].thumbprint, thumbprint('a'));
    assert_eq!(
        groups[0].members,
        [hub(1, 'a'), hub(3, 'a'), hub(4, 'a')],
        "a repeated address is one member"
    );
    assert_eq!(groups[1].members, [hub(2, 'b')]);
}

#[test]
fn independent_thumbprints_stay_separate_groups() {
    let hubs = [hub(1, 'a'), hub(1, 'b'), hub(2, 'c')];
    let groups = group_by_thumbprint(&hubs);
    assert_eq!(groups.len(), 3, "{groups:?}");
    for (group, hub) in groups.iter().zip(&hubs) {
        assert_eq!(group.members, std::slice::from_ref(hub));
    }
}

#[test]
fn a_fleet_spreads_evenly_over_three_members() {
    let mut rng = rand::rng();
    let mut counts = [0u32; 3];
    for _ in 0..3000 {
        counts[first_member(&random_id(&mut rng), 3)] += 1;
    }
    for count in counts {
        assert!((850..=1150).contains(&count), "{counts:?}");
    }
}

#[test]
fn the_first_member_is_stable_and_in_range() {
    let mut rng = rand::rng();
    for members in 1..8 {
        let id = random_id(&mut rng);
        let first = first_member(&id, members);
        assert!(first < members);
        assert_eq!(
            first_member(&id, members),
            first,
            "the same id, the same member"
        );
    }
    assert_eq!(first_member("anything", 0), 0);
    // Pinned: a change of hash would reshuffle every fleet at upgrade.
    assert_eq!(first_member("agent-1", 1_000_003), {
        let digest = Sha256::digest(b"agent-1");
        let prefix: [u8; 8] = digest[..8].try_into().expect("eight bytes");
        usize::try_from(u64::from_be_bytes(prefix) % 1_000_003).expect("fits")
    });
}

#[test]
fn failover_visits_every_member_before_coming_back() {
    for members in 1..6 {
        for start in 0..members {
            let mut seen = vec![start];
            let mut current = start;
            for _ in 1..members {
                current = next_member(current, members);
                seen.push(current);
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..members).collect::<Vec<_>>());
            assert_eq!(next_member(current, members), start);
        }
    }
}

fn cluster() -> Placement {
    Placement::new(
        HubGroup {
            thumbprint: thumbprint('a'),
            members: vec![hub(1, 'a'), hub(2, 'a'), hub(3, 'a')],
        },
        "agent-in-a-cluster",
    )
}

#[test]
fn a_placement_starts_on_the_hashed_member() {
    let placement = cluster();
    let seat = placement.current();
    assert_eq!(seat.member, first_member("agent-in-a-cluster", 3));
    assert_eq!(seat.epoch, 0);
    assert_eq!(
        placement.endpoint(seat).address.port(),
        u16::try_from(seat.member + 1).expect("port")
    );
}

#[test]
fn failed_attempts_walk_the_whole_cluster_once_per_epoch() {
    let placement = cluster();
    let start = placement.current();
    let mut visited = vec![start.member];
    let mut seat = start;
    for _ in 0..3 {
        let moved = placement.failed(seat, "connection refused").expect("moves");
        assert_eq!(moved.left, *placement.endpoint(seat));
        assert_eq!(
            moved.reason,
            MoveReason::Unreachable("connection refused".into())
        );
        let next = placement.current();
        assert_eq!(moved.trying, *placement.endpoint(next));
        assert_eq!(next.epoch, seat.epoch + 1);
        // Other tunnels' reports about the member just left change nothing.
        assert_eq!(placement.failed(seat, "connection refused"), None);
        assert_eq!(placement.drained(seat), None);
        assert_eq!(placement.current(), next);
        visited.push(next.member);
        seat = next;
    }
    assert_eq!(seat.member, start.member, "back where it started");
    let mut distinct = visited[..3].to_vec();
    distinct.sort_unstable();
    assert_eq!(distinct, [0, 1, 2], "{visited:?}");
}

#[test]
fn an_open_tunnel_keeps_the_group_on_its_member_until_a_drain() {
    let placement = cluster();
    let seat = placement.current();
    let open = placement.opened(seat);
    assert_eq!(
        placement.failed(seat, "one redial failed"),
        None,
        "another tunnel is open there: the member is reachable"
    );
    drop(open);
    let open = placement.opened(seat);
    let epochs = placement.subscribe();
    let moved = placement.drained(seat).expect("a drain moves the group");
    assert_eq!(moved.reason, MoveReason::Drained);
    assert!(epochs.has_changed().expect("sender alive"));
    assert!(placement.has_moved_from(seat));
    // The guard of a tunnel on the old member does not count on the new one.
    drop(open);
    let now = placement.current();
    assert!(placement.failed(now, "refused").is_some());
}

#[test]
fn a_group_of_one_never_moves() {
    let placement = Placement::new(
        HubGroup {
            thumbprint: thumbprint('a'),
            members: vec![hub(1, 'a')],
        },
        "alone",
    );
    let seat = placement.current();
    assert_eq!(seat.member, 0);
    assert_eq!(placement.failed(seat, "refused"), None);
    assert_eq!(placement.drained(seat), None);
    assert!(!placement.has_moved_from(seat));
}
