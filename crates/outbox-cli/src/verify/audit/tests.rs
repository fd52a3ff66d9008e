use super::*;

fn run(seqs: &[(usize, i64)], db: KeyDb) -> Findings {
    let mut a = Audit::default();
    for &(t, s) in seqs {
        a.keyed(t, b"k", s);
    }
    let db: HashMap<Vec<u8>, KeyDb> = [(b"k".to_vec(), db)].into();
    a.finish(&db, |_, _, _| true)
}

fn counter(c: i64) -> KeyDb {
    KeyDb {
        counter: c,
        ..KeyDb::default()
    }
}

#[test]
fn dense_and_increasing_is_clean() {
    let f = run(&[(0, 3), (0, 4), (0, 5)], counter(5));
    assert_eq!((f.missing, f.reordered, f.duplicates), (0, 0, 0));
    assert!(f.problems.is_empty());
}

#[test]
fn gaps_swaps_and_repeats() {
    // 2 lost, 4/5 swapped, 6 twice, 8..=9 lost at the tail.
    let f = run(&[(0, 1), (0, 3), (0, 5), (0, 4), (0, 6), (0, 6), (0, 7)], counter(9));
    assert_eq!((f.missing, f.reordered, f.duplicates), (3, 1, 1));
    let p = &f.problems[0];
    assert_eq!(p.missing_seqs, vec![(2, 2), (8, 9)]);
    assert_eq!(p.reordered_seqs, vec![4]);
    assert_eq!(p.duplicate_seqs, vec![6]);
}

#[test]
fn pending_and_dead_are_not_missing() {
    let db = KeyDb {
        counter: 8,
        pending: vec![3, 7, 8],
        dead: vec![5],
    };
    let f = run(&[(0, 1), (0, 2), (0, 4), (0, 6)], db);
    assert_eq!(f.missing, 0);
}

#[test]
fn a_key_split_over_topics_is_in_order_per_topic() {
    let f = run(&[(0, 1), (0, 3), (1, 2), (1, 4)], counter(4));
    assert_eq!((f.missing, f.reordered, f.duplicates), (0, 0, 0));
}

#[test]
fn a_seq_below_the_first_seen_is_reordered() {
    let f = run(&[(0, 5), (0, 6), (0, 3)], counter(6));
    assert_eq!((f.missing, f.reordered), (1, 1));
    assert_eq!(f.problems[0].missing_seqs, vec![(4, 4)]);
}

#[test]
fn seqs_after_the_start_are_not_judged() {
    let f = run(&[(0, 1), (0, 2), (0, 4)], counter(2));
    assert_eq!((f.missing, f.after_start), (0, 1));
}

#[test]
fn subtract_counts_and_lists() {
    assert_eq!(subtract(&[(1, 10)], &[3, 4], &[9]), (7, vec![(1, 2), (5, 8), (10, 10)]));
    assert_eq!(subtract(&[(1, 2)], &[1, 2], &[]), (0, vec![]));
}

#[test]
fn kept_unkeyed_rows() {
    let id = |n| uuid::Uuid::from_u128(n);
    let kept = |offset| Kept {
        topic: 0,
        partition: 0,
        offset,
        seen: false,
    };
    let mut a = Audit::new([(id(1), kept(0)), (id(2), kept(1)), (id(3), kept(2)), (id(4), kept(9))].into());
    a.unkeyed(id(1));
    a.unkeyed(id(1));
    a.unkeyed(id(3));
    a.unkeyed(id(7));
    assert_eq!((a.counts.unkeyed, a.counts.unkeyed_duplicates), (4, 1));
    let f = a.finish(&HashMap::new(), |_, _, o| o < 5);
    assert_eq!((f.unkeyed_checked, f.unkeyed_missing), (3, 1));
    assert_eq!(f.unkeyed_missing_ids, vec![id(2)]);
}
