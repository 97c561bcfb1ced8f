//! The thread that owns the `postgres::Client`: it runs each request as one statement and replies.

use crossbeam_channel::Receiver;
use postgres::{Client, SimpleQueryMessage};

use crate::error::Error;
use crate::reply::{Reply, Request};
use crate::sql::{Op, Sql};

/// The worker's state: one connection, one session, and the queue it serves.
pub(crate) struct Worker {
    /// The manager's only connection; every lock of the manager belongs to its session.
    client: Client,
    /// Requests from every handle and guard of the manager. It disconnects when the last one is
    /// dropped, which ends the worker and closes the connection.
    requests: Receiver<Request>,
    /// Reused statement buffer.
    sql: Sql,
}

impl Worker {
    pub(crate) fn new(client: Client, requests: Receiver<Request>) -> Worker {
        Worker {
            client,
            requests,
            sql: Sql::new(),
        }
    }

    /// Serves requests until every sender is gone; dropping `self` then closes the connection,
    /// and the server releases whatever the session still held.
    pub(crate) fn run(mut self) {
        while let Ok(request) = self.requests.recv() {
            self.serve(request);
        }
        log::debug!("distlock worker: last handle dropped, closing the connection");
    }

    fn serve(&mut self, request: Request) {
        let Request {
            op,
            mode,
            key,
            reply,
        } = request;
        let answer = match (op, self.execute(op, mode, key)) {
            (Op::TryLock, Ok(true)) => Reply::Granted,
            (Op::TryLock, Ok(false)) => Reply::Busy,
            (Op::Unlock, Ok(true)) => Reply::Released,
            (Op::Unlock, Ok(false)) => Reply::NotHeld,
            (_, Err(e)) => Reply::Failed(Error::from_query(e)),
        };
        if let Err(Reply::Granted) = reply.deliver(answer) {
            // The caller gave up before the grant arrived: nobody will ever own this hold, so give
            // it back now rather than leak it for the life of the connection.
            if let Err(e) = self.execute(Op::Unlock, mode, key) {
                log::warn!("distlock worker: releasing an abandoned grant of {key} failed: {e}");
            }
        }
    }

    /// Runs one statement; `true` when it returned its row (the function returned true).
    fn execute(
        &mut self,
        op: Op,
        mode: crate::sql::Mode,
        key: crate::LockKey,
    ) -> Result<bool, postgres::Error> {
        self.sql.clear();
        self.sql.push(op, mode, key);
        let messages = self.client.simple_query(self.sql.as_str())?;
        Ok(rows(&messages) == 1)
    }
}

/// The row count of the (single) statement's `CommandComplete`.
fn rows(messages: &[SimpleQueryMessage]) -> u64 {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}
