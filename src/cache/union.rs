//! Field-union fills: concurrent misses for one node that ask for different fields share one
//! upstream call for the union of their fields, and each caller gets its own projection.
//!
//! The group is the node's base key (the read without `fields`). Within
//! `[cache] union_window_ms` a miss adds its fields when the union is allowed: no member
//! name with two meanings, at most [`projection::MAX_UNION_FIELDS`] fields, a URL within
//! `upstream.max_get_url_bytes`. While the call is in flight, a miss whose fields the union
//! covers waits for it. See [`super::gather`].

use super::coalesce::Waiter;
use super::gather::{Gatherings, Part};
use super::key::KeyId;
use super::projection;
use super::Fill;
use crate::error::ProxyError;
use crate::graph::fields::Fields;

/// What a union fill produced: the fields it asked Graph for and its fill.
pub type UnionResult = Result<(Fields, Fill), ProxyError>;

/// The gatherings of node reads by base key; each collects the union of its callers' fields
/// (normalized).
pub type Unions = Gatherings<Fields, UnionResult>;

/// Joins the union call for `base` that covers `want` (normalized: [`Fields::normalized`])
/// or can take it, while gathering, or opens one. `fits` says whether a union still makes an
/// acceptable upstream call.
pub fn join(
    unions: &Unions,
    base: KeyId,
    want: &Fields,
    fits: impl Fn(&Fields) -> bool,
) -> Part<Fields, UnionResult> {
    debug_assert_eq!(*want, want.normalized(), "join takes normalized fields");
    unions.join(
        base,
        || want.clone(),
        |u, open| {
            if projection::covers(u, want) {
                return true;
            }
            if !open {
                return false;
            }
            match projection::union(u, want).filter(|f| fits(f)) {
                Some(f) => {
                    *u = f;
                    true
                }
                None => false,
            }
        },
    )
}

/// Joins the union call for `base` when one is gathering or in flight and its fields cover
/// `want`; opens nothing (an `ids=` member waits for a node read's call this way).
pub fn join_covering(unions: &Unions, base: KeyId, want: &Fields) -> Option<Waiter<UnionResult>> {
    unions.join_existing(base, |u, _| projection::covers(u, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Fields {
        Fields::parse(s).unwrap().normalized()
    }

    #[test]
    fn an_open_union_takes_compatible_fields_and_a_closed_one_only_covered_ones() {
        let unions = Unions::new(true);
        let base = KeyId(1);
        let Part::Lead(lead, _) = join(&unions, base, &f("id,name"), |_| true) else {
            panic!("the first miss leads");
        };
        assert!(matches!(
            join(&unions, base, &f("about"), |_| true),
            Part::Joined(_)
        ));
        // A member name with two meanings cannot share the call.
        assert!(matches!(
            join(&unions, base, &f("feed.limit(2).as(about)"), |_| true),
            Part::Alone
        ));
        // Too long a URL: not added.
        assert!(matches!(
            join(&unions, base, &f("category"), |u| u.fields().len() < 4),
            Part::Alone
        ));
        assert_eq!(lead.close().canonical(), "about,id,name");
        // In flight: covered fields join, others fill alone.
        assert!(matches!(
            join(&unions, base, &f("name"), |_| true),
            Part::Joined(_)
        ));
        assert!(matches!(
            join(&unions, base, &f("fan_count"), |_| true),
            Part::Alone
        ));
    }
}
