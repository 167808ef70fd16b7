//! The Microsoft Defender for Endpoint API: wire types, the client, its errors.

pub mod budget;
pub mod client;
pub mod error;
pub mod models;

pub use client::{ActionRecord, DefenderClient, DefenderClientOptions};
pub use error::{DefenderError, Operation};
