//! Restrict or release app execution on a device through Microsoft Defender
//! for Endpoint, as an Azure Functions custom handler.
//!
//! Where to start reading:
//! - [`routes`]: the HTTP surface the Functions host calls, in both of its
//!   invocation modes ([`envelope`] is payload mode);
//! - [`invocation`]: one invocation, whichever mode delivered it, and
//!   [`functions`]: what each function does with it, how it is dispatched and
//!   the one log line each invocation gets; [`reply`]: the answer;
//!   [`app_state`]: what every invocation shares;
//! - [`runbook`]: the payload, parsed once into domain types;
//! - [`restrict`], [`selection`] and [`decision`]: finding the machine,
//!   reading its state and acting on it safely, on a domain intent, with its
//!   own [`service_error`]; [`machine_queue`] (one round
//!   at a time per machine), [`state_reads`] (batched reads, never stale) and
//!   [`machine_directory`] (shared, briefly remembered lookups), both on
//!   [`batch`], keep that within Defender's rate budget in a burst;
//!   [`coordination`]: the same across instances, through storage;
//!   [`fleet`]: every machine's state at once (the fleet view);
//! - [`defender`]: the Defender API client and wire types; [`auth`]: tokens;
//! - [`error`]: every failure and its HTTP problem answer;
//! - [`startup`]: the one composition root ([`startup::prepare`], real or
//!   simulated) and serving; [`server`]: connections, read timeouts and shutdown;
//! - [`simulator`]: the simulated Defender tenant used by `--simulate` and tests.

pub mod app_state;
pub mod auth;
pub mod batch;
pub mod cli;
pub mod config;
pub mod coordination;
pub mod decision;
pub mod defender;
pub mod envelope;
pub mod error;
pub mod fleet;
pub mod functions;
pub mod invocation;
pub mod machine_directory;
pub mod machine_queue;
pub mod principal;
pub mod reply;
pub mod restrict;
pub mod routes;
pub mod runbook;
pub mod selection;
pub mod server;
pub mod service_error;
pub mod simulator;
pub mod startup;
pub mod state_reads;
pub mod telemetry;
