//! The worker without a connection: it reconnects with backoff while queued requests are
//! answered at once as offline and late replies are still handed over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use postgres::Client;

use crate::backoff::Backoff;
use crate::error::{Error, ErrorKind};
use crate::protocol::link::{Backend, Link};
use crate::worker::connect::attempt::Attempt;
use crate::worker::{FIRST_RECONNECT, LATE_TICK, MAX_RECONNECT, Worker, connect};

impl Worker {
    /// Connects with capped exponential backoff plus jitter. While offline, queued requests are
    /// answered at once with `Offline`, and late replies are still handed over; once a pooler
    /// was seen, no connection is made any more and every request is answered with that error.
    /// `None` when the manager is gone.
    pub(super) fn reconnect(&mut self) -> Option<(Client, Backend)> {
        let mut backoff = Backoff::new(FIRST_RECONNECT, MAX_RECONNECT);
        loop {
            if self.spec.link.generations.is_pooled() {
                // For good: returns only when the manager is gone.
                let _ = self.drain(|_| Error::pooler(), None);
                return None;
            }
            // Requests that queue while the attempt runs are answered at once, as offline.
            let connector = Arc::clone(&self.spec.connector);
            let mut gone = false;
            let attempt = connector.connect_while(&mut |attempt, left| {
                gone |= self.offline_turn(attempt, left).is_none();
            });
            if gone {
                return None;
            }
            match attempt {
                Ok(ok) => {
                    self.spec.link.counters().reconnected();
                    return Some(ok);
                }
                Err(e) if e.kind() == ErrorKind::Pooler => {
                    self.spec.link.counters().server_refused();
                    self.spec.link.generations.set_pooled();
                    continue;
                }
                Err(e) => {
                    if e.kind() == ErrorKind::NoExclusion {
                        self.spec.link.counters().server_refused();
                    }
                    log::warn!("distlock worker: reconnect failed: {e}");
                    self.spec.link.generations.note_refusal(e.chain());
                }
            }
            self.drain(
                |link: &Link| link.generations.offline_error(),
                Some(Instant::now() + backoff.next_pause()),
            )?;
        }
    }

    /// One turn while a connect attempt runs: answers the queued requests as offline, hands late
    /// replies over, and waits up to `left` for more of either or for the attempt. `None` when
    /// the manager is gone.
    fn offline_turn(&mut self, attempt: &Receiver<Attempt>, left: Duration) -> Option<()> {
        if self
            .answer_queued(|link: &Link| link.generations.offline_error())
            .is_none()
        {
            // Nobody to answer: wait for the attempt alone (it closes what it gets).
            connect::await_attempt(attempt, left);
            return None;
        }
        let (requests, nudges) = (&self.spec.requests, self.spec.link.parking.nudges());
        self.late.wait_also(requests, Some(attempt), nudges, left);
        Some(())
    }

    /// With no connection: answers every queued request with `refusal()` and hands late replies
    /// over, until `until` (`None`: for good). `None` when the manager is gone.
    pub(super) fn drain(
        &mut self,
        refusal: fn(&Link) -> Error,
        until: Option<Instant>,
    ) -> Option<()> {
        loop {
            self.answer_queued(refusal)?;
            let pause = match until {
                None => LATE_TICK,
                Some(until) => match until.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Some(()),
                },
            };
            self.late
                .wait(&self.spec.requests, self.spec.link.parking.nudges(), pause);
        }
    }

    /// With no connection: hands late replies over (a grant given back needs no statement, its
    /// session is gone) and answers every request queued now with `refusal()`. `None`: no manager.
    fn answer_queued(&mut self, refusal: fn(&Link) -> Error) -> Option<()> {
        let _ = self.settle_late(None);
        loop {
            match self.spec.requests.try_recv() {
                Ok(request) => {
                    let error = refusal(&self.spec.link);
                    self.fail(request, error);
                }
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => return Some(()),
            }
        }
    }
}
