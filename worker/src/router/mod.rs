//! The routing decision, pure: it knows nothing of gRPC, streams or delivery.
//!
//! - `table.rs`: the [`RoutingTable`], every account's integrations and push scopes at one
//!   revision, built from a [`Snapshot`] (in parts, with a [`TableBuilder`]) and updated by
//!   [`Change`]s (`config_watch` decodes them from the control plane's stream);
//! - `plan.rs`: [`plan()`] turns the table and a participation ([`RoutingView`]) into a
//!   [`Plan`]: the integrations to send it to and the ones to skip, with why. Ingest calls it
//!   and acts on the result.

use std::sync::Arc;

use pushwire_common::domain::{Integration, PushScopeName};

mod plan;
mod table;

pub use plan::{Decision, Plan, RoutingView, SkipReason, plan};
pub use table::{Change, RoutingTable, Snapshot, TableBuilder};

/// An integration a participation goes to, and the scope that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The integration to deliver to (as of the table's revision).
    pub integration: Arc<Integration>,
    /// The push scope that made it fire.
    pub decided_by: PushScopeName,
}
