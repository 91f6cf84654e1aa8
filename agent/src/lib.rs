//! The Skiff guest agent as a library: container setup from an OCI spec ([`container`]) and
//! the control-protocol handler ([`runtime`]). The `skiff-agent` binary (PID 1) uses it; so
//! do the host-side integration tests, which run containers directly on the test host.

pub mod container;
pub mod net;
pub mod runtime;
pub mod sys;

pub use runtime::{serve_connection, serve_connection_tracked, Agent, Config, Dialer, Served};
