//! Layering: graphgate's top-level modules (auth, cache, config, error, graph, proxy, quota,
//! ...) must not import each other in a cycle, so lower layers can be read, tested and
//! changed without the ones above them.
//!
//! The module graph is read from the sources: an edge `a -> b` for every `crate::b` path
//! (in `use` trees, in code, in macro arguments) and every `super::`/`self::` path that
//! resolves to `b`, in a file of module `a`. Test-only code (`#[cfg(test)]`) is left out: the
//! layering is about what is built into the gateway.
//!
//! The layers, bottom up: the Graph request model (`graph`), the error type (`error`) and
//! configuration; then the components (tokens, quota, cache, upstream, auth, tls, rewrite);
//! then the pipeline (`proxy`); then `server`, `admin` and the binary. There are no cycles
//! today. An edge on a cycle fails the test with the cycle printed, unless it is listed in
//! [`ALLOWED_CYCLE_EDGES`] with why; an entry whose edge is no longer on a cycle fails too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Edges on a module cycle that are known and tolerated for now: `(from, to, why)`. Empty:
/// a cycle is fixed by moving what the lower module needs below it, not by listing it here.
const ALLOWED_CYCLE_EDGES: &[(&str, &str, &str)] = &[];

/// A module edge `from -> to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    from: String,
    to: String,
}

/// The module graph: every edge with the places it comes from (`file: crate::b::item`).
type Graph = BTreeMap<Edge, BTreeSet<String>>;

/// The top-level module a source file belongs to and its module path (`src/cache/l2.rs` is
/// `["cache", "l2"]`); `None` for the crate root files, which only declare modules.
fn module_path_of(rel: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop()?;
    let stem = file.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return None;
    }
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    Some(parts)
}

/// Collects the modules a file's (non-test) code refers to, as paths from the crate root.
struct Refs {
    /// The module the visitor is in: the file's, plus inline `mod` blocks.
    here: Vec<String>,
    found: BTreeSet<Vec<String>>,
}

impl Refs {
    /// Resolves a path's leading `crate`/`super`/`self` segments; `None` for paths that start
    /// elsewhere (other crates, local names).
    fn resolve(&self, segments: &[String]) -> Option<Vec<String>> {
        let first = segments.first()?;
        let (mut base, rest) = match first.as_str() {
            "crate" => (Vec::new(), &segments[1..]),
            "self" => (self.here.clone(), &segments[1..]),
            "super" => {
                let mut base = self.here.clone();
                let mut rest = segments;
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
                (base, rest)
            }
            _ => return None,
        };
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn add(&mut self, segments: &[String]) {
        if let Some(p) = self.resolve(segments) {
            self.found.insert(p);
        }
    }

    /// Every path a `use` tree names (groups and renames expanded).
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.add(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.add(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.add(prefix),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// `crate :: a :: b` sequences in a macro's tokens (macro arguments are not parsed as code).
fn paths_in_tokens(tokens: proc_macro2::TokenStream, out: &mut Vec<Vec<String>>) {
    use proc_macro2::TokenTree;
    let trees: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < trees.len() {
        match &trees[i] {
            TokenTree::Group(g) => paths_in_tokens(g.stream(), out),
            TokenTree::Ident(id)
                if matches!(id.to_string().as_str(), "crate" | "super" | "self") =>
            {
                let mut path = vec![id.to_string()];
                let mut j = i + 1;
                loop {
                    let colons = matches!(
                        (trees.get(j), trees.get(j + 1)),
                        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
                            if a.as_char() == ':' && b.as_char() == ':'
                    );
                    match (colons, trees.get(j + 2)) {
                        (true, Some(TokenTree::Ident(next))) => {
                            path.push(next.to_string());
                            j += 3;
                        }
                        _ => break,
                    }
                }
                if path.len() > 1 {
                    out.push(path);
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Trait(t) => &t.attrs,
            syn::Item::Type(t) => &t.attrs,
            syn::Item::Macro(m) => &m.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if is_test_only(attrs) {
            return;
        }
        match item {
            syn::Item::Mod(m) if m.content.is_some() => {
                self.here.push(m.ident.to_string());
                syn::visit::visit_item_mod(self, m);
                self.here.pop();
            }
            syn::Item::Use(u) => {
                let mut prefix = Vec::new();
                self.use_tree(&mut prefix, &u.tree);
            }
            _ => syn::visit::visit_item(self, item),
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test_only(&f.attrs) {
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.add(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        let mut paths = Vec::new();
        paths_in_tokens(mac.tokens.clone(), &mut paths);
        for p in paths {
            self.add(&p);
        }
        syn::visit::visit_macro(self, mac);
    }
}

/// The graph of top-level modules: `files` are `(path under src/, source)`; `modules` are
/// the top-level module names (edges to anything else, such as items of the crate root,
/// are not module edges).
fn module_graph(files: &[(PathBuf, String)], modules: &BTreeSet<String>) -> Result<Graph, String> {
    let mut edges = Graph::new();
    for (rel, source) in files {
        let Some(here) = module_path_of(rel) else {
            continue;
        };
        let ast = syn::parse_file(source).map_err(|e| format!("{}: {e}", rel.display()))?;
        let mut refs = Refs {
            here: here.clone(),
            found: BTreeSet::new(),
        };
        refs.visit_file(&ast);
        for target in refs.found {
            let (Some(from), Some(to)) = (here.first(), target.first()) else {
                continue;
            };
            if from != to && modules.contains(to) {
                let edge = Edge {
                    from: from.clone(),
                    to: to.clone(),
                };
                let place = format!("{}: crate::{}", rel.display(), target.join("::"));
                edges.entry(edge).or_default().insert(place);
            }
        }
    }
    Ok(edges)
}

/// Strongly connected components with more than one module: the module cycles.
fn cycles(edges: &Graph) -> Vec<BTreeSet<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in edges.keys() {
        next.entry(&e.from).or_default().push(&e.to);
        next.entry(&e.to).or_default();
    }
    let reaches = |from: &str| -> BTreeSet<&str> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from];
        while let Some(m) = todo.pop() {
            for &n in &next[m] {
                if seen.insert(n) {
                    todo.push(n);
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&str, BTreeSet<&str>> = next.keys().map(|&m| (m, reaches(m))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for (&m, r) in &reach {
        let component: BTreeSet<String> = r
            .iter()
            .filter(|&&n| reach[n].contains(m))
            .map(|n| n.to_string())
            .collect();
        if component.len() > 1 && !out.contains(&component) {
            out.push(component);
        }
    }
    out
}

/// The edges that lie on a cycle (both ends in the same cycle).
fn cycle_edges(edges: &Graph) -> BTreeSet<Edge> {
    let cycles = cycles(edges);
    edges
        .keys()
        .filter(|e| {
            cycles
                .iter()
                .any(|c| c.contains(&e.from) && c.contains(&e.to))
        })
        .cloned()
        .collect()
}

/// One cycle through `edge`: `a -> b -> ... -> a`.
fn cycle_through(edges: &Graph, edge: &Edge) -> String {
    // Breadth-first from edge.to back to edge.from: the shortest way round.
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut todo = std::collections::VecDeque::from([edge.to.as_str()]);
    while let Some(m) = todo.pop_front() {
        if m == edge.from {
            break;
        }
        for e in edges.keys().filter(|e| e.from == m) {
            if e.to != edge.to && !came_from.contains_key(e.to.as_str()) {
                came_from.insert(&e.to, m);
                todo.push_back(&e.to);
            }
        }
    }
    let mut path = vec![edge.from.as_str()];
    let mut at = edge.from.as_str();
    while at != edge.to {
        match came_from.get(at) {
            Some(&prev) => {
                path.push(prev);
                at = prev;
            }
            None => break,
        }
    }
    path.reverse();
    path.insert(0, &edge.from);
    path.join(" -> ")
}

fn sources_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            out.push((rel, std::fs::read_to_string(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// The modules `src/lib.rs` declares.
fn top_level_modules(lib: &str) -> BTreeSet<String> {
    let ast = syn::parse_file(lib).expect("src/lib.rs parses");
    ast.items
        .iter()
        .filter_map(|i| match i {
            syn::Item::Mod(m) => Some(m.ident.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn top_level_modules_form_no_new_cycle() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = top_level_modules(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    for m in [
        "auth", "cache", "config", "error", "graph", "proxy", "quota",
    ] {
        assert!(
            modules.contains(m),
            "src/lib.rs declares no {m}: {modules:?}"
        );
    }
    let edges = module_graph(&sources_under(&src), &modules).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        edges.len() > 10,
        "too few module edges found, the reader is broken: {edges:?}"
    );
    let on_cycles = cycle_edges(&edges);
    let allowed: BTreeSet<Edge> = ALLOWED_CYCLE_EDGES
        .iter()
        .map(|(from, to, _)| Edge {
            from: from.to_string(),
            to: to.to_string(),
        })
        .collect();
    let new: Vec<String> = on_cycles
        .difference(&allowed)
        .map(|e| {
            let places: Vec<&String> = edges[e].iter().take(3).collect();
            format!(
                "  {} -> {}   cycle: {}; from {places:?}",
                e.from,
                e.to,
                cycle_through(&edges, e)
            )
        })
        .collect();
    let stale: Vec<String> = allowed
        .difference(&on_cycles)
        .map(|e| format!("  {} -> {}", e.from, e.to))
        .collect();
    assert!(
        new.is_empty(),
        "module edges on a cycle that ALLOWED_CYCLE_EDGES does not list (a lower layer \
         importing a higher one?):\n{}",
        new.join("\n")
    );
    assert!(
        stale.is_empty(),
        "ALLOWED_CYCLE_EDGES lists edges that are no longer on a cycle; remove them:\n{}",
        stale.join("\n")
    );
}

#[test]
fn the_module_graph_reader_finds_edges_and_cycles() {
    let file = |path: &str, source: &str| (PathBuf::from(path), source.to_string());
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    let files = vec![
        file("lib.rs", "pub mod a; pub mod b; pub mod c; pub mod d;"),
        // a -> b through a use group, in a submodule file, with a rename.
        file(
            "a/inner.rs",
            "use crate::{b::{self as bee}, d};\nfn f() {}",
        ),
        // b -> c through a path in code, c -> a through super:: from a top-level file.
        file("b.rs", "fn f() { crate::c::go(); }"),
        file("c/mod.rs", "use super::a::Thing;\nmod deep { use super::super::d::X; }"),
        // d -> a only in a macro's arguments; b's test-only import of d is no edge.
        file(
            "d.rs",
            "fn f() { tracing::info!(\"{}\", crate::a::NAME); }\n#[cfg(test)]\nmod tests { use crate::b::x; }",
        ),
        file("b/tests_only.rs", "#[cfg(test)]\nuse crate::d::y;"),
    ];
    let edges = module_graph(&files, &modules).unwrap();
    let pairs: Vec<(&str, &str)> = edges
        .keys()
        .map(|e| (e.from.as_str(), e.to.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("a", "b"),
            ("a", "d"),
            ("b", "c"),
            ("c", "a"),
            ("c", "d"),
            ("d", "a")
        ]
    );
    let found = cycles(&edges);
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0],
        ["a", "b", "c", "d"].map(String::from).into(),
        "a -> b -> c -> a and a -> d -> a share a"
    );
    let a_b = Edge {
        from: "a".into(),
        to: "b".into(),
    };
    assert_eq!(cycle_through(&edges, &a_b), "a -> b -> c -> a");
    // Without c -> a and d -> a there is no cycle.
    assert_eq!(
        edges[&Edge {
            from: "d".into(),
            to: "a".into()
        }],
        ["d.rs: crate::a::NAME".to_string()].into()
    );
    let acyclic: Graph = edges.into_iter().filter(|(e, _)| e.to != "a").collect();
    assert!(cycles(&acyclic).is_empty());
    assert!(cycle_edges(&acyclic).is_empty());
}

#[test]
fn unparsable_sources_are_an_error_naming_the_file() {
    let modules: BTreeSet<String> = ["a"].map(String::from).into();
    let err = module_graph(&[(PathBuf::from("a.rs"), "fn (".into())], &modules).unwrap_err();
    assert!(err.starts_with("a.rs:"), "{err}");
}
