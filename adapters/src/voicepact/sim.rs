//! The VoicePact server's behaviour for the simulator: a `Dialect` of the provider-neutral core
//! (`crate::sim::server`, the only part of the simulators this module imports). The registry
//! in [`crate::sim`], the public API, picks this dialect for VoicePact.
//!
//! Follows the provider doc and its public FastAPI server:
//! - Endpoint `/api/v1/ws/{client_id}`; any other path is a 404 before the upgrade. No
//!   authentication, nothing sent on connect.
//! - `{"type":"ping","timestamp":X}` → `{"type":"pong","timestamp":X}` (`null` if absent).
//! - `{"type":"contract_status","contract_id":..}` → `contract_status_response` with the status
//!   the simulator last emitted for that contract (`null` if none; the provider's server
//!   answers a placeholder `"active"`, which would hide bugs).
//! - Invalid JSON and unknown types are ignored: no error frame, the connection stays.
//! - `contract_update` goes only to the connections of the contract's parties (the phone
//!   numbers set with [`crate::sim::Simulator::set_contract_parties`]; a contract without
//!   parties reaches nobody); `payment_update` and any other type go to every connection.
//! - Several connections may share a `client_id`; each of them receives what that client id
//!   receives. (The provider's server keeps one connection per client id, the newest; the
//!   doc asks clients for unique ids, so the difference does not show for a correct client.)

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::server::Request;

use super::wire;
use crate::sim::server::{percent_decode, Admission, Audience, Dialect, Reaction};
use crate::str_or_number;

/// The VoicePact server: which phone numbers are parties to which contract, and the last
/// status of each contract (for `contract_status` requests).
#[derive(Default)]
pub(crate) struct VoicePactSim {
    contracts: Mutex<Contracts>,
}

#[derive(Default)]
struct Contracts {
    parties: HashMap<String, BTreeSet<String>>,
    status: HashMap<String, Value>,
}

impl VoicePactSim {
    pub(crate) fn new() -> Self {
        VoicePactSim::default()
    }

    fn contracts(&self) -> std::sync::MutexGuard<'_, Contracts> {
        self.contracts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `client_id` of `/api/v1/ws/{client_id}`: exactly one non-empty segment, decoded.
fn client_id(path: &str) -> Option<String> {
    let rest = path.strip_prefix(wire::PATH_PREFIX)?.strip_prefix('/')?;
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    percent_decode(rest).filter(|id| !id.is_empty())
}

impl Dialect for VoicePactSim {
    fn base_path(&self) -> &'static str {
        wire::PATH_PREFIX
    }

    fn admit(&self, req: &Request) -> Admission {
        match client_id(req.uri().path()) {
            Some(identity) => Admission::Accept { identity },
            None => Admission::not_found(),
        }
    }

    fn on_text(&self, text: &str) -> Reaction {
        let Ok(Value::Object(msg)) = serde_json::from_str::<Value>(text) else {
            return Reaction::default();
        };
        match msg.get("type").and_then(Value::as_str) {
            Some(wire::PING) => Reaction {
                app_ping: true,
                ..Reaction::reply(wire::pong(msg.get("timestamp")))
            },
            Some(wire::CONTRACT_STATUS) => {
                let requested = msg.get("contract_id");
                let status = str_or_number(requested)
                    .and_then(|id| self.contracts().status.get(&id).cloned());
                Reaction::reply(wire::contract_status_reply(requested, status.as_ref()))
            }
            _ => Reaction::default(),
        }
    }

    fn route(&self, frame: &Value) -> Audience {
        if frame.get("type").and_then(Value::as_str) != Some(wire::CONTRACT_UPDATE) {
            return Audience::Everyone;
        }
        let Some(contract) = str_or_number(frame.get("contract_id")) else {
            return Audience::Nobody;
        };
        let mut contracts = self.contracts();
        if let Some(status) = frame.get("status") {
            contracts.status.insert(contract.clone(), status.clone());
        }
        match contracts.parties.get(&contract) {
            Some(parties) => Audience::Identities(parties.clone()),
            None => Audience::Nobody,
        }
    }

    fn set_contract_parties(&self, contract_id: &str, client_ids: &[&str]) -> bool {
        let parties = client_ids.iter().map(|c| c.to_string()).collect();
        self.contracts()
            .parties
            .insert(contract_id.to_string(), parties);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(path: &str) -> Request {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[test]
    fn path_carries_the_client_id() {
        let sim = VoicePactSim::new();
        assert_eq!(
            sim.admit(&request("/api/v1/ws/+254700000001")),
            Admission::Accept {
                identity: "+254700000001".into()
            }
        );
        assert_eq!(
            sim.admit(&request("/api/v1/ws/a%20b")),
            Admission::Accept {
                identity: "a b".into()
            }
        );
        for bad in [
            "/api/v1/ws",
            "/api/v1/ws/",
            "/api/v1/ws/a/b",
            "/ws/a",
            "/api/v1/wsx/a",
        ] {
            assert!(
                matches!(sim.admit(&request(bad)), Admission::Reject { status, auth: false, .. } if status == 404),
                "{bad}"
            );
        }
    }

    #[test]
    fn ping_is_echoed_and_junk_ignored() {
        let sim = VoicePactSim::new();
        let r = sim.on_text(r#"{"type":"ping","timestamp":"x1"}"#);
        assert!(r.app_ping);
        assert_eq!(
            r.reply.as_deref(),
            Some(r#"{"type":"pong","timestamp":"x1"}"#)
        );
        let r = sim.on_text(r#"{"type":"ping"}"#);
        assert_eq!(
            r.reply.as_deref(),
            Some(r#"{"type":"pong","timestamp":null}"#)
        );
        for junk in ["nope", "[1]", r#"{"type":"dance"}"#, r#"{"type":7}"#, "{}"] {
            assert_eq!(sim.on_text(junk), Reaction::default(), "{junk}");
        }
    }

    #[test]
    fn contract_status_reports_the_last_emitted_status() {
        let sim = VoicePactSim::new();
        let ask = |sim: &VoicePactSim| -> Value {
            let r = sim.on_text(&wire::contract_status("c1"));
            serde_json::from_str(r.reply.as_deref().unwrap()).unwrap()
        };
        assert_eq!(
            ask(&sim),
            json!({"type": "contract_status_response", "contract_id": "c1", "status": null})
        );
        sim.route(&wire::contract_update("c1", "active", 1));
        sim.route(&wire::payment_update("c1", "failed", 1.0, 2));
        assert_eq!(ask(&sim)["status"], "active");
    }

    #[test]
    fn contract_updates_reach_the_parties_only() {
        let sim = VoicePactSim::new();
        let none = BTreeSet::new();
        let update = wire::contract_update("c1", "active", 1);
        assert!(matches!(sim.route(&update), Audience::Nobody));
        assert!(sim.set_contract_parties("c1", &["alice", "bob"]));
        let a = sim.route(&update);
        assert!(
            a.includes("alice", &none) && a.includes("bob", &none) && !a.includes("carol", &none)
        );
        let pay = sim.route(&wire::payment_update("c1", "completed", 2.5, 1));
        assert!(pay.includes("carol", &none));
        assert!(sim
            .route(&json!({"type": "dispute_opened"}))
            .includes("carol", &none));
        assert!(matches!(
            sim.route(&json!({"type": "contract_update"})),
            Audience::Nobody
        ));
    }
}
