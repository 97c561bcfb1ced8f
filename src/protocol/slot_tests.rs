//! The slot protocol's races, played out between two threads.

use super::*;
use std::time::Duration;

fn soon() -> Instant {
    Instant::now() + Duration::from_millis(200)
}

/// Claims and offers the reply from another thread, as the worker does, until it is taken.
fn deliver_from_worker(ticket: Ticket, reply: Reply) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut delivery = match ticket.claim(reply) {
            Ok(d) => d,
            Err(_) => return false,
        };
        for _ in 0..2000 {
            match delivery.try_send(1) {
                Ok(()) => return true,
                Err(d) => delivery = d,
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    })
}

#[test]
fn delivered_reply_reaches_the_waiting_caller() {
    let slot = ReplySlot::new();
    let ticket = arm(&slot);
    let n = ticket.number();
    let worker = deliver_from_worker(ticket, Reply::Held);
    assert!(matches!(
        wait(&slot, n, soon(), 0),
        Waited::Reply(Reply::Held)
    ));
    assert!(worker.join().unwrap());
}

#[test]
fn a_late_hand_over_completes_when_the_caller_arrives() {
    let slot = ReplySlot::new();
    let ticket = arm(&slot);
    let n = ticket.number();
    // Nobody is receiving yet: the claim succeeds, the hand-over is late.
    let delivery = ticket.claim(Reply::Busy).unwrap();
    let delivery = delivery.try_send(1).unwrap_err();
    assert!(!delivery.is_abandoned());
    let worker = std::thread::spawn(move || {
        let mut delivery = delivery;
        loop {
            match delivery.try_send(1) {
                Ok(()) => return,
                Err(d) => delivery = d,
            }
            std::thread::yield_now();
        }
    });
    assert!(matches!(
        wait(&slot, n, soon(), 0),
        Waited::Reply(Reply::Busy)
    ));
    worker.join().unwrap();
}

#[test]
fn reply_after_the_caller_gave_up_is_handed_back() {
    let slot = ReplySlot::new();
    let ticket = arm(&slot);
    assert!(matches!(
        wait(&slot, ticket.number(), Instant::now(), 0),
        Waited::GaveUp {
            in_doubt: false,
            lost: false
        }
    ));
    assert!(matches!(ticket.claim(Reply::Held), Err(Reply::Held)));
}

#[test]
fn a_claimed_reply_the_caller_never_took_leaves_the_slot_in_doubt_and_is_handed_back() {
    let slot = ReplySlot::new();
    let ticket = arm(&slot);
    let n = ticket.number();
    let delivery = ticket.claim(Reply::Held).unwrap();
    let delivery = delivery.try_send(1).unwrap_err();
    // The caller arrives after its deadline: it returns at once, and says the slot is in doubt.
    let started = Instant::now();
    assert!(matches!(
        wait(&slot, n, Instant::now(), 0),
        Waited::GaveUp {
            in_doubt: true,
            lost: false
        }
    ));
    assert!(started.elapsed() < Duration::from_millis(50));
    // The worker sees the caller gone and takes its reply back.
    assert!(delivery.is_abandoned());
    assert!(matches!(delivery.into_reply(), Reply::Held));
}

#[test]
fn stale_ticket_never_reaches_the_next_user() {
    let slot = ReplySlot::new();
    let old = arm(&slot);
    assert!(matches!(
        wait(&slot, old.number(), Instant::now(), 0),
        Waited::GaveUp {
            in_doubt: false,
            lost: false
        }
    ));
    let new = arm(&slot);
    let n = new.number();
    // The old request's late reply is refused; the new one's is delivered.
    assert!(old.claim(Reply::Held).is_err());
    let worker = deliver_from_worker(new, Reply::Busy);
    assert!(matches!(
        wait(&slot, n, soon(), 0),
        Waited::Reply(Reply::Busy)
    ));
    assert!(worker.join().unwrap());
    // And a ticket that was armed but never delivered to is dead once re-armed.
    let unused = arm(&slot);
    let _next = arm(&slot);
    assert!(unused.claim(Reply::Held).is_err());
}

#[test]
fn a_caller_watching_a_loss_signal_takes_its_reply_or_gives_up_at_the_loss() {
    let slot = ReplySlot::new();
    let ticket = arm(&slot);
    let (lost_tx, lost) = crossbeam_channel::bounded::<()>(0);
    let worker = deliver_from_worker(ticket, Reply::Held);
    assert!(matches!(
        wait_or_lost(&slot, slot_number(&slot), soon(), &lost),
        Waited::Reply(Reply::Held)
    ));
    assert!(worker.join().unwrap());
    // The connection is lost long before the deadline: the caller gives up then, and a reply
    // that comes later is handed back.
    let ticket = arm(&slot);
    let started = Instant::now();
    let dropper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        drop(lost_tx);
    });
    let far = Instant::now() + Duration::from_secs(30);
    assert!(matches!(
        wait_or_lost(&slot, ticket.number(), far, &lost),
        Waited::GaveUp {
            in_doubt: false,
            lost: true
        }
    ));
    assert!(started.elapsed() < Duration::from_secs(10));
    dropper.join().unwrap();
    assert!(matches!(ticket.claim(Reply::Held), Err(Reply::Held)));
}

/// The ticket a slot is armed with now.
fn slot_number(slot: &ReplySlot) -> u64 {
    slot.state.load(Ordering::Acquire) >> PHASE_BITS
}
