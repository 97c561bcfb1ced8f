//! The link's generations, loss signals and statement marks.

use super::*;
use crossbeam_channel::TryRecvError;

const B: Backend = Backend {
    pid: 7,
    started_us: 1,
};

#[test]
fn losing_a_generation_fires_its_signal_once_and_makes_its_backend_a_suspect() {
    let link = Link::new();
    let (lease, suspects) = link.generations.go_online(B);
    assert!(suspects.is_empty());
    assert!(link.generations.is_current(lease.generation));
    assert_eq!(lease.lost.try_recv(), Err(TryRecvError::Empty));
    assert!(link.lose(lease.generation));
    assert!(!link.lose(lease.generation), "only one caller wins");
    assert_eq!(lease.lost.try_recv(), Err(TryRecvError::Disconnected));
    assert!(!link.generations.is_online());
    let (next, suspects) = link.generations.go_online(Backend { pid: 8, ..B });
    assert_eq!(suspects, vec![B]);
    assert!(next.generation > lease.generation);
    assert!(!link.generations.is_current(lease.generation));
    assert_eq!(next.lost.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn a_stale_generation_cannot_lose_the_current_one() {
    let link = Link::new();
    let (old, _) = link.generations.go_online(B);
    assert!(link.lose(old.generation));
    let (new, _) = link.generations.go_online(B);
    assert!(!link.lose(old.generation));
    assert!(link.generations.is_current(new.generation));
}

#[test]
fn a_running_statement_is_seen_only_for_the_current_generation() {
    let link = Link::new();
    let (lease, _) = link.generations.go_online(B);
    assert_eq!(link.running(), None, "idle");
    let mark = link.watch.begin_statement(lease.generation);
    assert_eq!(link.running(), Some((mark, lease.generation)));
    link.watch.end_statement(mark);
    assert_eq!(link.running(), None);
    let next = link.watch.begin_statement(lease.generation);
    assert_ne!(next, mark, "each statement has its own mark");
    // A mark left by an old generation's stuck worker does not count against the new one.
    assert!(link.lose(lease.generation));
    let _ = link.generations.go_online(B);
    let stale = link.watch.begin_statement(lease.generation);
    assert_eq!(link.running(), None);
    link.watch.end_statement(stale);
}

#[test]
fn the_loss_signal_is_the_serving_generations_and_none_while_offline() {
    let link = Link::new();
    assert!(link.generations.loss_signal().is_none(), "never online");
    let (lease, _) = link.generations.go_online(B);
    let signal = link.generations.loss_signal().expect("online");
    assert_eq!(signal.try_recv(), Err(TryRecvError::Empty));
    assert!(link.lose(lease.generation));
    assert_eq!(signal.try_recv(), Err(TryRecvError::Disconnected));
    assert!(link.generations.loss_signal().is_none(), "offline");
    assert_eq!(link.generations.stalls(), 0);
    link.generations.note_stall();
    assert_eq!(link.generations.stalls(), 1);
}
