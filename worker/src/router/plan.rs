//! The routing plan of one participation: which routed integrations get it and which skip it,
//! and why. Pure: the same table and participation always give the same plan; the dispatcher
//! checks again at delivery time whether an integration was deleted or disabled meanwhile.

use pushwire_common::delivery_store::INCOMPLETE_SKIP_PREFIX;
use std::fmt;

use pushwire_common::domain::matching::Placement;
use pushwire_common::domain::{AccountName, IncompletePolicy, IntegrationName};

use super::{Route, RoutingTable};

/// What routing reads of a participation.
#[derive(Clone, Copy, Debug)]
pub struct RoutingView<'a> {
    /// The account it was published to.
    pub account: &'a AccountName,
    /// Where it took place, and whether the participant is identified.
    pub placement: Placement<'a>,
    /// Its state (`$.state`), e.g. `COMPLETED` or `STARTED`, for the skip reason.
    pub state: &'a str,
    /// Whether it is completed (`Participation::is_complete`).
    pub complete: bool,
}

/// Why a routed integration does not get a participation; its text is the delivery's
/// `skip_reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The participation is not completed and the integration takes completed ones only
    /// ([`IncompletePolicy::Skip`]).
    Incomplete {
        /// The participation's state.
        state: String,
    },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The prefix is what the delivery log's statistics count as incomplete skips.
            Self::Incomplete { state } => write!(
                f,
                "{INCOMPLETE_SKIP_PREFIX}{state}; the integration receives completed participations only"
            ),
        }
    }
}

/// What to do with one routed integration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Deliver to it.
    Send(Route),
    /// Report it as skipped, without sending.
    Skip {
        /// The route that was not taken.
        route: Route,
        /// Why.
        reason: SkipReason,
    },
}

impl Decision {
    /// The route decided on.
    pub fn route(&self) -> &Route {
        match self {
            Self::Send(route) | Self::Skip { route, .. } => route,
        }
    }
}

/// The plan for one participation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// One decision per routed integration that was asked for, ordered by integration name;
    /// each becomes one delivery of the response.
    pub decisions: Vec<Decision>,
    /// Routed integrations left out because `only_integrations` does not name them: neither
    /// delivered nor reported.
    pub not_requested: Vec<IntegrationName>,
}

impl Plan {
    /// The routes to deliver.
    pub fn sends(&self) -> impl Iterator<Item = &Route> {
        self.decisions.iter().filter_map(|d| match d {
            Decision::Send(route) => Some(route),
            Decision::Skip { .. } => None,
        })
    }

    /// The routes to report as skipped, with why.
    pub fn skips(&self) -> impl Iterator<Item = (&Route, &SkipReason)> {
        self.decisions.iter().filter_map(|d| match d {
            Decision::Send(_) => None,
            Decision::Skip { route, reason } => Some((route, reason)),
        })
    }

    /// How many integrations the push scopes routed to, `only_integrations` aside.
    pub fn routed(&self) -> usize {
        self.decisions.len() + self.not_requested.len()
    }
}

/// Plans the deliveries of `participation`: the integrations its account's push scopes route
/// it to ([`RoutingTable::route`]: enabled integrations only), restricted to
/// `only_integrations` when given (a re-publish of failed deliveries; names that do not route,
/// whether unknown, disabled or of another account, select nothing), each either sent or
/// skipped: an integration whose policy is [`IncompletePolicy::Skip`] skips a participation
/// that is not completed.
pub fn plan(
    table: &RoutingTable,
    participation: &RoutingView<'_>,
    only_integrations: Option<&[IntegrationName]>,
) -> Plan {
    let mut plan = Plan::default();
    for route in table.route(participation.account, &participation.placement) {
        let name = &route.integration.name;
        if only_integrations.is_some_and(|only| !only.contains(name)) {
            plan.not_requested.push(name.clone());
            continue;
        }
        let skips_incomplete =
            route.integration.incomplete_participations == IncompletePolicy::Skip;
        let decision = if !participation.complete && skips_incomplete {
            Decision::Skip {
                route,
                reason: SkipReason::Incomplete {
                    state: participation.state.to_owned(),
                },
            }
        } else {
            Decision::Send(route)
        };
        plan.decisions.push(decision);
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use pushwire_common::domain::{
        Audience, Integration, PushAction, PushScope, PushScopeName, ScopeTarget,
    };

    use super::*;
    use crate::router::Snapshot;

    fn account(id: &str) -> AccountName {
        AccountName::from_id(id).unwrap()
    }

    fn integration(
        account_id: &str,
        id: &str,
        policy: IncompletePolicy,
        enabled: bool,
    ) -> Integration {
        Integration {
            enabled,
            incomplete_participations: policy,
            ..Integration::example(account_id, id)
        }
    }

    fn scope(
        account_id: &str,
        id: &str,
        integration: &str,
        target: ScopeTarget,
        action: PushAction,
    ) -> PushScope {
        let a = account(account_id);
        PushScope {
            name: PushScopeName::new(&a, id).unwrap(),
            integration: IntegrationName::new(&a, integration).unwrap(),
            target,
            audience: Audience::All,
            action,
            create_time: SystemTime::UNIX_EPOCH,
            update_time: SystemTime::UNIX_EPOCH,
            revision: 1,
        }
    }

    /// acme: `crm` (completed only) pushed on website 7 but not for campaign 99; `erp` (every
    /// state) pushed account-wide; `off` disabled, pushed account-wide; a scope of an
    /// integration that does not exist. beta: `hub` pushed on website 1 only.
    fn table() -> RoutingTable {
        use IncompletePolicy::{Send, Skip};
        use PushAction::{DoNotPush, Push};
        let web = |id: &str| ScopeTarget::Website(id.into());
        RoutingTable::from_snapshot(
            1,
            Snapshot {
                integrations: vec![
                    integration("acme", "crm", Skip, true),
                    integration("acme", "erp", Send, true),
                    integration("acme", "off", Send, false),
                    integration("beta", "hub", Skip, true),
                ],
                push_scopes: vec![
                    scope("acme", "crm-web-7", "crm", web("7"), Push),
                    scope(
                        "acme",
                        "crm-not-99",
                        "crm",
                        ScopeTarget::Campaign("99".into()),
                        DoNotPush,
                    ),
                    scope("acme", "erp-all", "erp", ScopeTarget::Account, Push),
                    scope("acme", "off-all", "off", ScopeTarget::Account, Push),
                    scope("acme", "ghost-all", "ghost", ScopeTarget::Account, Push),
                    scope("beta", "hub-web-1", "hub", web("1"), Push),
                ],
            },
        )
    }

    /// One case: a participation (account, website, campaign, state) and `only_integrations`
    /// (integration ids of the participation's account, or full names), and the plan expected:
    /// sends and skips in response order as `(integration id, deciding scope id, skip reason)`,
    /// then the integrations `only_integrations` left out.
    struct Case {
        name: &'static str,
        account: &'static str,
        website: Option<&'static str>,
        campaign: &'static str,
        state: &'static str,
        only: Option<&'static [&'static str]>,
        decisions: &'static [(&'static str, &'static str, Option<&'static str>)],
        not_requested: &'static [&'static str],
    }

    const STARTED: &str =
        "participation state is STARTED; the integration receives completed participations only";

    const CASES: &[Case] = &[
        Case {
            name: "unknown account: nothing routes",
            account: "nobody",
            website: Some("7"),
            campaign: "1",
            state: "COMPLETED",
            only: None,
            decisions: &[],
            not_requested: &[],
        },
        Case {
            name: "no scope matches the placement",
            account: "beta",
            website: Some("2"),
            campaign: "1",
            state: "COMPLETED",
            only: None,
            decisions: &[],
            not_requested: &[],
        },
        Case {
            name: "push at website and account level; disabled and missing integrations never route",
            account: "acme",
            website: Some("7"),
            campaign: "1",
            state: "COMPLETED",
            only: None,
            decisions: &[("crm", "crm-web-7", None), ("erp", "erp-all", None)],
            not_requested: &[],
        },
        Case {
            name: "do-not-push at campaign level beats push at website level",
            account: "acme",
            website: Some("7"),
            campaign: "99",
            state: "COMPLETED",
            only: None,
            decisions: &[("erp", "erp-all", None)],
            not_requested: &[],
        },
        Case {
            name: "no website: only the account-level scope",
            account: "acme",
            website: None,
            campaign: "1",
            state: "COMPLETED",
            only: None,
            decisions: &[("erp", "erp-all", None)],
            not_requested: &[],
        },
        Case {
            name: "incomplete: SKIP integrations skip it, SEND ones get it, in name order",
            account: "acme",
            website: Some("7"),
            campaign: "1",
            state: "STARTED",
            only: None,
            decisions: &[
                ("crm", "crm-web-7", Some(STARTED)),
                ("erp", "erp-all", None),
            ],
            not_requested: &[],
        },
        Case {
            name: "incomplete and excluded: nothing to skip",
            account: "acme",
            website: Some("7"),
            campaign: "99",
            state: "STARTED",
            only: None,
            decisions: &[("erp", "erp-all", None)],
            not_requested: &[],
        },
        Case {
            name: "only_integrations keeps the named ones",
            account: "acme",
            website: Some("7"),
            campaign: "1",
            state: "COMPLETED",
            only: Some(&["erp"]),
            decisions: &[("erp", "erp-all", None)],
            not_requested: &["crm"],
        },
        Case {
            name: "only_integrations still applies the incomplete rule",
            account: "acme",
            website: Some("7"),
            campaign: "1",
            state: "STARTED",
            only: Some(&["crm", "erp"]),
            decisions: &[
                ("crm", "crm-web-7", Some(STARTED)),
                ("erp", "erp-all", None),
            ],
            not_requested: &[],
        },
        Case {
            name: "only_integrations cannot revive an excluded integration",
            account: "acme",
            website: Some("7"),
            campaign: "99",
            state: "COMPLETED",
            only: Some(&["crm"]),
            decisions: &[],
            not_requested: &["erp"],
        },
        Case {
            name: "only_integrations naming what is not in the account, disabled or elsewhere",
            account: "acme",
            website: Some("7"),
            campaign: "1",
            state: "COMPLETED",
            only: Some(&["nope", "off", "ghost", "accounts/beta/integrations/hub"]),
            decisions: &[],
            not_requested: &["crm", "erp"],
        },
    ];

    fn id_of(name: &IntegrationName) -> String {
        name.id().to_owned()
    }

    #[test]
    fn plans_as_the_table_of_cases_says() {
        let table = table();
        for case in CASES {
            let acct = account(case.account);
            let only: Option<Vec<IntegrationName>> = case.only.map(|names| {
                names
                    .iter()
                    .map(|n| match IntegrationName::parse(n) {
                        Ok(full) => full,
                        Err(_) => IntegrationName::new(&acct, n).unwrap(),
                    })
                    .collect()
            });
            let view = RoutingView {
                account: &acct,
                placement: Placement {
                    website_id: case.website,
                    master_form_id: None,
                    campaign_id: case.campaign,
                    identified: false,
                },
                state: case.state,
                complete: case.state == "COMPLETED",
            };
            let plan = plan(&table, &view, only.as_deref());
            let decisions: Vec<(String, String, Option<String>)> = plan
                .decisions
                .iter()
                .map(|d| {
                    let route = d.route();
                    let reason = match d {
                        Decision::Send(_) => None,
                        Decision::Skip { reason, .. } => Some(reason.to_string()),
                    };
                    (
                        id_of(&route.integration.name),
                        route.decided_by.id().to_owned(),
                        reason,
                    )
                })
                .collect();
            let want: Vec<(String, String, Option<String>)> = case
                .decisions
                .iter()
                .map(|(i, s, r)| ((*i).to_owned(), (*s).to_owned(), r.map(str::to_owned)))
                .collect();
            assert_eq!(decisions, want, "{}", case.name);
            let left_out: Vec<String> = plan.not_requested.iter().map(id_of).collect();
            assert_eq!(left_out, case.not_requested, "{}", case.name);
            assert_eq!(
                plan.routed(),
                case.decisions.len() + case.not_requested.len(),
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn sends_and_skips_split_the_decisions() {
        let acme = account("acme");
        let view = RoutingView {
            account: &acme,
            placement: Placement {
                website_id: Some("7"),
                master_form_id: None,
                campaign_id: "1",
                identified: false,
            },
            state: "STARTED",
            complete: false,
        };
        let plan = plan(&table(), &view, None);
        let sends: Vec<String> = plan.sends().map(|r| id_of(&r.integration.name)).collect();
        assert_eq!(sends, ["erp"]);
        let skips: Vec<(String, &SkipReason)> = plan
            .skips()
            .map(|(r, why)| (id_of(&r.integration.name), why))
            .collect();
        assert_eq!(
            skips,
            [(
                "crm".to_owned(),
                &SkipReason::Incomplete {
                    state: "STARTED".into()
                }
            )]
        );
    }
}
