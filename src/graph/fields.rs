//! Field-expansion parsing and canonical form.
//!
//! Graph's `fields=` parameter has no published grammar. We accept the shape Meta documents —
//! `albums.limit(5){name,photos.limit(2){name,picture}},posts.limit(5)` — leniently:
//!
//! ```text
//! list     := ws? ( field ( ws? ',' ws? field )* )? ws?
//! field    := name ( ws? '.' ws? name ws? '(' args ')' )* ( ws? '{' list '}' )?
//! name     := [A-Za-z0-9_:-]+
//! args     := raw text with balanced parentheses (may contain commas, braces, any UTF-8)
//! ```
//!
//! The canonical form exists so that semantically identical requests share one cache key and
//! one upstream call: field order and exact duplicates do not change Graph's reply (JSON object
//! key order is not significant), so they are normalised away at every level. Anything we do not
//! understand (modifier order, argument text) is kept verbatim.
//!
//! The parser is iterative with an explicit stack, so it runs in linear time and cannot
//! overflow the call stack however hostile the input; depth and length are capped up front.

use std::fmt;
use std::sync::Arc;

/// Longest `fields=` value we accept, in bytes. Graph itself fails GETs far shorter than this.
pub const MAX_FIELDS_LEN: usize = 100_000;
/// Deepest `{…}` nesting we accept. Real requests rarely exceed 4–5 levels.
pub const MAX_DEPTH: usize = 32;

/// A parsed field list, in request order (use [`Fields::normalized`] or
/// [`Fields::canonical`] for the order-independent form).
///
/// Never changed once built, and shared rather than copied: a miss hands its field list to
/// the fill, the union gathering, the coalesced waiters and the store, and a copy of a list
/// of n fields would cost n + 1 allocations each time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields {
    fields: Arc<[Field]>,
}

/// One field or edge with its modifiers and optional nested field list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub modifiers: Vec<Modifier>,
    /// `None` when there was no `{…}`; `Some(empty)` for a literal `{}`, which is kept because
    /// we do not know what Graph makes of it.
    pub children: Option<Fields>,
}

/// A `.name(args)` modifier; `args` is the raw text between the parentheses, trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modifier {
    pub name: String,
    pub args: String,
}

/// Why a `fields=` value could not be parsed. Positions are byte offsets into the input.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FieldsError {
    #[error("fields value is {len} bytes long, the maximum is {max}")]
    TooLong { len: usize, max: usize },
    #[error("fields nested deeper than {max} levels at byte {pos}")]
    TooDeep { pos: usize, max: usize },
    #[error("unclosed '{{' at byte {pos}")]
    UnclosedBrace { pos: usize },
    #[error("unmatched '}}' at byte {pos}")]
    UnmatchedCloseBrace { pos: usize },
    #[error("unclosed '(' at byte {pos}")]
    UnclosedParen { pos: usize },
    #[error("unmatched ')' at byte {pos}")]
    UnmatchedCloseParen { pos: usize },
    #[error("empty field name at byte {pos}")]
    EmptyFieldName { pos: usize },
    #[error("empty modifier name at byte {pos}")]
    EmptyModifierName { pos: usize },
    #[error("expected '(' after modifier name at byte {pos}")]
    ExpectedParen { pos: usize },
    #[error("unexpected character {ch:?} at byte {pos}")]
    UnexpectedChar { ch: char, pos: usize },
}

impl Fields {
    /// Parses a `fields=` value (already URL-decoded). An empty or all-whitespace value gives
    /// an empty list.
    pub fn parse(s: &str) -> Result<Fields, FieldsError> {
        if s.len() > MAX_FIELDS_LEN {
            return Err(FieldsError::TooLong {
                len: s.len(),
                max: MAX_FIELDS_LEN,
            });
        }
        Parser {
            s,
            b: s.as_bytes(),
            i: 0,
        }
        .run()
    }

    /// The canonical text: at every level fields sorted by their canonical text with exact
    /// duplicates removed, no whitespace, modifiers in request order with trimmed raw args.
    pub fn canonical(&self) -> String {
        canonical_list(self)
    }

    /// The same list in canonical order with duplicates removed, recursively;
    /// `Fields::parse(&f.canonical()) == Ok(f.normalized())`.
    pub fn normalized(&self) -> Fields {
        // A flat list of plain names (most reads) sorts by name: its canonical text is the
        // names, so the texts `normalized_list` builds for nested lists are not needed.
        if self
            .fields
            .iter()
            .all(|f| f.modifiers.is_empty() && f.children.is_none())
        {
            let mut names: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            let fields = names
                .into_iter()
                .map(|name| Field {
                    name: name.to_string(),
                    modifiers: Vec::new(),
                    children: None,
                })
                .collect();
            return Fields { fields };
        }
        normalized_list(self).0
    }

    /// Top-level field names in request order (duplicates included).
    pub fn top_level_names(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|f| f.name.as_str())
    }

    /// Whether a top-level field has this name, ignoring ASCII case: this backs deny checks
    /// (`access_token`), and Graph's case handling of field names is undocumented, so we err
    /// on the side of matching.
    pub fn contains_top_level(&self, name: &str) -> bool {
        self.top_level_names().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// Like [`Fields::contains_top_level`] but at any nesting depth: `accounts{access_token}`
    /// on `/me` returns Page tokens just as `access_token` on a Page does.
    pub fn contains_at_any_depth(&self, name: &str) -> bool {
        // Depth is bounded by MAX_DEPTH for parsed input, so recursion is fine here.
        self.fields.iter().any(|f| {
            f.name.eq_ignore_ascii_case(name)
                || f.children
                    .as_ref()
                    .is_some_and(|c| c.contains_at_any_depth(name))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields at this level, in request order.
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }
}

impl Field {
    /// Canonical text of this one field (name, modifiers, canonical children).
    pub fn canonical(&self) -> String {
        let mut out = String::with_capacity(self.name.len());
        write_field_head(self, &mut out);
        if let Some(children) = &self.children {
            out.push('{');
            out.push_str(&canonical_list(children));
            out.push('}');
        }
        out
    }
}

/// Displays the canonical text.
impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

/// Parse and return the canonical text in one go.
///
/// Most `fields` values are a flat list of names (`id,name,fan_count`); those skip the tree
/// (see [`simple_list`]) and give the same text the full parser would.
pub fn canonicalize(s: &str) -> Result<String, FieldsError> {
    if let Some(mut names) = simple_list(s) {
        names.sort_unstable();
        names.dedup();
        return Ok(names.join(","));
    }
    Fields::parse(s).map(|f| f.canonical())
}

/// The names of a flat, valid field list (names separated by commas, ASCII whitespace
/// around them allowed), in request order; `None` for anything else (nesting, modifiers,
/// aliases, empty names, errors), which needs [`Fields::parse`]. For such a list,
/// `Fields::parse` yields exactly these names with no modifiers or children: the hit path's
/// shortcut around building the tree twice per request (fields check and cache key).
pub fn simple_list(s: &str) -> Option<Vec<&str>> {
    let mut names = Vec::with_capacity(8);
    for_each_simple_name(s, |name| names.push(name))?;
    Some(names)
}

/// Calls `f` with each name of a flat list, in order, and returns `Some` if `s` is one (as
/// [`simple_list`] decides), without collecting. One pass over the bytes: the `split` and
/// `trim_matches` version was ~1.4 k instructions for seven names, twice per hit.
pub fn for_each_simple_name<'a>(s: &'a str, mut f: impl FnMut(&'a str)) -> Option<()> {
    if s.len() > MAX_FIELDS_LEN {
        return None;
    }
    let b = s.as_bytes();
    let mut start = 0;
    loop {
        let end = memchr::memchr(b',', &b[start..]).map_or(b.len(), |i| start + i);
        let (mut lo, mut hi) = (start, end);
        while lo < hi && b[lo].is_ascii_whitespace() {
            lo += 1;
        }
        while hi > lo && b[hi - 1].is_ascii_whitespace() {
            hi -= 1;
        }
        if lo == hi || !b[lo..hi].iter().all(|&c| is_name_byte(c)) {
            return None;
        }
        // ASCII at both ends: always a char boundary, so `get` never declines.
        f(s.get(lo..hi)?);
        if end == b.len() {
            return Some(());
        }
        start = end + 1;
    }
}

fn write_field_head(f: &Field, out: &mut String) {
    out.push_str(&f.name);
    for m in &f.modifiers {
        out.push('.');
        out.push_str(&m.name);
        out.push('(');
        out.push_str(&m.args);
        out.push(')');
    }
}

fn canonical_list(list: &Fields) -> String {
    let mut texts: Vec<String> = list.fields.iter().map(Field::canonical).collect();
    texts.sort_unstable();
    texts.dedup();
    texts.join(",")
}

/// Returns the normalised list together with its canonical text, so each level's text is
/// built once rather than recomputed by every ancestor.
fn normalized_list(list: &Fields) -> (Fields, String) {
    let mut items: Vec<(String, Field)> = list
        .fields
        .iter()
        .map(|f| {
            let mut text = String::new();
            write_field_head(f, &mut text);
            let children = f.children.as_ref().map(|c| {
                let (norm, child_text) = normalized_list(c);
                text.push('{');
                text.push_str(&child_text);
                text.push('}');
                norm
            });
            let field = Field {
                name: f.name.clone(),
                modifiers: f.modifiers.clone(),
                children,
            };
            (text, field)
        })
        .collect();
    items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    items.dedup_by(|a, b| a.0 == b.0);
    let text = items
        .iter()
        .map(|(t, _)| t.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let fields = items.into_iter().map(|(_, f)| f).collect();
    (Fields { fields }, text)
}

/// A field whose `{` has been opened but not yet closed.
struct Frame {
    /// The enclosing list as it was when the brace opened.
    siblings: Vec<Field>,
    field: Field,
    open_pos: usize,
}

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b':' | b'-')
}

fn trim_ascii_ws(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace())
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    /// The (possibly multibyte) character at the current position, for error messages.
    fn unexpected(&self) -> FieldsError {
        match self.peek() {
            Some(b')') => FieldsError::UnmatchedCloseParen { pos: self.i },
            Some(b'}') => FieldsError::UnmatchedCloseBrace { pos: self.i },
            _ => FieldsError::UnexpectedChar {
                // `i` only ever advances over ASCII bytes or whole args, so it is on a char
                // boundary; fall back to U+FFFD rather than panic if that ever changes.
                ch: self
                    .s
                    .get(self.i..)
                    .and_then(|r| r.chars().next())
                    .unwrap_or('\u{FFFD}'),
                pos: self.i,
            },
        }
    }

    fn name(&mut self) -> &str {
        let start = self.i;
        while self.peek().is_some_and(is_name_byte) {
            self.i += 1;
        }
        &self.s[start..self.i]
    }

    fn run(mut self) -> Result<Fields, FieldsError> {
        let mut stack: Vec<Frame> = Vec::new();
        let mut current: Vec<Field> = Vec::new();
        // True right after `{` or at the start: the list may be empty here.
        let mut list_start = true;

        loop {
            // Expecting a field (or, at a list start, the end of an empty list).
            self.skip_ws();
            match self.peek() {
                None => {
                    if let Some(top) = stack.last() {
                        return Err(FieldsError::UnclosedBrace { pos: top.open_pos });
                    }
                    if list_start {
                        return Ok(Fields {
                            fields: current.into(),
                        });
                    }
                    return Err(FieldsError::EmptyFieldName { pos: self.i });
                }
                Some(b'}') if list_start => {
                    self.close_brace(&mut stack, &mut current)?;
                }
                Some(_) => {
                    let field = self.field_head()?;
                    self.skip_ws();
                    if self.peek() == Some(b'{') {
                        if stack.len() >= MAX_DEPTH {
                            return Err(FieldsError::TooDeep {
                                pos: self.i,
                                max: MAX_DEPTH,
                            });
                        }
                        stack.push(Frame {
                            siblings: std::mem::take(&mut current),
                            field,
                            open_pos: self.i,
                        });
                        self.i += 1;
                        list_start = true;
                        continue;
                    }
                    current.push(field);
                }
            }

            // After a complete field: a separator, a closing brace, or the end.
            loop {
                self.skip_ws();
                match self.peek() {
                    None => {
                        if let Some(top) = stack.last() {
                            return Err(FieldsError::UnclosedBrace { pos: top.open_pos });
                        }
                        return Ok(Fields {
                            fields: current.into(),
                        });
                    }
                    Some(b',') => {
                        self.i += 1;
                        list_start = false;
                        break;
                    }
                    Some(b'}') => self.close_brace(&mut stack, &mut current)?,
                    Some(_) => return Err(self.unexpected()),
                }
            }
        }
    }

    /// Consumes a `}` at the current position, attaching the finished list to its parent.
    fn close_brace(
        &mut self,
        stack: &mut Vec<Frame>,
        current: &mut Vec<Field>,
    ) -> Result<(), FieldsError> {
        let Some(mut frame) = stack.pop() else {
            return Err(FieldsError::UnmatchedCloseBrace { pos: self.i });
        };
        frame.field.children = Some(Fields {
            fields: std::mem::replace(current, frame.siblings).into(),
        });
        current.push(frame.field);
        self.i += 1;
        Ok(())
    }

    /// Parses `name(.modifier(args))*`, leaving the position after the last modifier.
    fn field_head(&mut self) -> Result<Field, FieldsError> {
        let pos = self.i;
        let name = self.name().to_owned();
        if name.is_empty() {
            return Err(match self.peek() {
                Some(b',' | b'{' | b'}' | b'.') => FieldsError::EmptyFieldName { pos },
                _ => self.unexpected(),
            });
        }
        let mut modifiers = Vec::new();
        loop {
            self.skip_ws();
            if self.peek() != Some(b'.') {
                break;
            }
            self.i += 1;
            self.skip_ws();
            let mod_pos = self.i;
            let mod_name = self.name().to_owned();
            if mod_name.is_empty() {
                return Err(match self.peek() {
                    None | Some(b'(' | b',' | b'{' | b'}' | b'.') => {
                        FieldsError::EmptyModifierName { pos: mod_pos }
                    }
                    _ => self.unexpected(),
                });
            }
            self.skip_ws();
            if self.peek() != Some(b'(') {
                return Err(FieldsError::ExpectedParen { pos: self.i });
            }
            let args = self.args()?;
            modifiers.push(Modifier {
                name: mod_name,
                args,
            });
        }
        Ok(Field {
            name,
            modifiers,
            children: None,
        })
    }

    /// Consumes `( … )` with balanced inner parentheses and returns the trimmed inner text.
    /// `(` and `)` are ASCII and never occur inside a multibyte UTF-8 sequence, so byte
    /// scanning is safe and the slice bounds are char boundaries.
    fn args(&mut self) -> Result<String, FieldsError> {
        let open = self.i;
        let mut depth = 0usize;
        while let Some(c) = self.peek() {
            match c {
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        let inner = &self.s[open + 1..self.i];
                        self.i += 1;
                        return Ok(trim_ascii_ws(inner).to_owned());
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
        Err(FieldsError::UnclosedParen { pos: open })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn simple_lists_take_the_short_path_with_the_same_result() {
        for s in [
            "id",
            "id,name",
            "name,id,name",
            " id , name ",
            "a_b:c-d,id",
            "fan_count,id,about",
        ] {
            let full = Fields::parse(s).unwrap();
            let names = simple_list(s).expect("flat list");
            assert_eq!(names, full.top_level_names().collect::<Vec<_>>(), "{s}");
            assert_eq!(canonicalize(s).unwrap(), full.canonical(), "{s}");
        }
        for s in [
            "",
            "id,",
            ",id",
            "a b",
            "feed{id}",
            "feed.limit(1)",
            "id,,name",
            "a.as(b)",
        ] {
            assert!(simple_list(s).is_none(), "{s:?}");
        }
    }
    use super::*;
    use proptest::prelude::*;

    fn canon(s: &str) -> String {
        canonicalize(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> FieldsError {
        Fields::parse(s).expect_err(s)
    }

    #[test]
    fn empty_input_is_empty_list() {
        assert!(Fields::parse("").unwrap().is_empty());
        assert!(Fields::parse("  \t ").unwrap().is_empty());
        assert_eq!(canon(""), "");
    }

    #[test]
    fn parses_documented_example() {
        let f = Fields::parse("albums.limit(5){name,photos.limit(2){name,picture}},posts.limit(5)")
            .unwrap();
        assert_eq!(f.top_level_names().collect::<Vec<_>>(), ["albums", "posts"]);
        let albums = &f.fields()[0];
        assert_eq!(
            albums.modifiers,
            [Modifier {
                name: "limit".into(),
                args: "5".into()
            }]
        );
        let children = albums.children.as_ref().unwrap();
        assert_eq!(
            children.top_level_names().collect::<Vec<_>>(),
            ["name", "photos"]
        );
        let photos = &children.fields()[1];
        assert_eq!(photos.modifiers[0].args, "2");
        assert_eq!(
            photos
                .children
                .as_ref()
                .unwrap()
                .top_level_names()
                .collect::<Vec<_>>(),
            ["name", "picture"]
        );
        assert_eq!(f.fields()[1].children, None);
        assert_eq!(
            f.canonical(),
            "albums.limit(5){name,photos.limit(2){name,picture}},posts.limit(5)"
        );
    }

    #[test]
    fn seed_guide_examples_parse() {
        for s in [
            "id,name,picture",
            "comments.order(reverse_chronological)",
            "albums.limit(5),posts.limit(5)",
            "albums.limit(5){name, photos.limit(2)},posts.limit(5)",
            "albums.limit(5){name, photos.limit(2){name, picture, tags.limit(2)}},posts.limit(5)",
        ] {
            Fields::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn order_duplicates_and_whitespace_are_normalised() {
        let c = canon("id,name");
        assert_eq!(c, "id,name");
        assert_eq!(canon("name,id"), c);
        assert_eq!(canon("id,name,id"), c);
        assert_eq!(canon(" name , id "), c);
        assert_eq!(canon("\tname,\n id\r\n"), c);
        assert_ne!(canon("id"), c);
    }

    #[test]
    fn nested_lists_are_sorted_too() {
        assert_eq!(
            canon("feed.limit(2){message,id}"),
            canon("feed.limit(2){id,message}")
        );
        assert_eq!(
            canon("a{c{z,y},b},a{b,c{y,z,y}}"),
            "a{b,c{y,z}}",
            "duplicates are detected after nested normalisation"
        );
    }

    #[test]
    fn modifiers_keep_order_and_args_are_trimmed_verbatim() {
        assert_ne!(canon("a.limit(1).as(x)"), canon("a.as(x).limit(1)"));
        assert_eq!(canon("a . limit( 1 ) .as(x)"), "a.limit(1).as(x)");
        assert_eq!(
            canon("posts.since(2024-01-01).until( 2024-02-01 )"),
            "posts.since(2024-01-01).until(2024-02-01)"
        );
        assert_eq!(
            canon("picture.width(100).height(100)"),
            "picture.width(100).height(100)"
        );
        assert_eq!(canon("feed.summary(true)"), "feed.summary(true)");
        assert_eq!(canon("x.after(QVFIU, a b)"), "x.after(QVFIU, a b)");
        assert_eq!(canon("x.f(g(1,2),(3))"), "x.f(g(1,2),(3))");
        assert_eq!(canon("x.f()"), "x.f()");
        assert_eq!(canon("x.f({a,b})"), "x.f({a,b})");
    }

    #[test]
    fn lenient_names_and_unicode_args() {
        assert_eq!(canon("ns:thing,a-b"), "a-b,ns:thing");
        assert_eq!(canon("x.as(héllo wörld ✓)"), "x.as(héllo wörld ✓)");
        assert_eq!(canon("x.as( 名前 )"), "x.as(名前)");
    }

    #[test]
    fn empty_children_are_preserved() {
        assert_eq!(canon("a{}"), "a{}");
        assert_eq!(canon("a{ }"), "a{}");
        assert_ne!(canon("a{}"), canon("a"));
        let f = Fields::parse("a{}").unwrap();
        assert_eq!(f.fields()[0].children, Some(Fields::default()));
    }

    #[test]
    fn top_level_lookup() {
        let f = Fields::parse("id,accounts{access_token},name").unwrap();
        assert_eq!(
            f.top_level_names().collect::<Vec<_>>(),
            ["id", "accounts", "name"]
        );
        assert!(f.contains_top_level("name"));
        assert!(!f.contains_top_level("access_token"));
        assert!(f.contains_at_any_depth("access_token"));
        let g = Fields::parse("id, ACCESS_TOKEN.as(t)").unwrap();
        assert!(g.contains_top_level("access_token"));
        assert!(!Fields::parse("").unwrap().contains_top_level("id"));
    }

    #[test]
    fn error_too_long() {
        let s = "a".repeat(MAX_FIELDS_LEN + 1);
        assert_eq!(
            err(&s),
            FieldsError::TooLong {
                len: MAX_FIELDS_LEN + 1,
                max: MAX_FIELDS_LEN
            }
        );
        assert!(Fields::parse(&"a".repeat(MAX_FIELDS_LEN)).is_ok());
    }

    #[test]
    fn error_too_deep() {
        let ok = format!("{}x{}", "a{".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(Fields::parse(&ok).is_ok());
        let deep = format!(
            "{}x{}",
            "a{".repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(
            err(&deep),
            FieldsError::TooDeep {
                pos: 2 * MAX_DEPTH + 1,
                max: MAX_DEPTH
            }
        );
    }

    #[test]
    fn error_braces() {
        assert_eq!(err("a{b"), FieldsError::UnclosedBrace { pos: 1 });
        assert_eq!(err("a{b{c}"), FieldsError::UnclosedBrace { pos: 1 });
        assert_eq!(err("a{"), FieldsError::UnclosedBrace { pos: 1 });
        assert_eq!(err("a}"), FieldsError::UnmatchedCloseBrace { pos: 1 });
        assert_eq!(err("}"), FieldsError::UnmatchedCloseBrace { pos: 0 });
        assert_eq!(err("a{b}}"), FieldsError::UnmatchedCloseBrace { pos: 4 });
    }

    #[test]
    fn error_parens() {
        assert_eq!(err("a.limit(5"), FieldsError::UnclosedParen { pos: 7 });
        assert_eq!(err("a.f((x)"), FieldsError::UnclosedParen { pos: 3 });
        assert_eq!(err("a)"), FieldsError::UnmatchedCloseParen { pos: 1 });
        assert_eq!(err("a.f(x))"), FieldsError::UnmatchedCloseParen { pos: 6 });
    }

    #[test]
    fn error_empty_names() {
        assert_eq!(err(",a"), FieldsError::EmptyFieldName { pos: 0 });
        assert_eq!(err("a,,b"), FieldsError::EmptyFieldName { pos: 2 });
        assert_eq!(err("a,"), FieldsError::EmptyFieldName { pos: 2 });
        assert_eq!(err("a{,}"), FieldsError::EmptyFieldName { pos: 2 });
        assert_eq!(err("a,}"), FieldsError::EmptyFieldName { pos: 2 });
        assert_eq!(err("{a}"), FieldsError::EmptyFieldName { pos: 0 });
        assert_eq!(err(".limit(1)"), FieldsError::EmptyFieldName { pos: 0 });
        assert_eq!(err("a.(1)"), FieldsError::EmptyModifierName { pos: 2 });
        assert_eq!(err("a."), FieldsError::EmptyModifierName { pos: 2 });
    }

    #[test]
    fn error_expected_paren() {
        assert_eq!(err("a.limit"), FieldsError::ExpectedParen { pos: 7 });
        assert_eq!(err("a.limit,b"), FieldsError::ExpectedParen { pos: 7 });
        assert_eq!(err("a.limit {b}"), FieldsError::ExpectedParen { pos: 8 });
    }

    #[test]
    fn error_unexpected_char() {
        assert_eq!(err("a b"), FieldsError::UnexpectedChar { ch: 'b', pos: 2 });
        assert_eq!(
            err("na=me"),
            FieldsError::UnexpectedChar { ch: '=', pos: 2 }
        );
        assert_eq!(err("(a)"), FieldsError::UnexpectedChar { ch: '(', pos: 0 });
        assert_eq!(err("a,é"), FieldsError::UnexpectedChar { ch: 'é', pos: 2 });
        assert_eq!(err("aé"), FieldsError::UnexpectedChar { ch: 'é', pos: 1 });
        assert_eq!(
            err("a.✓(1)"),
            FieldsError::UnexpectedChar { ch: '✓', pos: 2 }
        );
        assert_eq!(
            err("a{b}c"),
            FieldsError::UnexpectedChar { ch: 'c', pos: 4 }
        );
    }

    #[test]
    fn error_messages_are_clear() {
        assert_eq!(err("a{b").to_string(), "unclosed '{' at byte 1");
        assert_eq!(err("a}").to_string(), "unmatched '}' at byte 1");
        assert_eq!(err("a é").to_string(), "unexpected character 'é' at byte 2");
    }

    #[test]
    fn pathological_inputs_finish() {
        let n = MAX_FIELDS_LEN;
        let commas = "a,".repeat(n / 2 - 1) + "a";
        assert_eq!(canon(&commas), "a");
        let distinct: String = (0..n / 8).map(|i| format!("f{i:05},")).collect::<String>() + "x";
        assert!(distinct.len() <= n);
        assert!(Fields::parse(&distinct).is_ok());
        for s in [
            "{".repeat(n),
            "(".repeat(n),
            "a.b".to_owned() + &"(".repeat(n - 3),
            "a.b(".to_owned() + &"()".repeat((n - 4) / 2),
            "a{".repeat(n / 2),
            "}".repeat(n),
            "é".repeat(n / 2),
            ".".repeat(n),
        ] {
            assert!(s.len() <= n);
            let _ = Fields::parse(&s);
        }
        assert!(Fields::parse(&"a{".repeat(n / 2)).is_err());
    }

    // ---- property tests ----

    /// Renders a field list with random inter-token whitespace.
    #[derive(Debug, Clone)]
    struct GenField {
        name: String,
        modifiers: Vec<(String, String)>,
        children: Option<Vec<GenField>>,
    }

    fn render(list: &[GenField], ws: &str) -> String {
        list.iter()
            .map(|f| {
                let mut s = f.name.clone();
                for (m, a) in &f.modifiers {
                    s.push_str(&format!("{ws}.{ws}{m}{ws}({ws}{a}{ws})"));
                }
                if let Some(c) = &f.children {
                    s.push_str(&format!("{ws}{{{ws}{}{ws}}}", render(c, ws)));
                }
                s
            })
            .collect::<Vec<_>>()
            .join(&format!("{ws},{ws}"))
    }

    fn arb_args() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9_ ,:-]{0,8}",
            "[a-z0-9]{0,3}\\([a-z0-9, ]{0,4}\\)[a-z]{0,2}",
            "[é✓名 ]{0,3}",
        ]
    }

    fn arb_field_list() -> impl Strategy<Value = Vec<GenField>> {
        let leaf = (
            "[a-z_][a-z0-9_:-]{0,5}",
            prop::collection::vec(("[a-z]{1,6}", arb_args()), 0..3),
        )
            .prop_map(|(name, modifiers)| GenField {
                name,
                modifiers,
                children: None,
            });
        let field = leaf.prop_recursive(5, 64, 6, |inner| {
            (
                "[a-z_][a-z0-9_]{0,5}",
                prop::collection::vec(("[a-z]{1,6}", arb_args()), 0..3),
                prop::collection::vec(inner, 0..5),
            )
                .prop_map(|(name, modifiers, children)| GenField {
                    name,
                    modifiers,
                    children: Some(children),
                })
        });
        prop::collection::vec(field, 0..8)
    }

    proptest! {
        #[test]
        fn prop_canonical_is_idempotent(list in arb_field_list(), ws in "[ \t]{0,2}") {
            let text = render(&list, &ws);
            let c = canonicalize(&text).unwrap();
            prop_assert_eq!(canonicalize(&c).unwrap(), c);
        }

        #[test]
        fn prop_shuffle_and_duplicates_do_not_matter(
            list in arb_field_list(),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            seed in any::<u64>(),
        ) {
            prop_assume!(!list.is_empty());
            let mut shuffled = list.clone();
            for p in &picks {
                shuffled.push(list[p.index(list.len())].clone());
            }
            // Deterministic Fisher–Yates driven by the generated seed.
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                shuffled.swap(i, (state % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(
                canonicalize(&render(&list, "")).unwrap(),
                canonicalize(&render(&shuffled, " ")).unwrap()
            );
        }

        #[test]
        fn prop_canonical_reparses_to_normalized(list in arb_field_list()) {
            let parsed = Fields::parse(&render(&list, " ")).unwrap();
            let reparsed = Fields::parse(&parsed.canonical()).unwrap();
            prop_assert_eq!(&reparsed, &parsed.normalized());
            prop_assert_eq!(reparsed.canonical(), parsed.canonical());
        }

        /// The flat-list shortcut agrees with the full parser wherever it applies, and
        /// applies to every flat list the full parser accepts.
        #[test]
        fn prop_simple_list_matches_the_full_parser(s in "[a-c_:, \t-]{0,24}") {
            let full = Fields::parse(&s);
            match simple_list(&s) {
                Some(names) => {
                    let full = full.expect("a flat list parses");
                    prop_assert_eq!(names, full.top_level_names().collect::<Vec<_>>());
                    prop_assert_eq!(canonicalize(&s).unwrap(), full.canonical());
                    // The flat list's normalization is the general one.
                    prop_assert_eq!(full.normalized(), normalized_list(&full).0);
                }
                None => {
                    if let Ok(f) = full {
                        // Only the empty list parses without being a flat list of names.
                        prop_assert!(f.is_empty(), "{:?}", s);
                    }
                }
            }
        }

        #[test]
        fn prop_arbitrary_strings_never_panic(s in "\\PC{0,64}") {
            if let Ok(f) = Fields::parse(&s) {
                let c = f.canonical();
                prop_assert_eq!(canonicalize(&c).unwrap(), c);
            }
        }

        #[test]
        fn prop_syntax_soup_never_panics(s in "[a-z{}(),. é]{0,80}") {
            if let Ok(f) = Fields::parse(&s) {
                let c = f.canonical();
                prop_assert_eq!(canonicalize(&c).unwrap(), c);
            }
        }
    }
}
