//! Restrict or release app execution on a device through Microsoft Defender
//! for Endpoint, as an Azure Functions custom handler.
//!
//! Where to start reading:
//! - [`routes`]: the HTTP surface the Functions host calls, in both of its
//!   invocation modes ([`envelope`] is payload mode);
//! - [`invocation`]: one invocation, from payload bytes to the answer;
//! - [`runbook`]: the payload, parsed once into domain types;
//! - [`restrict`] and [`selection`]: finding the machine and acting on it;
//! - [`defender`]: the Defender API client and wire types; [`auth`]: tokens;
//! - [`error`]: every failure and its HTTP problem answer;
//! - [`simulator`]: the simulated Defender tenant used by `--simulate` and tests.

pub mod auth;
pub mod cli;
pub mod config;
pub mod defender;
pub mod envelope;
pub mod error;
pub mod invocation;
pub mod restrict;
pub mod routes;
pub mod runbook;
pub mod selection;
pub mod simulator;
pub mod startup;
pub mod telemetry;
