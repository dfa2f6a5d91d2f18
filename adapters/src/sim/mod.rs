//! Simulators of the three providers' servers, for the bridge's tests, its demo and its
//! benchmarks.
//!
//! A simulator follows its provider's documentation (and the wire facts written in each
//! adapter's module doc, `adapters/src/<provider>/mod.rs`), not the bridge's convenience: when
//! the bridge misreads a provider, a test against the simulator has to fail the same way it
//! would against the real server. To keep the two sides from drifting, every frame a simulator
//! sends or parses is built from the provider's `wire` module, the same one the adapter uses.
//!
//! Layout, so that dependencies run one way:
//! - `server` (this module's child) is the provider-neutral core: the listener, connections,
//!   the control knobs and the [`SimSnapshot`] view, and the `Dialect` trait through which a
//!   provider's behaviour plugs in;
//! - each provider's `sim.rs` (`crate::voicepact::sim`, ...) implements `Dialect` and imports
//!   only the core;
//! - this module is the registry: it maps a [`Provider`] to its dialect
//!   ([`Simulator::start`]) and is the public face. No provider module imports it, so adding
//!   a provider means one new `sim.rs` and one line here.

pub(crate) mod server;

pub use server::{
    HashiAuthFailure, SimConnection, SimOptions, SimSnapshot, Simulator, DEFAULT_HASHI_TOKEN,
    DEFAULT_VOIPBIN_TOKEN,
};

use server::Dialect;

use crate::Provider;

/// The fixed ports `wsbridge simulate` and the example `config.toml` use, so that the example
/// config works against simulators started on their defaults.
pub const DEFAULT_PORTS: [(Provider, u16); 3] = [
    (Provider::VoicePact, 9101),
    (Provider::Voipbin, 9102),
    (Provider::Hashi, 9103),
];

impl Simulator {
    /// Binds 127.0.0.1:`options.port` and starts serving `provider`'s WebSocket API.
    pub async fn start(provider: Provider, options: SimOptions) -> std::io::Result<Simulator> {
        let dialect = dialect_for(provider, &options);
        Simulator::serve(provider, dialect, options).await
    }
}

/// Starts the three simulators, in the order VoicePact, VoIPBIN, Hashi, on [`DEFAULT_PORTS`]
/// or (when `ephemeral`) on ephemeral ports, each with [`SimOptions::for_provider`].
pub async fn start_all(ephemeral: bool) -> std::io::Result<[Simulator; 3]> {
    let start = |(provider, port): (Provider, u16)| async move {
        let options = SimOptions {
            port: if ephemeral { 0 } else { port },
            ..SimOptions::for_provider(provider)
        };
        Simulator::start(provider, options).await
    };
    // On an error the simulators already started are dropped, which stops them.
    let vp = start(DEFAULT_PORTS[0]).await?;
    let vb = start(DEFAULT_PORTS[1]).await?;
    let hs = start(DEFAULT_PORTS[2]).await?;
    Ok([vp, vb, hs])
}

/// The registry: each provider's server behaviour, built from the options it reads.
fn dialect_for(provider: Provider, options: &SimOptions) -> Box<dyn Dialect> {
    match provider {
        Provider::VoicePact => Box::new(crate::voicepact::sim::VoicePactSim::new()),
        Provider::Voipbin => Box::new(crate::voipbin::sim::VoipbinSim::new(valid_tokens(options))),
        Provider::Hashi => Box::new(crate::hashi::sim::HashiSim::new(
            valid_tokens(options),
            options.hashi_auth_failure,
        )),
    }
}

/// The tokens a dialect accepts, empty ones removed: an empty configured token would admit a
/// client that sends an empty `?token=`.
fn valid_tokens(options: &SimOptions) -> Vec<String> {
    options
        .tokens
        .iter()
        .filter(|t| !t.is_empty())
        .cloned()
        .collect()
}
