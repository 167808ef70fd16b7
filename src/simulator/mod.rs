//! Simulated Defender tenant (being written).
