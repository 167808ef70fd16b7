//! The Microsoft Defender for Endpoint API: the endpoints called, wire types,
//! the client, its rate budget and errors.

pub mod api;
pub mod budget;
pub mod client;
pub mod error;
pub mod models;

pub use api::Endpoint;
pub use client::{ActionRecord, DefenderClient, DefenderClientOptions};
pub use error::DefenderError;
