//! The sessions the server knows, with their owners, limits and recently closed ids.
//!
//! A session closes on DELETE, on its idle timeout (the core closes it), or when its VM
//! dies. Closed sessions are dropped from the live map at the next access or sweep and
//! remembered in a bounded "recently closed" set, so their ids answer 410 rather than 404.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::StatusCode;
use sandbox_core::Session;
use sandbox_core::session::SessionId;

use super::error::ApiError;

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A live session.
    Live(Session),
    /// The session existed and is closed.
    Closed,
    /// No such session for this caller.
    Unknown,
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<SessionId, (Session, String)>,
    pending: HashMap<String, usize>,
    pending_total: usize,
    closed: VecDeque<SessionId>,
    closed_owner: HashMap<SessionId, String>,
}

impl Inner {
    fn mark_closed(&mut self, id: SessionId, owner: String, keep: usize) {
        if self.closed_owner.insert(id, owner).is_none() {
            self.closed.push_back(id);
        }
        while self.closed.len() > keep {
            if let Some(old) = self.closed.pop_front() {
                self.closed_owner.remove(&old);
            }
        }
    }

    fn sweep(&mut self, keep: usize) -> Vec<SessionId> {
        let dead: Vec<SessionId> = self
            .live
            .iter()
            .filter(|(_, (s, _))| s.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in &dead {
            if let Some((_, owner)) = self.live.remove(id) {
                self.mark_closed(*id, owner, keep);
            }
        }
        dead
    }

    fn count_owned(&self, owner: &str) -> usize {
        self.live.values().filter(|(_, o)| o == owner).count()
            + self.pending.get(owner).copied().unwrap_or(0)
    }
}

/// The session registry. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    keep_closed: usize,
}

/// A reserved slot for a session being created; released on drop unless used.
#[derive(Debug)]
pub struct Reservation {
    registry: Arc<Registry>,
    owner: String,
    used: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.used {
            let mut g = self.registry.lock();
            g.pending_total = g.pending_total.saturating_sub(1);
            if let Some(n) = g.pending.get_mut(&self.owner) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Reservation {
    /// Registers the created session in the reserved slot.
    pub fn insert(mut self, session: Session) {
        let mut g = self.registry.lock();
        g.pending_total = g.pending_total.saturating_sub(1);
        if let Some(n) = g.pending.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
        }
        g.live
            .insert(session.id(), (session, std::mem::take(&mut self.owner)));
        self.used = true;
    }
}

impl Registry {
    /// An empty registry remembering up to `keep_closed` closed ids.
    pub fn new(keep_closed: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            keep_closed,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a slot for a new session of `owner`, or refuses: 503 `capacity` at the
    /// global limit, 429 `too_many_sessions` at the per-owner limit.
    pub fn reserve(
        self: &Arc<Self>,
        owner: &str,
        max_total: usize,
        max_per_owner: usize,
    ) -> Result<Reservation, ApiError> {
        let mut g = self.lock();
        g.sweep(self.keep_closed);
        if g.live.len() + g.pending_total >= max_total {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity",
                format!("the server already holds its maximum of {max_total} sessions"),
            )
            .retry_after(5));
        }
        if g.count_owned(owner) >= max_per_owner {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sessions",
                format!(
                    "this token already holds its maximum of {max_per_owner} sessions; \
                     delete one first"
                ),
            )
            .retry_after(5));
        }
        g.pending_total += 1;
        *g.pending.entry(owner.to_owned()).or_default() += 1;
        Ok(Reservation {
            registry: self.clone(),
            owner: owner.to_owned(),
            used: false,
        })
    }

    /// Finds session `id` of `owner`.
    pub fn get(&self, id: &str, owner: &str) -> Lookup {
        let Ok(id) = id.parse::<SessionId>() else {
            return Lookup::Unknown;
        };
        let mut g = self.lock();
        match g.live.get(&id) {
            Some((s, o)) if o == owner => {
                if s.is_closed() {
                    if let Some((_, o)) = g.live.remove(&id) {
                        g.mark_closed(id, o, self.keep_closed);
                    }
                    Lookup::Closed
                } else {
                    Lookup::Live(s.clone())
                }
            }
            Some(_) => Lookup::Unknown,
            None => match g.closed_owner.get(&id) {
                Some(o) if o == owner => Lookup::Closed,
                _ => Lookup::Unknown,
            },
        }
    }

    /// Removes session `id` of `owner` (to close it). `Closed` when it was already closed.
    pub fn remove(&self, id: &str, owner: &str) -> Lookup {
        let Ok(sid) = id.parse::<SessionId>() else {
            return Lookup::Unknown;
        };
        let mut g = self.lock();
        match g.live.get(&sid) {
            Some((_, o)) if o == owner => {
                let Some((s, o)) = g.live.remove(&sid) else {
                    return Lookup::Unknown;
                };
                g.mark_closed(sid, o, self.keep_closed);
                Lookup::Live(s)
            }
            Some(_) => Lookup::Unknown,
            None => match g.closed_owner.get(&sid) {
                Some(o) if o == owner => Lookup::Closed,
                _ => Lookup::Unknown,
            },
        }
    }

    /// Live sessions of `owner`, oldest first.
    pub fn list(&self, owner: &str) -> Vec<Session> {
        let mut g = self.lock();
        g.sweep(self.keep_closed);
        let mut v: Vec<Session> = g
            .live
            .values()
            .filter(|(_, o)| o == owner)
            .map(|(s, _)| s.clone())
            .collect();
        v.sort_by_key(|s| s.created());
        v
    }

    /// Drops closed sessions; returns how many.
    pub fn sweep(&self) -> usize {
        self.lock().sweep(self.keep_closed).len()
    }

    /// Live sessions (all owners).
    pub fn len(&self) -> usize {
        let mut g = self.lock();
        g.sweep(self.keep_closed);
        g.live.len()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live session (for shutdown).
    pub fn drain(&self) -> Vec<Session> {
        let mut g = self.lock();
        let ids: Vec<SessionId> = g.live.keys().copied().collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((s, o)) = g.live.remove(&id) {
                g.mark_closed(id, o, self.keep_closed);
                out.push(s);
            }
        }
        out
    }
}
