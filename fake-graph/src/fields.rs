//! A lenient parser for Graph's `fields=` expressions, e.g.
//! `id,name,feed.limit(2){id,message},posts.limit(3).as(recent)`.
//!
//! Meta publishes no grammar, so this accepts what the docs show (names, dotted modifiers with
//! one parenthesised argument, brace-nested sub-selections, surrounding whitespace) and reports
//! unbalanced brackets the way Graph does: a code-100 "Syntax error" naming the character.

/// Deepest brace nesting accepted; protects the recursive parser from hostile input.
const MAX_DEPTH: usize = 16;

/// One selected field or edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldSel {
    pub name: String,
    /// Modifiers in the order written, e.g. `("limit", "2")`.
    pub modifiers: Vec<(String, String)>,
    /// The `{...}` sub-selection, if any.
    pub children: Option<Vec<FieldSel>>,
}

impl FieldSel {
    /// The key the field appears under in the reply (`.as(alias)` renames it).
    pub fn key(&self) -> &str {
        self.modifier("as").unwrap_or(&self.name)
    }

    /// The argument of the last modifier called `name`.
    pub fn modifier(&self, name: &str) -> Option<&str> {
        self.modifiers
            .iter()
            .rev()
            .find(|(m, _)| m == name)
            .map(|(_, arg)| arg.as_str())
    }
}

/// Serialises a selection back into `fields=` syntax.
pub(crate) fn to_text(sels: &[FieldSel]) -> String {
    let mut out = String::new();
    for (i, sel) in sels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&sel.name);
        for (m, arg) in &sel.modifiers {
            out.push('.');
            out.push_str(m);
            out.push('(');
            out.push_str(arg);
            out.push(')');
        }
        if let Some(children) = &sel.children {
            out.push('{');
            out.push_str(&to_text(children));
            out.push('}');
        }
    }
    out
}

/// Parses a whole `fields=` value. The error is the Graph message (without the `(#100)` prefix).
pub(crate) fn parse(input: &str) -> Result<Vec<FieldSel>, String> {
    let mut p = Parser { src: input, pos: 0 };
    let list = p.list(0)?;
    match p.peek() {
        None => Ok(list),
        Some(c) => Err(p.error(&format!("Expected end of string instead of \"{c}\"."))),
    }
}

/// Works on bytes: every delimiter is ASCII, so slicing at them never splits a character.
struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.src.as_bytes().get(self.pos).map(|&b| char::from(b))
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn error(&self, what: &str) -> String {
        format!(
            "Syntax error \"{what}\" at character {}: {}",
            self.pos, self.src
        )
    }

    /// `item (',' item)*`; empty items (trailing commas) are tolerated as Graph does.
    fn list(&mut self, depth: usize) -> Result<Vec<FieldSel>, String> {
        if depth > MAX_DEPTH {
            return Err(self.error("Field expansion is nested too deeply."));
        }
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None | Some('}') => return Ok(out),
                Some(',') => {
                    self.pos += 1;
                    continue;
                }
                _ => {}
            }
            out.push(self.item(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                _ => return Ok(out),
            }
        }
    }

    fn item(&mut self, depth: usize) -> Result<FieldSel, String> {
        let name = self.ident();
        if name.is_empty() {
            let found = self
                .peek()
                .map_or("end of string".to_string(), |c| format!("\"{c}\""));
            return Err(self.error(&format!("Expected field name instead of {found}.")));
        }
        let mut sel = FieldSel {
            name,
            modifiers: Vec::new(),
            children: None,
        };
        loop {
            self.skip_ws();
            match self.peek() {
                Some('.') => {
                    self.pos += 1;
                    let m = self.ident();
                    if m.is_empty() || self.peek() != Some('(') {
                        return Err(self.error("Expected modifier call like .limit(5)."));
                    }
                    self.pos += 1;
                    let start = self.pos;
                    let mut open = 1;
                    while let Some(c) = self.peek() {
                        match c {
                            '(' => open += 1,
                            ')' if open == 1 => break,
                            ')' => open -= 1,
                            _ => {}
                        }
                        self.pos += 1;
                    }
                    if self.peek().is_none() {
                        return Err(self.error("Expected \")\" instead of end of string."));
                    }
                    let arg = self.src.get(start..self.pos).unwrap_or_default();
                    self.pos += 1;
                    // `edge.fields(a,b)` is another spelling of `edge{a,b}`.
                    if m == "fields" && sel.children.is_none() {
                        let mut sub = Parser { src: arg, pos: 0 };
                        let children = sub.list(depth + 1)?;
                        if let Some(c) = sub.peek() {
                            return Err(
                                sub.error(&format!("Expected end of string instead of \"{c}\"."))
                            );
                        }
                        sel.children = Some(children);
                        continue;
                    }
                    sel.modifiers.push((m, arg.trim().to_string()));
                }
                Some('{') if sel.children.is_none() => {
                    self.pos += 1;
                    let children = self.list(depth + 1)?;
                    if self.peek() != Some('}') {
                        return Err(self.error("Expected \"}\" instead of end of string."));
                    }
                    self.pos += 1;
                    sel.children = Some(children);
                }
                _ => return Ok(sel),
            }
        }
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| !c.is_ascii_whitespace() && !",.{}()".contains(c))
        {
            self.pos += 1;
        }
        self.src
            .get(start..self.pos)
            .unwrap_or_default()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_modifiers() {
        let f = parse("id, name ,feed.limit(2){id,message},posts.limit(3).as(recent)").unwrap();
        let names: Vec<_> = f.iter().map(FieldSel::key).collect();
        assert_eq!(names, ["id", "name", "feed", "recent"]);
        assert_eq!(f[2].modifier("limit"), Some("2"));
        assert_eq!(to_text(f[2].children.as_deref().unwrap()), "id,message");
        assert_eq!(f[3].name, "posts");
        let f = parse("feed.fields(id,message.as(m)).limit(2)").unwrap();
        assert_eq!(
            to_text(f[0].children.as_deref().unwrap()),
            "id,message.as(m)"
        );
        assert_eq!(f[0].modifier("limit"), Some("2"));
    }

    #[test]
    fn syntax_errors() {
        assert!(parse("id,name}").unwrap_err().starts_with("Syntax error"));
        assert!(parse("feed{id").unwrap_err().starts_with("Syntax error"));
        assert!(parse("feed.limit(2").is_err());
        assert!(parse(&"a{".repeat(100)).is_err());
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("id,,name,").unwrap().len(), 2);
        // Non-ASCII never splits a character.
        let f = parse("n\u{e4}me.as(\u{1F600}){\u{e9}},\u{3000}x").unwrap();
        assert_eq!(f[0].key(), "\u{1F600}");
        assert_eq!(f[1].name, "\u{3000}x");
        assert!(parse("\u{e9}}").is_err());
    }
}
