//! Merged node reads: concurrent misses for different nodes of one Page, with the same
//! parameters, fetched by one `ids=` call (`[cache] merge_window_ms`). Graph still counts
//! one call per id, so this saves round trips and connections, not Page budget.
//!
//! The group is the Page with the reads' version, parameters and token identity; a gathering
//! takes at most [`MAX_MERGED`] nodes (Graph's `ids=` limit). See [`super::gather`].

use std::sync::Arc;

use super::gather::{Gatherings, Part};
use super::key::KeyId;
use super::Fill;
use crate::error::ProxyError;

/// Most nodes in one `ids=` call.
pub const MAX_MERGED: usize = 50;

/// The fill of each node a merged call answered; a node not listed (its member was missing,
/// or Graph rejected the whole call) is filled on its own.
pub type MergeResult = Result<Arc<Vec<(String, Fill)>>, ProxyError>;

pub type Merges = Gatherings<Vec<String>, MergeResult>;

/// Joins the merged call of `group` that holds `node` (or can take it, while gathering), or
/// opens one.
pub fn join(merges: &Merges, group: KeyId, node: &str) -> Part<Vec<String>, MergeResult> {
    merges.join(
        group,
        || vec![node.to_string()],
        |nodes, open| {
            if nodes.iter().any(|n| n == node) {
                return true;
            }
            if open && nodes.len() < MAX_MERGED {
                nodes.push(node.to_string());
                return true;
            }
            false
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_takes_up_to_fifty_nodes_while_open() {
        let merges = Merges::new(true);
        let group = KeyId(7);
        let Part::Lead(lead, _) = join(&merges, group, "1001_0") else {
            panic!("leads");
        };
        for n in 1..MAX_MERGED {
            assert!(matches!(
                join(&merges, group, &format!("1001_{n}")),
                Part::Joined(_)
            ));
        }
        assert!(matches!(join(&merges, group, "1001_99"), Part::Alone));
        assert!(matches!(join(&merges, group, "1001_3"), Part::Joined(_)));
        let nodes = lead.close();
        assert_eq!(nodes.len(), MAX_MERGED);
        assert!(matches!(join(&merges, group, "1001_98"), Part::Alone));
    }
}
