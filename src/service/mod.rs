//! The domain service: finding the machine for a device, reading its state,
//! deciding and acting on it safely, and reading the whole fleet's state.
//!
//! [`restrict::Restrictor`] owns a machine action's whole life (act on a
//! domain [`restrict::Intent`], wait, status, cancel) and fails with its own
//! [`service_error::ServiceError`]; [`runbook`] parses the payload once into
//! the domain types it takes. It finds the machine through
//! [`machine_directory`] (shared, briefly remembered lookups; [`selection`]
//! picks one record among several), reads its actions through
//! [`state_reads`] (both batched on [`batch`], key by key or tenant-wide
//! by one [`read_policy`]), serves one round at a time
//! per machine ([`machine_queue`]) and decides with [`decision`]. [`fleet`]
//! derives every machine's state at once (the fleet view, with its text and
//! page renderings); [`jobs`] runs the same protocol for whole groups of
//! devices on the host's queue trigger. It talks to Defender through [`crate::defender`] and to
//! other instances through [`crate::coordination`]; turning its errors into
//! problem answers is the host's ([`crate::host::error`]).

pub mod batch;
pub mod callbacks;
pub mod decision;
pub mod expiry;
pub mod fleet;
pub mod jobs;
pub mod machine_directory;
pub mod machine_queue;
pub mod platform;
pub(crate) mod read_policy;
pub mod reconcile;
pub mod restrict;
pub mod runbook;
pub mod selection;
pub mod service_error;
pub mod shown_text;
pub mod state_reads;
