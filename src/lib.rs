//! Restrict or release app execution on a device through Microsoft Defender for Endpoint.

pub mod defender;
pub mod simulator;
