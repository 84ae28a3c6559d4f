//! Pushwire's end-to-end tests: one test binary (one link of the workspace instead of one per
//! area), a module per area. The tests of a module share its functions; what several modules
//! need lives in the harness (`pushwire_tests`).
//!
//! Every test may run beside any other in this process (the default parallel test threads):
//! each starts its own servers on loopback port 0 or on free ports, in its own temporary
//! directories. The two tests that install the process-wide tracing subscriber (`metrics`,
//! `telemetry`) run their body in a child process of their own (see [`alone`]).
//!
//! ```sh
//! cargo test -p pushwire-tests --test it                # everything
//! cargo test -p pushwire-tests --test it -- faults::    # one area
//! ```

mod alone;

mod auth;
mod config_watch;
mod control_plane;
mod deliveries;
mod delivery_store;
mod dispatch;
mod durability;
mod encryption;
mod failover;
mod faults;
mod ha;
mod handoff;
mod ingest;
mod limits;
mod memory_budget;
mod metrics;
mod payload_variables;
mod pooling;
mod publisher;
mod receiver;
mod sink;
mod standard_tools;
mod store_conformance;
mod telemetry;
mod test_integration;
mod tls;
mod write_only;
