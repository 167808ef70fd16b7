//! Integration tests: the real `handler` binary, started as the Functions host
//! starts it, against the simulated Defender tenant over real HTTP, with the
//! simulator's managed identity endpoint reached through `azure_identity`.
//!
//! One test binary (faster to link); one module per area.

// Test helpers, not only #[test] functions, may unwrap: a panic is a failed test.
#![allow(clippy::unwrap_used)]

mod callback_receiver;
#[path = "../common/handler_process.rs"]
mod handler_process;
mod helpers;
mod host_emulator;

mod answers;
mod callbacks;
mod callers;
mod cli;
mod connections;
mod corners;
mod defender_answers;
mod devices;
mod expiry;
mod host_protocol;
mod http_modes;
mod hygiene;
mod jobs;
mod layers;
mod outbreak;
mod parsers;
mod restrict;
mod rounds;
mod safety;
mod validation;
