//! Push-scope matching (DESIGN §2) as pure functions: which scopes apply to a placement, which
//! one decides for an integration, and which integrations fire. Shared by the control plane's
//! `ResolvePushes` and the worker's router so both always give the same answer; it must not
//! touch storage, protobuf types or the clock.

use std::cmp::{Ordering, Reverse};
use std::collections::HashMap;

use super::{Audience, Integration, IntegrationName, PushAction, PushScope, ScopeTarget};

/// Where a participation takes place (routing context).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement<'a> {
    /// The website the campaign is published on, when known.
    pub website_id: Option<&'a str>,
    /// The master form of the campaign, when known.
    pub master_form_id: Option<&'a str>,
    /// The campaign.
    pub campaign_id: &'a str,
    /// Whether the participant is identified.
    pub identified: bool,
}

/// Whether a scope applies to a placement (target level/id and audience).
pub fn scope_matches(scope: &PushScope, placement: &Placement<'_>) -> bool {
    let target = match &scope.target {
        ScopeTarget::Account => true,
        ScopeTarget::Website(id) => placement.website_id == Some(id.as_str()),
        ScopeTarget::MasterForm(id) => placement.master_form_id == Some(id.as_str()),
        ScopeTarget::Campaign(id) => placement.campaign_id == id,
    };
    let audience = match scope.audience {
        Audience::All => true,
        Audience::Identified => placement.identified,
        Audience::Anonymous => !placement.identified,
    };
    target && audience
}

/// Orders two matching scopes of one integration so that the deciding one comes first: most
/// specific level, then `DoNotPush` before `Push` (an exclusion must never be overridden by a
/// push at the same level), then the lowest name so equal candidates give a stable answer
/// whatever order the store returned them in.
fn precedence(a: &PushScope, b: &PushScope) -> Ordering {
    let key = |s: &PushScope| {
        (
            Reverse(s.target.level()),
            Reverse(s.action == PushAction::DoNotPush),
        )
    };
    key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
}

/// Among the scopes of ONE integration, the one that decides: the matching scopes of the most
/// specific level (Campaign > MasterForm > Website > Account) compete; at that level DoNotPush
/// wins over Push; ties are broken by the lowest scope name so the answer is deterministic.
/// None when no scope matches (the integration does not fire).
pub fn deciding_scope<'a>(
    scopes: impl IntoIterator<Item = &'a PushScope>,
    placement: &Placement<'_>,
) -> Option<&'a PushScope> {
    scopes
        .into_iter()
        .filter(|s| scope_matches(s, placement))
        .min_by(|a, b| precedence(a, b))
}

/// A firing integration and the scope that decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Push<'a> {
    /// The integration that fires.
    pub integration: &'a Integration,
    /// The scope that made it fire (always a `Push` scope).
    pub decided_by: &'a PushScope,
}

/// Every ENABLED integration (of any account present in the inputs; callers pass one
/// account's) whose deciding scope says Push, ordered by integration name. Scopes whose
/// integration is not in `integrations` are ignored.
///
/// One pass over the scopes keeps the best matching scope per integration (same order as
/// [`deciding_scope`]), so the cost is linear in the number of scopes. Should `integrations`
/// list one name twice, the first entry is used. Both take any iterator of references (a
/// slice, or the worker's shared `Arc`s), so no caller has to copy them into a slice.
pub fn resolve<'a>(
    integrations: impl IntoIterator<Item = &'a Integration>,
    scopes: impl IntoIterator<Item = &'a PushScope>,
    placement: &Placement<'_>,
) -> Vec<Push<'a>> {
    let mut enabled: HashMap<&IntegrationName, &'a Integration> = HashMap::new();
    for integration in integrations.into_iter().filter(|i| i.enabled) {
        enabled.entry(&integration.name).or_insert(integration);
    }

    let mut best: HashMap<&IntegrationName, &'a PushScope> = HashMap::new();
    for scope in scopes {
        if !enabled.contains_key(&scope.integration) || !scope_matches(scope, placement) {
            continue;
        }
        best.entry(&scope.integration)
            .and_modify(|current| {
                if precedence(scope, current) == Ordering::Less {
                    *current = scope;
                }
            })
            .or_insert(scope);
    }

    let mut pushes: Vec<Push<'a>> = best
        .into_iter()
        .filter(|(_, scope)| scope.action == PushAction::Push)
        .filter_map(|(name, scope)| {
            enabled.get(name).map(|integration| Push {
                integration,
                decided_by: scope,
            })
        })
        .collect();
    pushes.sort_by(|a, b| a.integration.name.cmp(&b.integration.name));
    pushes
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use Audience::{All, Anonymous, Identified};
    use PushAction::{DoNotPush, Push as P};

    use super::*;
    use crate::domain::{AccountName, PushScopeName};

    const ACCOUNT: &str = "acme";

    fn account() -> AccountName {
        AccountName::from_id(ACCOUNT).unwrap()
    }

    fn integration(id: &str, enabled: bool) -> Integration {
        Integration {
            enabled,
            ..Integration::example(ACCOUNT, id)
        }
    }

    /// A scope row: (scope id, integration id, target, audience, action).
    type ScopeRow = (
        &'static str,
        &'static str,
        ScopeTarget,
        Audience,
        PushAction,
    );

    fn scope(row: &ScopeRow) -> PushScope {
        let (id, integration, target, audience, action) = row;
        make_scope(id, integration, target.clone(), *audience, *action)
    }

    fn make_scope(
        id: &str,
        integration: &str,
        target: ScopeTarget,
        audience: Audience,
        action: PushAction,
    ) -> PushScope {
        PushScope {
            name: PushScopeName::new(&account(), id).unwrap(),
            integration: IntegrationName::new(&account(), integration).unwrap(),
            target,
            audience,
            action,
            create_time: SystemTime::UNIX_EPOCH,
            update_time: SystemTime::UNIX_EPOCH,
            revision: 1,
        }
    }

    fn acc() -> ScopeTarget {
        ScopeTarget::Account
    }
    fn web(id: &str) -> ScopeTarget {
        ScopeTarget::Website(id.to_owned())
    }
    fn form(id: &str) -> ScopeTarget {
        ScopeTarget::MasterForm(id.to_owned())
    }
    fn camp(id: &str) -> ScopeTarget {
        ScopeTarget::Campaign(id.to_owned())
    }

    fn at(website: Option<&'static str>, campaign: &'static str) -> Placement<'static> {
        Placement {
            website_id: website,
            master_form_id: None,
            campaign_id: campaign,
            identified: true,
        }
    }

    struct Case {
        name: &'static str,
        /// (integration id, enabled).
        integrations: Vec<(&'static str, bool)>,
        scopes: Vec<ScopeRow>,
        placement: Placement<'static>,
        /// Expected firing (integration id, deciding scope id), in order.
        expected: Vec<(&'static str, &'static str)>,
    }

    fn cases() -> Vec<Case> {
        let website7_except_99 = || {
            vec![
                ("web-7", "crm", web("7"), All, P),
                ("not-camp-99", "crm", camp("99"), All, DoNotPush),
            ]
        };
        vec![
            Case {
                name: "no scope: not firing",
                integrations: vec![("crm", true)],
                scopes: vec![],
                placement: at(Some("7"), "1"),
                expected: vec![],
            },
            Case {
                name: "account-level push",
                integrations: vec![("crm", true)],
                scopes: vec![("everything", "crm", acc(), All, P)],
                placement: at(None, "1"),
                expected: vec![("crm", "everything")],
            },
            Case {
                name: "website 7 except campaign 99: campaign 99 excluded",
                integrations: vec![("crm", true)],
                scopes: website7_except_99(),
                placement: at(Some("7"), "99"),
                expected: vec![],
            },
            Case {
                name: "website 7 except campaign 99: other campaign of website 7 fires",
                integrations: vec![("crm", true)],
                scopes: website7_except_99(),
                placement: at(Some("7"), "100"),
                expected: vec![("crm", "web-7")],
            },
            Case {
                name: "website 7 except campaign 99: campaign on website 8 does not fire",
                integrations: vec![("crm", true)],
                scopes: website7_except_99(),
                placement: at(Some("8"), "100"),
                expected: vec![],
            },
            Case {
                name: "website scope needs a website in the placement",
                integrations: vec![("crm", true)],
                scopes: website7_except_99(),
                placement: at(None, "100"),
                expected: vec![],
            },
            Case {
                name: "same level: do-not-push wins over push",
                integrations: vec![("crm", true)],
                scopes: vec![
                    ("a-push", "crm", web("7"), All, P),
                    ("z-block", "crm", web("7"), All, DoNotPush),
                ],
                placement: at(Some("7"), "1"),
                expected: vec![],
            },
            Case {
                name: "more specific push overrides a less specific do-not-push",
                integrations: vec![("crm", true)],
                scopes: vec![
                    ("block-all", "crm", acc(), All, DoNotPush),
                    ("block-web", "crm", web("7"), All, DoNotPush),
                    ("camp-1", "crm", camp("1"), All, P),
                ],
                placement: at(Some("7"), "1"),
                expected: vec![("crm", "camp-1")],
            },
            Case {
                name: "master form level overrides website, campaign overrides master form",
                integrations: vec![("crm", true), ("erp", true)],
                scopes: vec![
                    ("crm-web", "crm", web("7"), All, DoNotPush),
                    ("crm-form", "crm", form("f1"), All, P),
                    ("erp-form", "erp", form("f1"), All, P),
                    ("erp-camp", "erp", camp("1"), All, DoNotPush),
                ],
                placement: Placement {
                    website_id: Some("7"),
                    master_form_id: Some("f1"),
                    campaign_id: "1",
                    identified: false,
                },
                expected: vec![("crm", "crm-form")],
            },
            Case {
                name: "master form scope does not match another or a missing master form",
                integrations: vec![("crm", true)],
                scopes: vec![("crm-form", "crm", form("f1"), All, P)],
                placement: at(Some("7"), "1"),
                expected: vec![],
            },
            Case {
                name: "identified audience matches identified participants",
                integrations: vec![("crm", true)],
                scopes: vec![("ident", "crm", acc(), Identified, P)],
                placement: Placement {
                    identified: true,
                    ..at(None, "1")
                },
                expected: vec![("crm", "ident")],
            },
            Case {
                name: "identified audience ignores anonymous participants",
                integrations: vec![("crm", true)],
                scopes: vec![("ident", "crm", acc(), Identified, P)],
                placement: Placement {
                    identified: false,
                    ..at(None, "1")
                },
                expected: vec![],
            },
            Case {
                name: "anonymous audience matches anonymous participants only",
                integrations: vec![("crm", true), ("erp", true)],
                scopes: vec![
                    ("crm-anon", "crm", acc(), Anonymous, P),
                    ("erp-ident", "erp", acc(), Identified, P),
                ],
                placement: Placement {
                    identified: false,
                    ..at(None, "1")
                },
                expected: vec![("crm", "crm-anon")],
            },
            Case {
                name: "all audience matches anonymous participants",
                integrations: vec![("crm", true)],
                scopes: vec![("all", "crm", acc(), All, P)],
                placement: Placement {
                    identified: false,
                    ..at(None, "1")
                },
                expected: vec![("crm", "all")],
            },
            Case {
                name: "identified push + all do-not-push at one level: identified blocked",
                integrations: vec![("crm", true)],
                scopes: vec![
                    ("ident-push", "crm", web("7"), Identified, P),
                    ("all-block", "crm", web("7"), All, DoNotPush),
                ],
                placement: Placement {
                    identified: true,
                    ..at(Some("7"), "1")
                },
                expected: vec![],
            },
            Case {
                name: "identified push + anonymous do-not-push at one level: identified fires",
                integrations: vec![("crm", true)],
                scopes: vec![
                    ("ident-push", "crm", web("7"), Identified, P),
                    ("anon-block", "crm", web("7"), Anonymous, DoNotPush),
                ],
                placement: Placement {
                    identified: true,
                    ..at(Some("7"), "1")
                },
                expected: vec![("crm", "ident-push")],
            },
            Case {
                name: "disabled integration never resolves",
                integrations: vec![("crm", false), ("erp", true)],
                scopes: vec![
                    ("crm-all", "crm", acc(), All, P),
                    ("crm-camp", "crm", camp("1"), All, P),
                    ("erp-all", "erp", acc(), All, P),
                ],
                placement: at(Some("7"), "1"),
                expected: vec![("erp", "erp-all")],
            },
            Case {
                name: "scopes of an integration not listed are ignored",
                integrations: vec![("crm", true)],
                scopes: vec![
                    ("ghost-all", "ghost", acc(), All, P),
                    ("crm-block", "ghost", camp("1"), All, DoNotPush),
                    ("crm-all", "crm", acc(), All, P),
                ],
                placement: at(Some("7"), "1"),
                expected: vec![("crm", "crm-all")],
            },
            Case {
                name: "equal pushes: the lowest scope name decides, whatever the input order",
                integrations: vec![("crm", true)],
                scopes: vec![
                    ("web-c", "crm", web("7"), All, P),
                    ("web-a", "crm", web("7"), Identified, P),
                    ("web-b", "crm", web("7"), All, P),
                    ("everything", "crm", acc(), All, P),
                ],
                placement: at(Some("7"), "1"),
                expected: vec![("crm", "web-a")],
            },
            Case {
                name: "multiple integrations ordered by name",
                integrations: vec![
                    ("zeta", true),
                    ("alpha", true),
                    ("mid", true),
                    ("off", true),
                ],
                scopes: vec![
                    ("z", "zeta", acc(), All, P),
                    ("m", "mid", web("7"), All, P),
                    ("a", "alpha", camp("1"), All, P),
                    ("o", "off", acc(), All, DoNotPush),
                ],
                placement: at(Some("7"), "1"),
                expected: vec![("alpha", "a"), ("mid", "m"), ("zeta", "z")],
            },
        ]
    }

    fn ids(pushes: &[Push<'_>]) -> Vec<(String, String)> {
        pushes
            .iter()
            .map(|p| {
                (
                    p.integration.name.id().to_owned(),
                    p.decided_by.name.id().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn resolve_table() {
        for case in cases() {
            let integrations: Vec<Integration> = case
                .integrations
                .iter()
                .map(|(id, enabled)| integration(id, *enabled))
                .collect();
            let scopes: Vec<PushScope> = case.scopes.iter().map(scope).collect();
            let expected: Vec<(String, String)> = case
                .expected
                .iter()
                .map(|(i, s)| ((*i).to_owned(), (*s).to_owned()))
                .collect();

            let got = resolve(&integrations, &scopes, &case.placement);
            assert_eq!(ids(&got), expected, "{}", case.name);

            // Input order must not change the answer.
            let reversed: Vec<PushScope> = scopes.iter().rev().cloned().collect();
            let got = resolve(&integrations, &reversed, &case.placement);
            assert_eq!(ids(&got), expected, "{} (scopes reversed)", case.name);

            // `resolve` and `deciding_scope` agree for every enabled integration.
            for i in integrations.iter().filter(|i| i.enabled) {
                let own = scopes.iter().filter(|s| s.integration == i.name);
                let decided = deciding_scope(own, &case.placement)
                    .filter(|s| s.action == PushAction::Push)
                    .map(|s| (i.name.id().to_owned(), s.name.id().to_owned()));
                let from_resolve = expected.iter().find(|(id, _)| id == i.name.id()).cloned();
                assert_eq!(decided, from_resolve, "{} ({})", case.name, i.name);
            }
        }
    }

    #[test]
    fn deciding_scope_reports_do_not_push_and_none() {
        let scopes: Vec<PushScope> = [
            ("web-7", "crm", web("7"), All, P),
            ("not-camp-99", "crm", camp("99"), All, DoNotPush),
        ]
        .iter()
        .map(scope)
        .collect();
        let decided = |website, campaign| {
            deciding_scope(&scopes, &at(website, campaign)).map(|s| s.name.id().to_owned())
        };
        assert_eq!(decided(Some("7"), "99").as_deref(), Some("not-camp-99"));
        assert_eq!(decided(Some("7"), "1").as_deref(), Some("web-7"));
        assert_eq!(decided(Some("8"), "1"), None);
    }

    #[test]
    fn scope_matches_table() {
        let p = Placement {
            website_id: Some("7"),
            master_form_id: Some("f1"),
            campaign_id: "99",
            identified: false,
        };
        // (target, audience, expected match for the placement above)
        let rows: Vec<(ScopeTarget, Audience, bool)> = vec![
            (acc(), All, true),
            (acc(), Anonymous, true),
            (acc(), Identified, false),
            (web("7"), All, true),
            (web("70"), All, false),
            (form("f1"), All, true),
            (form("f2"), All, false),
            (camp("99"), All, true),
            (camp("9"), All, false),
            (camp("99"), Identified, false),
        ];
        for (target, audience, expected) in rows {
            let s = scope(&("s", "crm", target.clone(), audience, P));
            assert_eq!(scope_matches(&s, &p), expected, "{target:?} {audience:?}");
        }
    }

    #[test]
    fn thousands_of_scopes_resolve() {
        // 500 integrations with 40 scopes each: half website-7 pushes (matching), half pushes
        // for another campaign (not matching). A quadratic implementation would take seconds.
        let integrations: Vec<Integration> = (0..500)
            .map(|i| integration(&format!("int-{i:03}"), true))
            .collect();
        let scopes: Vec<PushScope> = (0..20_000)
            .map(|n| {
                let target = if (n / 500) % 2 == 0 {
                    web("7")
                } else {
                    camp("2")
                };
                make_scope(
                    &format!("s-{n:05}"),
                    &format!("int-{:03}", n % 500),
                    target,
                    All,
                    P,
                )
            })
            .collect();
        let got = resolve(&integrations, &scopes, &at(Some("7"), "1"));
        assert_eq!(got.len(), 500);
        assert!(
            got.windows(2)
                .all(|w| w[0].integration.name < w[1].integration.name)
        );
        // int-000 owns s-00000, s-00500, ...; the lowest matching name decides.
        assert_eq!(got[0].decided_by.name.id(), "s-00000");
        assert_eq!(got[1].decided_by.name.id(), "s-00001");
    }
}
