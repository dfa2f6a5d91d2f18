//! The provider-neutral simulated server: the listener, the WebSocket handshake, one task per
//! connection with a bounded outbound queue, the control knobs tests need (silence, abrupt
//! drops, refusals) and an event-driven view of the server's state ([`SimSnapshot`],
//! [`Simulator::wait_until`]).
//!
//! What differs between providers (the path, authentication, the greeting, how client frames
//! are answered, who receives an event, server-side keep-alive) is a [`Dialect`], implemented
//! in each provider's `sim.rs`. Those modules import this one and nothing else of the
//! simulators; which dialect serves which provider is decided by the registry in
//! [`crate::sim`], which imports them. So the dependency runs one way (registry → provider
//! simulators → this core), and a provider's simulator can change without touching the core.
//!
//! Invariants:
//! - Every queue is bounded: [`Simulator::emit`] waits for space rather than buffering without
//!   bound, and tungstenite's buffers are sized for small JSON frames.
//! - A connection counts as open (and receives events) from the moment its upgrade is accepted,
//!   before the `101` reaches the client, so a client that sees its upgrade succeed can rely on
//!   the next `emit` reaching it. Likewise a rejected credential is counted before the client
//!   sees the rejection.
//! - Credentials are never logged and never appear in a snapshot: connections are identified
//!   by a digest of their token.
//! - Dropping the last [`Simulator`] handle stops the listener and every connection.
//! - A client's close is answered as a real server answers it (RFC 6455, 5.5.1): the frames
//!   already queued to that client (sent, from the provider's point of view) go out first,
//!   then the close answer, then the TCP connection is closed; nothing is sent after it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::Provider;

/// The token the VoIPBIN simulator accepts by default, so that configs and tests can name it
/// without inventing credentials.
pub const DEFAULT_VOIPBIN_TOKEN: &str = "voipbin-sim-token";

/// The token the Hashi simulator accepts by default, for the same reason.
pub const DEFAULT_HASHI_TOKEN: &str = "hashi-sim-token";

/// How long a client may take to complete its upgrade request before the simulator gives up on
/// it (a stuck client must not hold a task forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a graceful close (shutdown, Hashi's auth error) waits for the client's close reply.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How many queued frames one connection writes before it flushes and looks at its socket again.
const WRITE_BATCH: usize = 256;

/// How Hashi reports a bad or missing token. The doc shows an `error` frame with `AUTH_ERROR`;
/// an HTTP 401 on the upgrade is the other common server behaviour, and the bridge has to handle
/// both, so the simulator can do either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HashiAuthFailure {
    /// Upgrade, send `{"type":"error","data":{"message":"Authentication failed","code":"AUTH_ERROR"}}`,
    /// then close (code 1008, policy violation).
    #[default]
    ErrorFrame,
    /// Answer the upgrade with HTTP 401 and the same error object as a JSON body.
    Http401,
}

/// How a simulator is started. Tests shorten the timings; the demo uses the defaults.
#[derive(Clone)]
pub struct SimOptions {
    /// The TCP port on 127.0.0.1; 0 picks an ephemeral one (see [`Simulator::local_addr`]).
    pub port: u16,
    /// The tokens VoIPBIN and Hashi accept (VoicePact has no authentication and ignores them).
    pub tokens: Vec<String>,
    /// How the Hashi simulator reports a bad token.
    pub hashi_auth_failure: HashiAuthFailure,
    /// How often the VoIPBIN simulator sends a protocol ping (the provider: every 10 s).
    pub server_ping_interval: Duration,
    /// How long the VoIPBIN simulator waits for a pong before it drops the client (the provider:
    /// 60 s). The clock restarts on every pong.
    pub pong_timeout: Duration,
    /// Frames queued per connection before [`Simulator::emit`] waits for the connection to
    /// drain (at least 1).
    pub queue_capacity: usize,
}

impl SimOptions {
    /// Defaults for one provider: an ephemeral port, the provider's timings, and only that
    /// provider's default token.
    pub fn for_provider(provider: Provider) -> Self {
        let tokens = match provider {
            Provider::VoicePact => Vec::new(),
            Provider::Voipbin => vec![DEFAULT_VOIPBIN_TOKEN.to_string()],
            Provider::Hashi => vec![DEFAULT_HASHI_TOKEN.to_string()],
        };
        SimOptions {
            tokens,
            ..SimOptions::default()
        }
    }
}

impl Default for SimOptions {
    /// An ephemeral port, the providers' timings, and both default tokens (so one options value
    /// works for any provider).
    fn default() -> Self {
        SimOptions {
            port: 0,
            tokens: vec![
                DEFAULT_VOIPBIN_TOKEN.to_string(),
                DEFAULT_HASHI_TOKEN.to_string(),
            ],
            hashi_auth_failure: HashiAuthFailure::default(),
            server_ping_interval: Duration::from_secs(10),
            pong_timeout: Duration::from_secs(60),
            queue_capacity: 4096,
        }
    }
}

impl fmt::Debug for SimOptions {
    // Hand-written so that a stray `?options` in a log line cannot print the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimOptions")
            .field("port", &self.port)
            .field("tokens", &format_args!("[{} hidden]", self.tokens.len()))
            .field("hashi_auth_failure", &self.hashi_auth_failure)
            .field("server_ping_interval", &self.server_ping_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("queue_capacity", &self.queue_capacity)
            .finish()
    }
}

/// What a simulator has seen, for assertions and for [`Simulator::wait_until`] predicates.
#[derive(Clone, Debug, Default)]
pub struct SimSnapshot {
    /// The open, authenticated connections, ordered by id.
    pub connections: Vec<SimConnection>,
    /// Authenticated upgrades ever (a Hashi upgrade that ends in an `AUTH_ERROR` frame counts
    /// in `auth_rejected` only, so `accepted` going up always means a usable connection).
    pub accepted: u64,
    /// Bad or missing credentials ever (HTTP 401 or Hashi's `AUTH_ERROR` frame).
    pub auth_rejected: u64,
    /// Connections closed before the handshake by [`Simulator::refuse_for`].
    pub refused: u64,
    /// Text frames received from clients ever.
    pub client_frames: u64,
    /// Heartbeats received ever: application pings (VoicePact, Hashi) and protocol pings.
    pub pings_received: u64,
    /// Close frames received from clients ever (each answered with a close frame, after the
    /// frames already queued to that client).
    pub client_closes: u64,
}

/// One open connection, as a test sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConnection {
    /// Unique per simulator, in order of arrival.
    pub id: u64,
    /// VoicePact: the `client_id` of the path. VoIPBIN and Hashi: an id derived from the token
    /// (`agent-…`, `player-…`), never the token itself.
    pub identity: String,
    /// VoIPBIN topics or Hashi lobby ids currently subscribed, sorted.
    pub subscriptions: Vec<String>,
}

/// A running simulator of one provider. Cheap to clone; the listener and every connection stop
/// when the last clone is dropped or on [`Simulator::shutdown`].
#[derive(Clone)]
pub struct Simulator {
    handle: Arc<Handle>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("provider", &self.handle.shared.provider)
            .field("local_addr", &self.handle.shared.local_addr)
            .finish()
    }
}

impl Simulator {
    /// Binds 127.0.0.1:`options.port` and serves `provider`'s WebSocket API as `dialect`
    /// says. Crate-private: callers go through [`Simulator::start`], whose registry picks the
    /// dialect, so a provider can never be served with another provider's behaviour.
    pub(crate) async fn serve(
        provider: Provider,
        dialect: Box<dyn Dialect>,
        options: SimOptions,
    ) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, options.port)).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            provider,
            dialect,
            queue_capacity: options.queue_capacity.max(1),
            server_ping_interval: options.server_ping_interval.max(Duration::from_millis(1)),
            pong_timeout: options.pong_timeout.max(Duration::from_millis(1)),
            local_addr,
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
            silent: watch::Sender::new(false),
            drops: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            next_id: AtomicU64::new(1),
        });
        let accept = tokio::spawn(accept_loop(shared.clone(), listener));
        debug!(provider = %provider, addr = %local_addr, "simulator listening");
        Ok(Simulator {
            handle: Arc::new(Handle {
                shared,
                accept: Mutex::new(Some(accept)),
            }),
        })
    }

    /// Which provider this simulates.
    pub fn provider(&self) -> Provider {
        self.handle.shared.provider
    }

    /// The bound address (the port is the ephemeral one when `port` was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.shared.local_addr
    }

    /// The URL to configure as the upstream's `url`: `ws://127.0.0.1:PORT/api/v1/ws`
    /// (VoicePact; the adapter appends `/{client_id}`), `ws://127.0.0.1:PORT/v1.0/ws` (VoIPBIN),
    /// `ws://127.0.0.1:PORT/` (Hashi).
    pub fn base_url(&self) -> String {
        format!(
            "ws://{}{}",
            self.handle.shared.local_addr,
            self.handle.shared.dialect.base_path()
        )
    }

    /// Routes one event frame the way the provider does and queues it to every matching
    /// connection; returns how many it was queued to. The frame is serialised once and the
    /// bytes shared. Waits for queue space (backpressure to the caller, never unbounded).
    pub async fn emit(&self, frame: Value) -> usize {
        let shared = &self.handle.shared;
        let audience = shared.dialect.route(&frame);
        let text = Utf8Bytes::from(frame.to_string());
        let targets: Vec<mpsc::Sender<Message>> = shared
            .lock()
            .conns
            .values()
            .filter(|c| audience.includes(&c.identity, &c.subscriptions))
            .map(|c| c.tx.clone())
            .collect();
        queue_to(targets, text).await
    }

    /// Sends raw text (e.g. malformed JSON) to every open authenticated connection, bypassing
    /// routing; returns how many it was queued to.
    pub async fn send_raw(&self, text: &str) -> usize {
        let targets: Vec<mpsc::Sender<Message>> = self
            .handle
            .shared
            .lock()
            .conns
            .values()
            .map(|c| c.tx.clone())
            .collect();
        queue_to(targets, Utf8Bytes::from(text)).await
    }

    /// Makes the server go silent (`true`) or resume (`false`): while silent no connection is
    /// read or written, so neither protocol pongs nor application pongs nor events go out, and
    /// new connections are accepted by TCP but not upgraded. Like a hung server process.
    pub fn set_silent(&self, silent: bool) {
        debug!(provider = %self.provider(), silent, "simulator silence");
        self.handle.shared.silent.send_replace(silent);
    }

    /// Drops every open connection abruptly (TCP closed without a close frame), like a network
    /// failure. Connections made afterwards are not affected.
    pub fn drop_all(&self) {
        debug!(provider = %self.provider(), "simulator drops every connection");
        self.handle
            .shared
            .drops
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Refuses new connections for `d`: each is accepted by TCP and closed at once, before the
    /// WebSocket handshake (counted in [`SimSnapshot::refused`]). Open connections stay.
    pub fn refuse_for(&self, d: Duration) {
        debug!(provider = %self.provider(), ?d, "simulator refuses connections");
        self.handle.shared.lock().refuse_until = Some(Instant::now() + d);
    }

    /// VoicePact only: the `client_id`s that are parties to `contract_id`; a `contract_update`
    /// goes to their connections only (replacing any earlier list). Ignored by the others.
    pub fn set_contract_parties(&self, contract_id: &str, client_ids: &[&str]) {
        if !self
            .handle
            .shared
            .dialect
            .set_contract_parties(contract_id, client_ids)
        {
            debug!(provider = %self.provider(), "contract parties ignored: not a VoicePact simulator");
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> SimSnapshot {
        self.handle.shared.lock().snapshot()
    }

    /// Waits until `pred` holds for the state, re-checking on every change (no polling), for at
    /// most `timeout`. `Ok` with the snapshot that satisfied it, or `Err` with the last one.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&SimSnapshot) -> bool,
    ) -> Result<SimSnapshot, SimSnapshot> {
        let shared = &self.handle.shared;
        let found = shared
            .wait_state(timeout, |s| {
                let snap = s.snapshot();
                pred(&snap).then_some(snap)
            })
            .await;
        found.ok_or_else(|| self.snapshot())
    }

    /// Waits until at least `connections` open connections carry subscriptions (VoicePact has
    /// no subscriptions: there, open connections count). VoIPBIN and Hashi acknowledge no
    /// subscription, so a client only knows it is subscribed once the server has read the
    /// frame; emitting before this could reach nobody.
    pub async fn wait_subscribed(
        &self,
        connections: usize,
        timeout: Duration,
    ) -> Result<SimSnapshot, SimSnapshot> {
        let needs_subs = self.provider() != Provider::VoicePact;
        self.wait_until(timeout, |s| {
            s.connections
                .iter()
                .filter(|c| !needs_subs || !c.subscriptions.is_empty())
                .count()
                >= connections
        })
        .await
    }

    /// Stops listening and closes every connection (with a close frame, "going away"); returns
    /// once the connections are gone (or after a short grace period).
    pub async fn shutdown(&self) {
        let shared = &self.handle.shared;
        shared.shutdown.send_replace(true);
        let accept = self
            .handle
            .accept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = accept {
            let _ = task.await;
        }
        let _ = shared
            .wait_state(CLOSE_GRACE * 4, |s| (s.live_tasks == 0).then_some(()))
            .await;
        debug!(provider = %shared.provider, "simulator shut down");
    }
}

// ---------------------------------------------------------------------------------------------
// What each provider's sim.rs implements.

/// One provider's server behaviour, as the generic core needs it.
pub(crate) trait Dialect: Send + Sync + 'static {
    /// The path of the URL the bridge is configured with (see [`Simulator::base_url`]).
    fn base_path(&self) -> &'static str;

    /// Decides on an upgrade request (path, credentials) before anything is answered.
    fn admit(&self, req: &Request) -> Admission;

    /// The frame sent right after an accepted upgrade, if the provider greets.
    fn greeting(&self, _identity: &str) -> Option<String> {
        None
    }

    /// Whether the server keeps connections alive with protocol pings and drops clients that
    /// do not answer them (VoIPBIN).
    fn server_pings(&self) -> bool {
        false
    }

    /// Reacts to one client text frame.
    fn on_text(&self, text: &str) -> Reaction;

    /// Reacts to one client binary frame (ignored unless the provider says otherwise).
    fn on_binary(&self, _data: &[u8]) -> Reaction {
        Reaction::default()
    }

    /// Who receives an emitted frame. Called once per emit, so it may also record what the
    /// provider would remember about the event (VoicePact: the contract's status).
    fn route(&self, frame: &Value) -> Audience;

    /// VoicePact's contract parties; `false` (ignored) for the others.
    fn set_contract_parties(&self, _contract_id: &str, _client_ids: &[&str]) -> bool {
        false
    }
}

/// The verdict on an upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Upgrade; the connection is known as `identity` (never a raw token).
    Accept {
        /// See [`SimConnection::identity`].
        identity: String,
    },
    /// Answer with an HTTP error and a JSON body instead of upgrading.
    Reject {
        /// The HTTP status (401, 404).
        status: StatusCode,
        /// The JSON body.
        body: String,
        /// Whether this counts as a rejected credential.
        auth: bool,
    },
    /// Upgrade, send `frames`, then close with 1008 and `reason` (Hashi's auth error). Counts
    /// as a rejected credential.
    RejectAfterUpgrade {
        /// What to send before closing.
        frames: Vec<String>,
        /// The close reason.
        reason: &'static str,
    },
}

impl Admission {
    /// The 404 for a path the provider does not serve.
    pub(crate) fn not_found() -> Self {
        Admission::Reject {
            status: StatusCode::NOT_FOUND,
            body: r#"{"detail":"Not Found"}"#.to_string(),
            auth: false,
        }
    }
}

/// What the server does with one client frame.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Reaction {
    /// A frame sent back to this client only.
    pub(crate) reply: Option<String>,
    /// The frame was an application-level heartbeat.
    pub(crate) app_ping: bool,
    /// Subscriptions (topics, lobby rooms) to add.
    pub(crate) join: Vec<String>,
    /// Subscriptions to remove.
    pub(crate) leave: Vec<String>,
    /// Close the socket at once, without a close frame (VoIPBIN on an invalid topic).
    pub(crate) hang_up: bool,
}

impl Reaction {
    /// A reply and nothing else.
    pub(crate) fn reply(frame: String) -> Self {
        Reaction {
            reply: Some(frame),
            ..Reaction::default()
        }
    }
}

/// Which connections an emitted frame goes to.
pub(crate) enum Audience {
    /// Every open connection.
    Everyone,
    /// None (e.g. a contract without known parties).
    Nobody,
    /// Connections whose identity is in the set (VoicePact parties).
    Identities(BTreeSet<String>),
    /// Connections with at least one subscription the predicate accepts.
    Subscribers(Box<dyn Fn(&str) -> bool + Send + Sync>),
}

impl Audience {
    pub(crate) fn includes(&self, identity: &str, subscriptions: &BTreeSet<String>) -> bool {
        match self {
            Audience::Everyone => true,
            Audience::Nobody => false,
            Audience::Identities(ids) => ids.contains(identity),
            Audience::Subscribers(accepts) => subscriptions.iter().any(|s| accepts(s)),
        }
    }
}

impl fmt::Debug for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Audience::Everyone => f.write_str("Everyone"),
            Audience::Nobody => f.write_str("Nobody"),
            Audience::Identities(ids) => f.debug_tuple("Identities").field(ids).finish(),
            Audience::Subscribers(_) => f.write_str("Subscribers(..)"),
        }
    }
}

/// A stable, non-reversible id for a token: `<prefix>-` and 12 hex digits of its SHA-256.
pub(crate) fn token_identity(prefix: &str, token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("{prefix}-{}", hex::encode(&digest[..6]))
}

/// The first value of query parameter `name`, decoded.
pub(crate) fn query_param(req: &Request, name: &str) -> Option<String> {
    let query = req.uri().query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Decodes `%XX` escapes of a path segment; `None` when they do not form UTF-8 or are broken.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------------------------
// The core.

/// Dropped with the last [`Simulator`] clone: stops everything.
struct Handle {
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// Everything the listener, the connection tasks and the handle share.
struct Shared {
    provider: Provider,
    dialect: Box<dyn Dialect>,
    queue_capacity: usize,
    server_ping_interval: Duration,
    pong_timeout: Duration,
    local_addr: SocketAddr,
    state: Mutex<State>,
    /// Bumped on every change of `state`; what `wait_until` waits on.
    changes: watch::Sender<u64>,
    silent: watch::Sender<bool>,
    /// Bumped by `drop_all`; each connection drops when it changes.
    drops: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    conns: BTreeMap<u64, ConnEntry>,
    accepted: u64,
    auth_rejected: u64,
    refused: u64,
    client_frames: u64,
    pings_received: u64,
    client_closes: u64,
    refuse_until: Option<Instant>,
    /// Connection tasks alive, registered or not (shutdown waits for zero).
    live_tasks: usize,
}

struct ConnEntry {
    identity: String,
    subscriptions: BTreeSet<String>,
    tx: mpsc::Sender<Message>,
}

impl State {
    fn snapshot(&self) -> SimSnapshot {
        SimSnapshot {
            connections: self
                .conns
                .iter()
                .map(|(id, c)| SimConnection {
                    id: *id,
                    identity: c.identity.clone(),
                    subscriptions: c.subscriptions.iter().cloned().collect(),
                })
                .collect(),
            accepted: self.accepted,
            auth_rejected: self.auth_rejected,
            refused: self.refused,
            client_frames: self.client_frames,
            pings_received: self.pings_received,
            client_closes: self.client_closes,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state and wakes every waiter.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.lock());
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        r
    }

    /// Waits until `check` returns `Some` for the state, re-checking on every change.
    async fn wait_state<T>(
        &self,
        timeout: Duration,
        check: impl Fn(&State) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(found) = check(&self.lock()) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`, so only the deadline ends the wait.
                Ok(Err(_)) | Err(_) => return check(&self.lock()),
            }
        }
    }

    fn refusing(&self) -> bool {
        let mut state = self.lock();
        match state.refuse_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                state.refuse_until = None;
                false
            }
            None => false,
        }
    }

    fn ws_config() -> WebSocketConfig {
        // Small JSON frames: a few KiB of buffer per connection instead of tungstenite's
        // 128 KiB defaults, and a cap on what a client may send.
        WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(4 * 1024)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20))
    }
}

/// Queues one shared frame to each target; returns how many took it.
async fn queue_to(targets: Vec<mpsc::Sender<Message>>, text: Utf8Bytes) -> usize {
    let mut queued = 0;
    for tx in targets {
        if tx.send(Message::Text(text.clone())).await.is_ok() {
            queued += 1;
        }
    }
    queued
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = shutting_down(&mut shutdown) => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: pause briefly instead of spinning.
                debug!(provider = %shared.provider, error = %e, "simulator accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.refusing() {
            debug!(provider = %shared.provider, %peer, "simulator refuses a connection");
            drop(tcp);
            shared.update(|s| s.refused += 1);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared.update(|s| s.live_tasks += 1);
        tokio::spawn(connection(shared.clone(), tcp, id));
    }
    debug!(provider = %shared.provider, "simulator stopped listening");
}

/// Keeps `live_tasks` and the connection table right however a connection task ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let id = self.id;
        self.shared.update(|s| {
            s.live_tasks = s.live_tasks.saturating_sub(1);
            s.conns.remove(&id);
        });
    }
}

/// How a served connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// `drop_all`: close the TCP connection without a close frame.
    Dropped,
    /// `shutdown`: close with a close frame.
    Shutdown,
    /// The client closed, or its socket failed.
    ClientGone,
    /// The dialect hung up (VoIPBIN: invalid topic, binary frame).
    HungUp,
    /// No pong within the timeout (VoIPBIN).
    Unresponsive,
}

/// Resolves once shutdown has been requested (holding no borrow of the flag afterwards).
async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// The control signals one connection task listens to.
struct Signals {
    drops: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    silent: watch::Receiver<bool>,
}

impl Signals {
    fn new(shared: &Shared) -> Self {
        Signals {
            drops: shared.drops.subscribe(),
            shutdown: shared.shutdown.subscribe(),
            silent: shared.silent.subscribe(),
        }
    }

    /// Runs `f` unless a drop or a shutdown comes first.
    async fn guarded<T>(&mut self, f: impl Future<Output = T>) -> Result<T, Exit> {
        tokio::select! {
            _ = self.drops.changed() => Err(Exit::Dropped),
            _ = shutting_down(&mut self.shutdown) => Err(Exit::Shutdown),
            r = f => Ok(r),
        }
    }

    /// Returns once the server is not silent, or the exit that came first.
    async fn while_silent(&mut self) -> Result<(), Exit> {
        loop {
            if !*self.silent.borrow_and_update() {
                return Ok(());
            }
            tokio::select! {
                _ = self.drops.changed() => return Err(Exit::Dropped),
                _ = shutting_down(&mut self.shutdown) => return Err(Exit::Shutdown),
                r = self.silent.changed() => if r.is_err() { return Err(Exit::Shutdown) },
            }
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

async fn connection(shared: Arc<Shared>, tcp: TcpStream, id: u64) {
    let _guard = ConnGuard {
        shared: shared.clone(),
        id,
    };
    let provider = shared.provider;
    let mut signals = Signals::new(&shared);
    // A silent server does not answer upgrade requests either.
    if signals.while_silent().await.is_err() {
        return;
    }

    let (tx, rx) = mpsc::channel(shared.queue_capacity);
    let mut admission = None;
    // The error type is tungstenite's handshake callback contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let verdict = shared.dialect.admit(req);
        let answer = match &verdict {
            Admission::Accept { identity } => {
                // Registered before the 101 goes out: a client that sees its upgrade succeed
                // can rely on the next emit reaching it.
                shared.update(|s| {
                    s.accepted += 1;
                    s.conns.insert(
                        id,
                        ConnEntry {
                            identity: identity.clone(),
                            subscriptions: BTreeSet::new(),
                            tx,
                        },
                    );
                });
                Ok(resp)
            }
            Admission::Reject { status, body, auth } => {
                if *auth {
                    shared.update(|s| s.auth_rejected += 1);
                }
                Err(http_error(*status, body))
            }
            Admission::RejectAfterUpgrade { .. } => {
                shared.update(|s| s.auth_rejected += 1);
                Ok(resp)
            }
        };
        // Only the path is logged: the query may hold a token.
        debug!(provider = %provider, conn = id, path = req.uri().path(), verdict = verdict_name(&verdict), "simulator upgrade request");
        admission = Some(verdict);
        answer
    };
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(Shared::ws_config()));
    let upgraded = match signals
        .guarded(tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake))
        .await
    {
        Ok(Ok(Ok(ws))) => ws,
        Ok(Ok(Err(e))) => {
            debug!(provider = %provider, conn = id, error = %e, "simulator handshake ended without upgrade");
            return;
        }
        Ok(Err(_)) => {
            debug!(provider = %provider, conn = id, "simulator handshake timed out");
            return;
        }
        Err(_) => return,
    };
    let mut ws = upgraded;

    match admission {
        Some(Admission::Accept { identity }) => {
            debug!(provider = %provider, conn = id, identity = %identity, "simulator connection open");
            let exit = serve(&shared, &mut ws, id, &identity, rx, &mut signals).await;
            debug!(provider = %provider, conn = id, ?exit, "simulator connection ends");
            if exit == Exit::Shutdown {
                close_gracefully(&mut ws, CloseCode::Away, "server shutting down").await;
            }
            // Any other exit drops the socket as it is: no close frame.
        }
        Some(Admission::RejectAfterUpgrade { frames, reason }) => {
            for frame in frames {
                if ws.send(Message::text(frame)).await.is_err() {
                    return;
                }
            }
            close_gracefully(&mut ws, CloseCode::Policy, reason).await;
        }
        Some(Admission::Reject { .. }) | None => {}
    }
}

fn verdict_name(a: &Admission) -> &'static str {
    match a {
        Admission::Accept { .. } => "accept",
        Admission::Reject { .. } => "reject",
        Admission::RejectAfterUpgrade { .. } => "reject after upgrade",
    }
}

fn http_error(status: StatusCode, body: &str) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(body.to_string()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Sends a close frame and waits briefly for the client's reply.
async fn close_gracefully(ws: &mut Ws, code: CloseCode, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Serves one accepted connection until it ends; returns why.
async fn serve(
    shared: &Shared,
    ws: &mut Ws,
    id: u64,
    identity: &str,
    mut rx: mpsc::Receiver<Message>,
    signals: &mut Signals,
) -> Exit {
    if let Some(greeting) = shared.dialect.greeting(identity) {
        if let Err(exit) = signals.while_silent().await {
            return exit;
        }
        match signals.guarded(ws.send(Message::text(greeting))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Exit::ClientGone,
            Err(exit) => return exit,
        }
    }

    let keepalive = shared.dialect.server_pings();
    let ping_timer = tokio::time::sleep(shared.server_ping_interval);
    let pong_timer = tokio::time::sleep(shared.pong_timeout);
    tokio::pin!(ping_timer, pong_timer);

    loop {
        if *signals.silent.borrow_and_update() {
            if let Err(exit) = signals.while_silent().await {
                return exit;
            }
            // Time spent silent does not count against the client.
            let now = Instant::now();
            ping_timer.as_mut().reset(now + shared.server_ping_interval);
            pong_timer.as_mut().reset(now + shared.pong_timeout);
            continue;
        }
        let Signals {
            drops,
            shutdown,
            silent,
        } = &mut *signals;
        // Frames already queued to this client go out before its next frame is read: an
        // event the server has sent before a client's close arrives reaches the client ahead
        // of the close answer, as with a real server, whose writes go to the socket at once
        // (the queue here stands for that socket buffer). After the close answer nothing
        // more is sent (RFC 6455, 5.5.1).
        tokio::select! {
            biased;
            _ = drops.changed() => return Exit::Dropped,
            _ = shutting_down(shutdown) => return Exit::Shutdown,
            _ = silent.changed() => continue,
            () = pong_timer.as_mut(), if keepalive => {
                debug!(provider = %shared.provider, conn = id, "simulator drops a client that did not answer its pings");
                return Exit::Unresponsive;
            }
            () = ping_timer.as_mut(), if keepalive => {
                ping_timer.as_mut().reset(Instant::now() + shared.server_ping_interval);
                match signals.guarded(ws.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Exit::ClientGone,
                    Err(exit) => return exit,
                }
            }
            out = rx.recv() => {
                let Some(first) = out else { return Exit::ClientGone };
                let write = async {
                    ws.feed(first).await?;
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(next) => ws.feed(next).await?,
                            Err(_) => break,
                        }
                    }
                    ws.flush().await
                };
                match signals.guarded(write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Exit::ClientGone,
                    Err(exit) => return exit,
                }
            }
            msg = ws.next() => {
                let reaction = match msg {
                    None => return Exit::ClientGone,
                    Some(Err(e)) => {
                        debug!(provider = %shared.provider, conn = id, error = %e, "simulator read failed");
                        return Exit::ClientGone;
                    }
                    Some(Ok(Message::Text(text))) => {
                        let reaction = shared.dialect.on_text(text.as_str());
                        apply(shared, id, &reaction, true);
                        reaction
                    }
                    Some(Ok(Message::Binary(data))) => {
                        let reaction = shared.dialect.on_binary(&data);
                        apply(shared, id, &reaction, false);
                        reaction
                    }
                    Some(Ok(Message::Ping(_))) => {
                        // tungstenite queues the pong; it goes out with the next read or write.
                        shared.update(|s| s.pings_received += 1);
                        continue;
                    }
                    Some(Ok(Message::Pong(_))) => {
                        pong_timer.as_mut().reset(Instant::now() + shared.pong_timeout);
                        continue;
                    }
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite has queued the answer; it goes out after everything
                        // already written (the queue was empty when the close was read), and
                        // then the server closes the TCP connection, as RFC 6455 asks.
                        shared.update(|s| s.client_closes += 1);
                        let _ = signals
                            .guarded(tokio::time::timeout(CLOSE_GRACE, ws.flush()))
                            .await;
                        return Exit::ClientGone;
                    }
                    Some(Ok(Message::Frame(_))) => continue,
                };
                if reaction.hang_up {
                    return Exit::HungUp;
                }
                if let Some(reply) = reaction.reply {
                    match signals.guarded(ws.send(Message::text(reply))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Exit::ClientGone,
                        Err(exit) => return exit,
                    }
                }
            }

        }
    }
}

/// Records one client frame and what it changed.
fn apply(shared: &Shared, id: u64, reaction: &Reaction, text: bool) {
    shared.update(|s| {
        if text {
            s.client_frames += 1;
        }
        if reaction.app_ping {
            s.pings_received += 1;
        }
        if let Some(conn) = s.conns.get_mut(&id) {
            for sub in &reaction.join {
                conn.subscriptions.insert(sub.clone());
            }
            for sub in &reaction.leave {
                conn.subscriptions.remove(sub);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_identity_is_stable_and_hides_the_token() {
        let a = token_identity("player", "hashi-sim-token");
        assert_eq!(a, token_identity("player", "hashi-sim-token"));
        assert_ne!(a, token_identity("player", "other"));
        assert!(
            a.starts_with("player-") && a.len() == "player-".len() + 12,
            "{a}"
        );
        assert!(!a.contains("hashi-sim-token"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("+254700000001").as_deref(),
            Some("+254700000001")
        );
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn options_defaults_and_debug_hide_tokens() {
        let vb = SimOptions::for_provider(Provider::Voipbin);
        assert_eq!(vb.tokens, vec![DEFAULT_VOIPBIN_TOKEN.to_string()]);
        assert_eq!(vb.port, 0);
        assert_eq!(vb.server_ping_interval, Duration::from_secs(10));
        assert_eq!(vb.pong_timeout, Duration::from_secs(60));
        assert_eq!(vb.queue_capacity, 4096);
        assert!(SimOptions::for_provider(Provider::VoicePact)
            .tokens
            .is_empty());
        let shown = format!("{:?}", SimOptions::default());
        assert!(!shown.contains(DEFAULT_HASHI_TOKEN), "{shown}");
        assert!(!shown.contains(DEFAULT_VOIPBIN_TOKEN), "{shown}");
    }

    #[test]
    fn audiences() {
        let subs: BTreeSet<String> = ["a:b:c:*".to_string()].into();
        let none = BTreeSet::new();
        assert!(Audience::Everyone.includes("x", &none));
        assert!(!Audience::Nobody.includes("x", &subs));
        let ids = Audience::Identities(["alice".to_string()].into());
        assert!(ids.includes("alice", &none) && !ids.includes("bob", &subs));
        let any = Audience::Subscribers(Box::new(|_| true));
        assert!(any.includes("x", &subs) && !any.includes("x", &none));
    }

    #[test]
    fn error_responses_carry_json() {
        let r = http_error(StatusCode::UNAUTHORIZED, r#"{"message":"unauthorized"}"#);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "26");
    }
}
