//! Restrict or release app execution on a device through Microsoft Defender
//! for Endpoint, as an Azure Functions custom handler.
//!
//! One folder per layer, each using only the ones listed after it (host,
//! service, coordination, simulator, defender; the simulator serves
//! defender's wire types and endpoints):
//! - [`host`]: the Functions edge. Start reading at [`host::routes`] (the
//!   HTTP surface in both invocation modes) and [`host::functions`] (each
//!   function, the dispatch, and the one answer and log line per
//!   invocation); [`host::error`] maps every failure to its problem answer;
//! - [`service`]: finding the machine, reading its state and acting on it
//!   safely. Start at [`service::restrict`] (the `Restrictor`, which owns an
//!   action's whole life) and [`service::decision`] (what to do from a
//!   machine's actions); [`service::runbook`] is the payload, parsed once into
//!   domain types; [`service::fleet`] is every machine's state at once;
//! - [`coordination`]: the same guarantees across instances, through storage
//!   (a lease per machine, one shared Defender budget);
//! - [`simulator`]: the simulated Defender tenant used by `--simulate` and tests;
//! - [`defender`]: the Defender API: the one list of endpoints, wire types,
//!   the client, its tokens ([`defender::auth`]) and rate budget.
//!
//! Above them, in this order too: [`cli`], the command line; [`startup`], the
//! one composition root ([`startup::prepare`], real or simulated) and
//! serving; [`config`], the settings, composed from the types each layer owns
//! for its own (nothing below imports it); [`telemetry`], the log lines. The
//! `layers` integration test checks the imports against this order and that
//! no import circle joins files of different folders.

pub mod cli;
pub mod config;
pub mod coordination;
pub mod defender;
pub mod host;
pub mod service;
pub mod simulator;
pub mod startup;
pub mod telemetry;
