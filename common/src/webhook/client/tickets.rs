//! The client's TLS session store: what lets a new connection to a receiver resume a session
//! instead of making a full handshake. rustls's own memory cache keeps at most 8 TLS 1.3
//! tickets per server, and each ticket serves one connection only, so a burst of 32 new
//! connections to one host resumed 8 and made 24 full handshakes. This one keeps as many
//! tickets per server as the connections the client keeps per destination, within bounds on
//! servers and on tickets in all.
//!
//! Servers are evicted least recently used first; a server's tickets oldest first (when it has
//! too many, or the store has too many, from the least recently used server that has any). A
//! ticket is handed out once, newest first: the least likely to have expired.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

use rustls::NamedGroup;
use rustls::client::ClientSessionStore;
use rustls::client::{Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;

/// Bounds of a [`TicketStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TicketLimits {
    /// Servers remembered (at least 1).
    pub servers: usize,
    /// TLS 1.3 tickets kept per server (at least 1).
    pub per_server: usize,
    /// TLS 1.3 tickets kept in all (at least 1).
    pub total: usize,
}

impl TicketLimits {
    fn at_least_one(self) -> Self {
        Self {
            servers: self.servers.max(1),
            per_server: self.per_server.max(1),
            total: self.total.max(1),
        }
    }
}

/// What is kept of one server.
#[derive(Debug)]
struct Server<T, X> {
    /// When it was last used, on the store's clock.
    stamp: u64,
    /// Single-use tickets, oldest first.
    tickets: VecDeque<T>,
    /// Everything else (rustls: the key-exchange hint and the TLS 1.2 session).
    extra: X,
}

/// Servers by recency, each with a queue of single-use tickets, bounded three ways (see
/// [`TicketLimits`]). Generic so that the eviction rules are tested without real sessions.
#[derive(Debug)]
pub(super) struct Recent<K, T, X> {
    limits: TicketLimits,
    servers: HashMap<K, Server<T, X>>,
    /// Servers by `stamp`, least recently used first.
    recency: BTreeMap<u64, K>,
    clock: u64,
    tickets: usize,
}

impl<K: Hash + Eq + Clone, T, X: Default> Recent<K, T, X> {
    pub(super) fn new(limits: TicketLimits) -> Self {
        Self {
            limits: limits.at_least_one(),
            servers: HashMap::new(),
            recency: BTreeMap::new(),
            clock: 0,
            tickets: 0,
        }
    }

    /// `key`'s entry, made the most recently used; created (evicting the least recently used
    /// server when full) if `create`.
    fn touch(&mut self, key: &K, create: bool) -> Option<&mut Server<T, X>> {
        self.clock += 1;
        let stamp = self.clock;
        if let Some(server) = self.servers.get_mut(key) {
            self.recency.remove(&server.stamp);
            server.stamp = stamp;
            self.recency.insert(stamp, key.clone());
            return self.servers.get_mut(key);
        }
        if !create {
            return None;
        }
        if self.servers.len() >= self.limits.servers
            && let Some((_, oldest)) = self.recency.pop_first()
            && let Some(evicted) = self.servers.remove(&oldest)
        {
            self.tickets -= evicted.tickets.len();
        }
        self.recency.insert(stamp, key.clone());
        match self.servers.entry(key.clone()) {
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(e) => Some(e.insert(Server {
                stamp,
                tickets: VecDeque::new(),
                extra: X::default(),
            })),
        }
    }

    /// `key`'s other data, for reading or changing; created if missing.
    pub(super) fn extra_mut(&mut self, key: &K) -> Option<&mut X> {
        self.touch(key, true).map(|s| &mut s.extra)
    }

    /// `key`'s other data, if the server is known.
    pub(super) fn extra(&mut self, key: &K) -> Option<&mut X> {
        self.touch(key, false).map(|s| &mut s.extra)
    }

    /// Keeps `ticket` for `key`, dropping the oldest tickets beyond the limits.
    pub(super) fn push(&mut self, key: &K, ticket: T) {
        let per_server = self.limits.per_server;
        let Some(server) = self.touch(key, true) else {
            return;
        };
        server.tickets.push_back(ticket);
        let over = server.tickets.len().saturating_sub(per_server);
        server.tickets.drain(..over);
        self.tickets = self.tickets + 1 - over;
        while self.tickets > self.limits.total {
            // The least recently used server that has a ticket gives up its oldest; `key` is
            // the most recent, so it gives one up only when no other server has any.
            let servers = &self.servers;
            let Some(victim) = self
                .recency
                .values()
                .find(|k| servers.get(*k).is_some_and(|s| !s.tickets.is_empty()))
                .cloned()
            else {
                break;
            };
            if let Some(server) = self.servers.get_mut(&victim) {
                server.tickets.pop_front();
                self.tickets -= 1;
            }
        }
    }

    /// The newest ticket of `key`, which is then forgotten.
    pub(super) fn take(&mut self, key: &K) -> Option<T> {
        let ticket = self.touch(key, false)?.tickets.pop_back();
        if ticket.is_some() {
            self.tickets -= 1;
        }
        ticket
    }

    /// Servers remembered.
    pub(super) fn servers(&self) -> usize {
        self.servers.len()
    }

    /// Tickets kept in all.
    pub(super) fn tickets(&self) -> usize {
        self.tickets
    }
}

/// What is kept of a server besides its TLS 1.3 tickets (no `Debug`: sessions hold secrets).
#[derive(Default)]
struct Extra {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
}

/// A [`ClientSessionStore`] sized for the client's concurrency (see the module's docs).
pub(super) struct TicketStore {
    inner: Mutex<Recent<ServerName<'static>, Tls13ClientSessionValue, Extra>>,
}

impl fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Sessions hold secrets: counts only.
        let inner = self.lock();
        f.debug_struct("TicketStore")
            .field("limits", &inner.limits)
            .field("servers", &inner.servers())
            .field("tickets", &inner.tickets())
            .finish()
    }
}

impl TicketStore {
    pub(super) fn new(limits: TicketLimits) -> Self {
        Self {
            inner: Mutex::new(Recent::new(limits)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Recent<ServerName<'static>, Tls13ClientSessionValue, Extra>> {
        // Every change leaves the store consistent, so a panic elsewhere cannot corrupt it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        if let Some(extra) = self.lock().extra_mut(&server_name) {
            extra.kx_hint = Some(group);
        }
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock()
            .extra(&server_name.to_owned())
            .and_then(|e| e.kx_hint)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        if let Some(extra) = self.lock().extra_mut(&server_name) {
            extra.tls12 = Some(value);
        }
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.lock()
            .extra(&server_name.to_owned())
            .and_then(|e| e.tls12.clone())
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        if let Some(extra) = self.lock().extra(server_name) {
            extra.tls12 = None;
        }
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.lock().push(&server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.lock().take(server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recent(servers: usize, per_server: usize, total: usize) -> Recent<&'static str, u32, ()> {
        Recent::new(TicketLimits {
            servers,
            per_server,
            total,
        })
    }

    #[test]
    fn tickets_are_single_use_newest_first() {
        let mut r = recent(4, 8, 64);
        for t in 1..=3 {
            r.push(&"a", t);
        }
        assert_eq!(r.tickets(), 3);
        assert_eq!(r.take(&"a"), Some(3));
        assert_eq!(r.take(&"a"), Some(2));
        assert_eq!(r.take(&"a"), Some(1));
        assert_eq!(r.take(&"a"), None, "each ticket is handed out once");
        assert_eq!(r.take(&"b"), None);
        assert_eq!(r.tickets(), 0);
    }

    #[test]
    fn a_burst_as_large_as_the_limit_per_server_is_served() {
        // rustls's own cache keeps 8 per server: 32 connections at once resumed 8.
        let mut r = recent(4, 32, 1024);
        for t in 0..64 {
            r.push(&"crm.example", t);
        }
        assert_eq!(r.tickets(), 32, "the oldest beyond the limit are dropped");
        let served: Vec<u32> = std::iter::from_fn(|| r.take(&"crm.example")).collect();
        assert_eq!(served.len(), 32);
        assert_eq!(served.first(), Some(&63));
        assert_eq!(
            served.last(),
            Some(&32),
            "the oldest kept is the 33rd pushed"
        );
    }

    #[test]
    fn the_least_recently_used_server_is_evicted() {
        let mut r = recent(2, 8, 64);
        r.push(&"a", 1);
        r.push(&"b", 2);
        // Using `a` makes `b` the least recently used.
        assert_eq!(r.take(&"a"), Some(1));
        r.push(&"a", 3);
        r.push(&"c", 4);
        assert_eq!(r.servers(), 2);
        assert_eq!(r.take(&"b"), None, "b was evicted with its ticket");
        assert_eq!(r.tickets(), 2);
        assert_eq!(r.take(&"a"), Some(3));
        assert_eq!(r.take(&"c"), Some(4));
    }

    #[test]
    fn the_total_is_bounded_at_the_expense_of_the_least_recent_server() {
        let mut r = recent(8, 4, 6);
        for t in 0..4 {
            r.push(&"old", t);
        }
        for t in 10..14 {
            r.push(&"new", t);
        }
        assert_eq!(r.tickets(), 6);
        // `old` gave up its two oldest; `new` kept all of its own.
        assert_eq!(r.take(&"old"), Some(3));
        assert_eq!(r.take(&"old"), Some(2));
        assert_eq!(r.take(&"old"), None);
        let new: Vec<u32> = std::iter::from_fn(|| r.take(&"new")).collect();
        assert_eq!(new, [13, 12, 11, 10]);
        // A lone server is bounded by the total too.
        for t in 0..10 {
            r.push(&"new", t);
        }
        assert_eq!(r.tickets(), 4, "per-server limit");
        let mut lone = recent(8, 100, 5);
        for t in 0..10 {
            lone.push(&"x", t);
        }
        assert_eq!(lone.tickets(), 5);
        assert_eq!(lone.take(&"x"), Some(9));
    }

    #[test]
    fn other_data_lives_and_dies_with_its_server() {
        let mut r: Recent<&str, u32, Option<u8>> = Recent::new(TicketLimits {
            servers: 1,
            per_server: 1,
            total: 1,
        });
        assert!(r.extra(&"a").is_none(), "reading does not create");
        *r.extra_mut(&"a").unwrap() = Some(7);
        assert_eq!(r.extra(&"a").copied(), Some(Some(7)));
        r.push(&"b", 1);
        assert!(r.extra(&"a").is_none(), "evicted with a");
        assert_eq!(r.servers(), 1);
    }

    #[test]
    fn zero_limits_mean_one() {
        let mut r = recent(0, 0, 0);
        r.push(&"a", 1);
        r.push(&"a", 2);
        assert_eq!(r.tickets(), 1);
        assert_eq!(r.take(&"a"), Some(2));
    }
}
