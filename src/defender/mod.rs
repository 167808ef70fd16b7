//! The Microsoft Defender for Endpoint API: the endpoints called ([`api`]),
//! wire types ([`models`]) with their ids ([`ids`]) and times ([`timestamp`]), the client ([`client`]) with its tokens
//! ([`auth`]), its rate budget ([`budget`]) and its errors ([`error`]).

pub mod api;
pub mod auth;
pub mod budget;
pub mod client;
pub mod error;
pub mod ids;
pub mod models;
pub mod timestamp;

pub use api::Endpoint;
pub use client::{ActionRecord, DefenderClient, DefenderClientOptions, Prepaid};
pub use error::DefenderError;
