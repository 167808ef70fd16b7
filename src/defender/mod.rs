//! The Microsoft Defender for Endpoint API: wire types and the client.

pub mod models;
