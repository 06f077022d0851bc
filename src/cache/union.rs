//! Field-union fills: concurrent misses for one node that ask for different fields share one
//! upstream call for the union of their fields, and each caller gets its own projection.
//!
//! The group is the node's base key (the read without `fields`). Within
//! `[cache] union_window_ms` a miss adds its fields when the union is allowed: no member
//! name with two meanings, at most [`projection::MAX_UNION_FIELDS`] fields, a URL within
//! `upstream.max_get_url_bytes`. While the call is in flight, a miss whose fields the union
//! covers waits for it. See [`super::gather`].

use super::gather::{Gatherings, Part};
use super::key::KeyId;
use super::projection;
use super::Fill;
use crate::error::ProxyError;
use crate::graph::fields::Fields;

/// What a union fill produced: the fields it asked Graph for and its fill.
pub type UnionResult = Result<(Fields, Fill), ProxyError>;

/// A gathering's fields (normalized) and how many distinct callers they serve.
#[derive(Clone)]
pub struct UnionFields {
    pub fields: Fields,
    pub callers: usize,
}

pub type Unions = Gatherings<UnionFields, UnionResult>;

/// Joins the union call for `base` that covers `want` (or can take it, while gathering),
/// or opens one. `fits` says whether a union still makes an acceptable upstream call.
pub fn join(
    unions: &Unions,
    base: KeyId,
    want: &Fields,
    fits: impl Fn(&Fields) -> bool,
) -> Part<UnionFields, UnionResult> {
    let want = want.normalized();
    unions.join(
        base,
        || UnionFields {
            fields: want.clone(),
            callers: 1,
        },
        |u, open| {
            if projection::covers(&u.fields, &want) {
                u.callers += 1;
                return true;
            }
            if !open {
                return false;
            }
            match projection::union(&u.fields, &want).filter(|f| fits(f)) {
                Some(f) => {
                    u.fields = f;
                    u.callers += 1;
                    true
                }
                None => false,
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> Fields {
        Fields::parse(s).unwrap()
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
        let closed = lead.close();
        assert_eq!(closed.fields.canonical(), "about,id,name");
        assert_eq!(closed.callers, 2);
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
