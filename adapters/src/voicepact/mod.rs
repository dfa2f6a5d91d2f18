//! VoicePact: the frame shapes of its WebSocket API ([`wire`]) and a simulator of its server
//! ([`sim`]), both written from the provider's doc.
//!
//! The bridge speaks VoicePact through the dialect file `adapters/voicepact.toml`, run by the
//! dialect engine ([`crate::dialect`]) like any provider; that file's header lists the wire
//! facts and the mapping onto the envelope. The simulator is deliberately not derived from the
//! dialect file, so a mistake in one shows up as a failing test against the other.

pub mod sim;
pub mod wire;
