//! The Azure Functions edge: what the host calls, and what it gets back.
//!
//! [`routes`] is the HTTP surface in both invocation modes (the host's
//! forwarding or proxying of HTTP requests: [`http_mode`]) ([`envelope`] is
//! payload mode) and [`server`] serves its connections; both build an
//! [`invocation::Invocation`], which [`functions`] checks ([`principal`]: who
//! called), dispatches and answers with a [`reply::Reply`]; [`error`] maps
//! every failure, once, to its problem answer; [`app_state`] is what every
//! invocation shares. The functions parse the request into the service's
//! domain types and shape its result; the deciding is in [`crate::service`].

pub mod app_state;
pub mod envelope;
pub mod error;
pub mod functions;
pub mod http_mode;
pub mod invocation;
pub mod principal;
pub mod reply;
pub mod routes;
pub mod server;
