//! Parsing of Meta usage headers and error classification.
//!
//! Usage headers are the only live signal of how close a token, app or Page is to being
//! throttled, and Graph signals throttling with 400/403 plus an error code rather than 429, so
//! the gateway needs both to pace upstream calls. Meta's header formats are informal (numbers
//! sometimes arrive as strings, a documented sample repeats a JSON key), so every parser here is
//! tolerant and total: bad input yields `None` or an empty list, never a panic or an error.

use std::fmt;

use http::{HeaderName, HeaderValue, StatusCode};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// Usage as whole percentages of a quota, as Meta sends them (100 = at the limit).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    pub call_count: f64,
    pub total_time: f64,
    pub total_cputime: f64,
}

impl Usage {
    /// The highest of the three: Graph may throttle once any of them reaches 100.
    pub fn max(&self) -> f64 {
        self.call_count.max(self.total_time).max(self.total_cputime)
    }
}

/// A visitor's answer to any JSON scalar (bool, number, string, null): `$value`.
macro_rules! scalars_are {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// A usage value as sent, read without building a `serde_json::Value`: Meta's usage headers
/// are parsed on every upstream reply.
#[derive(Debug, Clone, PartialEq)]
enum Loose {
    Number(f64),
    Text(String),
    Null,
    /// A bool, array or object: never a usage number.
    Other,
}

impl Loose {
    /// A usage number: a JSON integer or float, or a string holding one. Negative and
    /// non-finite values are not percentages, so they count as garbage.
    fn number(&self) -> Option<f64> {
        let n = match self {
            Loose::Number(n) => *n,
            Loose::Text(s) => s.trim().parse::<f64>().ok()?,
            Loose::Null | Loose::Other => return None,
        };
        (n.is_finite() && n >= 0.0).then_some(n)
    }
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Loose, D::Error> {
        struct LooseVisitor;
        impl<'de> Visitor<'de> for LooseVisitor {
            type Value = Loose;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose::Number(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose, E> {
                Ok(Loose::Number(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose, E> {
                Ok(Loose::Number(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Text(v.to_owned()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
                Ok(Loose::Null)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
        }
        d.deserialize_any(LooseVisitor)
    }
}

/// The members of a usage object that matter, each as its last occurrence (as a JSON object
/// read into a map keeps it); `None` when absent.
#[derive(Debug, Default)]
struct UsageObject {
    kind: Option<Loose>,
    call_count: Option<Loose>,
    total_time: Option<Loose>,
    total_cputime: Option<Loose>,
    regain: Option<Loose>,
}

impl UsageObject {
    /// Reads the object's members after its opening brace; other members are skipped.
    fn read<'de, A: MapAccess<'de>>(mut map: A) -> Result<UsageObject, A::Error> {
        let mut o = UsageObject::default();
        while let Some(name) = map.next_key::<MemberName>()? {
            let slot = match name {
                MemberName::Type => &mut o.kind,
                MemberName::CallCount => &mut o.call_count,
                MemberName::TotalTime => &mut o.total_time,
                MemberName::TotalCputime => &mut o.total_cputime,
                MemberName::Regain => &mut o.regain,
                MemberName::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value::<Loose>()?);
        }
        Ok(o)
    }

    /// The three usage numbers; missing (or `null`) ones are 0, an unreadable one makes it
    /// `None`.
    fn usage(&self) -> Option<Usage> {
        let read = |v: &Option<Loose>| match v {
            None | Some(Loose::Null) => Some(0.0),
            Some(v) => v.number(),
        };
        Some(Usage {
            call_count: read(&self.call_count)?,
            total_time: read(&self.total_time)?,
            total_cputime: read(&self.total_cputime)?,
        })
    }
}

/// The member names a usage object is read by.
enum MemberName {
    Type,
    CallCount,
    TotalTime,
    TotalCputime,
    Regain,
    Other,
}

impl<'de> Deserialize<'de> for MemberName {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<MemberName, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = MemberName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MemberName, E> {
                Ok(match v {
                    "type" => MemberName::Type,
                    "call_count" => MemberName::CallCount,
                    "total_time" => MemberName::TotalTime,
                    "total_cputime" => MemberName::TotalCputime,
                    "estimated_time_to_regain_access" => MemberName::Regain,
                    _ => MemberName::Other,
                })
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// A JSON value that is a usage object, or `None` for any other value (consumed).
struct MaybeUsageObject(Option<UsageObject>);

impl<'de> Deserialize<'de> for MaybeUsageObject {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<MaybeUsageObject, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = MaybeUsageObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MaybeUsageObject, A::Error> {
                UsageObject::read(map).map(|o| MaybeUsageObject(Some(o)))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MaybeUsageObject, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MaybeUsageObject(None))
            }
            scalars_are!(MaybeUsageObject(None));
        }
        d.deserialize_any(ObjectVisitor)
    }
}

/// Parses `X-App-Usage` or `X-Page-Usage`, e.g.
/// `{"call_count":28,"total_time":25,"total_cputime":25}`. Missing keys count as 0; anything
/// that is not a JSON object, or has a non-numeric usage value, gives `None`.
pub fn parse_app_usage(v: &str) -> Option<Usage> {
    serde_json::from_str::<MaybeUsageObject>(v).ok()?.0?.usage()
}

/// One entry of `X-Business-Use-Case-Usage`.
#[derive(Debug, Clone, PartialEq)]
pub struct BucUsage {
    /// The business object id the quota belongs to (Page id, ad account id, …).
    pub business_id: String,
    /// Meta's `type`: `pages`, `messenger`, `instagram`, `leadgen`, `ads_insights`,
    /// `ads_management`, `custom_audience`, …; `""` when the entry had none.
    pub kind: String,
    pub usage: Usage,
    /// `estimated_time_to_regain_access`, in minutes.
    pub regain_access_minutes: Option<f64>,
}

/// Parses `X-Business-Use-Case-Usage`: `{"<id>":[{"type":"pages","call_count":12,…}],…}`.
///
/// Tolerant by design: entries under a repeated key are all kept (a `serde_json::Value` map
/// would keep only the last), a bare object is accepted where an array is expected, malformed
/// entries are skipped, and entries read before a syntax error (say, a truncated header) are
/// still returned.
pub fn parse_buc_usage(v: &str) -> Vec<BucUsage> {
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_str(v);
    // Errors are deliberately ignored: whatever was read before them is in `out`.
    let _ = BucSeed(&mut out).deserialize(&mut de);
    out
}

/// The last header a thread parsed, with what it parsed to: replies in a row mostly carry
/// the same reading (Meta's figures move in whole percents), and parsing the usage headers
/// of every reply cost about 4 k of a cache miss's 169 k instructions.
struct LastParsed<T>(Option<(Box<str>, T)>);

impl<T: Clone> LastParsed<T> {
    fn get_or_parse(&mut self, v: &str, parse: impl FnOnce(&str) -> T) -> T {
        match &self.0 {
            Some((raw, parsed)) if **raw == *v => parsed.clone(),
            _ => {
                let parsed = parse(v);
                self.0 = Some((v.into(), parsed.clone()));
                parsed
            }
        }
    }
}

thread_local! {
    static LAST_BUC: std::cell::RefCell<LastParsed<std::rc::Rc<[BucUsage]>>> =
        const { std::cell::RefCell::new(LastParsed(None)) };
    static LAST_APP: std::cell::RefCell<LastParsed<Option<Usage>>> =
        const { std::cell::RefCell::new(LastParsed(None)) };
}

/// [`parse_buc_usage`], remembering the last header this thread parsed.
pub fn parse_buc_usage_shared(v: &str) -> std::rc::Rc<[BucUsage]> {
    LAST_BUC.with(|last| {
        last.borrow_mut()
            .get_or_parse(v, |v| parse_buc_usage(v).into())
    })
}

/// [`parse_app_usage`], remembering the last header this thread parsed.
pub fn parse_app_usage_shared(v: &str) -> Option<Usage> {
    LAST_APP.with(|last| last.borrow_mut().get_or_parse(v, parse_app_usage))
}

/// Collects entries straight into the caller's vector, so they survive a later parse error.
struct BucSeed<'a>(&'a mut Vec<BucUsage>);

impl<'de> DeserializeSeed<'de> for BucSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BucSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object keyed by business object id")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(business_id) = map.next_key::<String>()? {
            // A business id's entries count only once its whole value has been read.
            let BucEntries(entries) = map.next_value()?;
            self.0.extend(
                entries
                    .iter()
                    .filter_map(|entry| buc_entry(&business_id, entry)),
            );
        }
        Ok(())
    }

    // Any other top-level JSON value is simply not a BUC header: consume it, report nothing.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
    scalars_are!(());
}

/// The entries under one business id: an array of them, or a bare object; anything else
/// (and any array element that is not an object) holds none.
struct BucEntries(Vec<UsageObject>);

impl<'de> Deserialize<'de> for BucEntries {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<BucEntries, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = BucEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of usage objects")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BucEntries, A::Error> {
                let mut out = Vec::new();
                while let Some(MaybeUsageObject(entry)) = seq.next_element()? {
                    out.extend(entry);
                }
                Ok(BucEntries(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BucEntries, A::Error> {
                Ok(BucEntries(vec![UsageObject::read(map)?]))
            }
            scalars_are!(BucEntries(Vec::new()));
        }
        d.deserialize_any(EntriesVisitor)
    }
}

/// One BUC entry. The usage numbers must be readable (they drive throttling); a missing
/// `type` becomes `""`, and an unreadable regain time becomes `None` rather than losing the
/// usage that came with it.
fn buc_entry(business_id: &str, entry: &UsageObject) -> Option<BucUsage> {
    let kind = match &entry.kind {
        None | Some(Loose::Null) => String::new(),
        Some(Loose::Text(s)) => s.clone(),
        Some(_) => return None,
    };
    Some(BucUsage {
        business_id: business_id.to_owned(),
        kind,
        usage: entry.usage()?,
        regain_access_minutes: entry.regain.as_ref().and_then(Loose::number),
    })
}

/// A Graph reply as the usage readers see it: status, headers and body, borrowed from
/// whichever type carries the reply, so what learns from replies needs nothing of the client
/// that received them.
#[derive(Debug, Clone, Copy)]
pub struct ReplyView<'a> {
    pub status: StatusCode,
    pub headers: &'a [(HeaderName, HeaderValue)],
    pub body: &'a [u8],
}

impl<'a> ReplyView<'a> {
    /// The first value of header `name` (lowercase), if it is text.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    /// 2xx, or 304 to a conditional request.
    pub fn is_success(&self) -> bool {
        self.status.is_success() || self.status == StatusCode::NOT_MODIFIED
    }

    /// Graph's error object, if this is an error reply.
    pub fn graph_error(&self) -> Option<GraphErrorInfo> {
        if self.is_success() {
            return None;
        }
        GraphErrorInfo::from_body(self.body)
    }
}

/// The fields of a Graph error body that the gateway acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphErrorInfo {
    pub code: i64,
    pub subcode: Option<i64>,
    /// Meta's `type`, e.g. `OAuthException`.
    pub error_type: Option<String>,
    pub message: String,
    pub is_transient: bool,
    pub fbtrace_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: Option<Value>,
}

/// An integer error code; Graph sends numbers, but tolerate numeric strings.
fn code(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn string(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

impl GraphErrorInfo {
    /// Reads `{"error":{"code":…, …}}`. `None` when the body is not JSON, has no `error`
    /// object, or the error has no integer `code` (e.g. OAuth-style `{"error":"invalid_request"}`).
    pub fn from_body(body: &[u8]) -> Option<GraphErrorInfo> {
        // A typed envelope skips the other top-level keys without building them.
        let envelope: ErrorEnvelope = serde_json::from_slice(body).ok()?;
        let err = envelope.error?;
        let err = err.as_object()?;
        Some(GraphErrorInfo {
            code: code(err.get("code")?)?,
            subcode: err.get("error_subcode").and_then(code),
            error_type: string(err.get("type")),
            message: string(err.get("message")).unwrap_or_default(),
            is_transient: match err.get("is_transient") {
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
                _ => false,
            },
            fbtrace_id: string(err.get("fbtrace_id")),
        })
    }

    /// Classifies by code; an otherwise unknown error that Meta flags `is_transient` is
    /// treated as transient, since Meta is telling us a retry may succeed.
    pub fn class(&self) -> ErrorClass {
        match classify_code(self.code) {
            ErrorClass::Other if self.is_transient => ErrorClass::Transient,
            class => class,
        }
    }
}

/// What a Graph error means for the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A rate limit was hit; back off the given scope.
    Throttle(ThrottleScope),
    /// The token is expired or invalid.
    Auth,
    /// Meta-side failure; retry later.
    Transient,
    Other,
}

/// Whose quota a throttle error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleScope {
    /// Codes 4 and 341: the app's platform limit.
    App,
    /// Code 17: a user token's limit.
    User,
    /// Codes 32 (user token) and 80001 (Page/system token): a Page's limit.
    Page,
    /// Code 613: a custom per-endpoint limit.
    Custom,
    /// 80002 instagram, 80004 ads management, 80005 leadgen, 80006 messenger and any other
    /// 800xx business use case limit.
    OtherBuc,
}

/// Classifies a Graph error code (see graph-api-facts.md, "Rate limits").
pub fn classify_code(code: i64) -> ErrorClass {
    use ThrottleScope::*;
    match code {
        4 | 341 => ErrorClass::Throttle(App),
        17 => ErrorClass::Throttle(User),
        32 | 80001 => ErrorClass::Throttle(Page),
        613 => ErrorClass::Throttle(Custom),
        80000..=80099 => ErrorClass::Throttle(OtherBuc),
        190 | 102 => ErrorClass::Auth,
        1 | 2 => ErrorClass::Transient,
        _ => ErrorClass::Other,
    }
}

impl ErrorClass {
    /// Short metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ErrorClass::Throttle(_) => "throttled",
            ErrorClass::Auth => "auth",
            ErrorClass::Transient => "transient",
            ErrorClass::Other => "other",
        }
    }
}

impl ThrottleScope {
    /// Short metric label for the throttled scope.
    pub fn label(&self) -> &'static str {
        match self {
            ThrottleScope::App => "app",
            ThrottleScope::User => "user",
            ThrottleScope::Page => "page",
            ThrottleScope::Custom => "custom",
            ThrottleScope::OtherBuc => "buc",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn u(call_count: f64, total_time: f64, total_cputime: f64) -> Usage {
        Usage {
            call_count,
            total_time,
            total_cputime,
        }
    }

    #[test]
    fn app_usage_documented_samples() {
        assert_eq!(
            parse_app_usage(r#"{"call_count":28,"total_time":25,"total_cputime":25}"#),
            Some(u(28.0, 25.0, 25.0))
        );
        // X-Page-Usage, keys in another order.
        assert_eq!(
            parse_app_usage(r#"{"call_count":1,"total_cputime":1,"total_time":1}"#),
            Some(u(1.0, 1.0, 1.0))
        );
    }

    #[test]
    fn app_usage_tolerant_values() {
        assert_eq!(
            parse_app_usage(r#" {"call_count":"28", "total_time":2.5} "#),
            Some(u(28.0, 2.5, 0.0))
        );
        assert_eq!(parse_app_usage("{}"), Some(Usage::default()));
        assert_eq!(
            parse_app_usage(r#"{"call_count":100,"total_time":null,"extra":"x"}"#),
            Some(u(100.0, 0.0, 0.0))
        );
        assert_eq!(
            parse_app_usage(r#"{"call_count":" 7 "}"#),
            Some(u(7.0, 0.0, 0.0))
        );
    }

    #[test]
    fn app_usage_garbage_is_none() {
        for v in [
            "",
            "garbage",
            "[]",
            "28",
            "null",
            r#"{"call_count":"lots"}"#,
            r#"{"call_count":true}"#,
            r#"{"call_count":-1}"#,
            r#"{"call_count":"NaN"}"#,
            r#"{"call_count":"inf"}"#,
            r#"{"call_count":28"#,
            r#"{"call_count":28}x"#,
        ] {
            assert_eq!(parse_app_usage(v), None, "{v}");
        }
    }

    #[test]
    fn usage_max() {
        assert_eq!(u(28.0, 25.0, 25.0).max(), 28.0);
        assert_eq!(u(1.0, 99.0, 3.0).max(), 99.0);
        assert_eq!(u(1.0, 2.0, 100.0).max(), 100.0);
        assert_eq!(Usage::default().max(), 0.0);
    }

    #[test]
    fn buc_documented_sample() {
        let v = r#"{"1001":[{"type":"pages","call_count":12,"total_cputime":3,"total_time":4,"estimated_time_to_regain_access":0}]}"#;
        assert_eq!(
            parse_buc_usage(v),
            [BucUsage {
                business_id: "1001".into(),
                kind: "pages".into(),
                usage: u(12.0, 4.0, 3.0),
                regain_access_minutes: Some(0.0),
            }]
        );
    }

    /// Shaped like the sample in Meta's rate-limiting guide, which lists the same business id
    /// twice (once for ads_insights, once for pages) and carries extra keys.
    #[test]
    fn buc_repeated_key_sample_keeps_every_entry() {
        let v = r#"{
            "66782684": [{
                "type": "ads_management", "call_count": 95, "total_cputime": 20,
                "total_time": 20, "estimated_time_to_regain_access": 0,
                "ads_api_access_tier": "development_access"
            }],
            "10153848260347724": [{
                "type": "ads_insights", "call_count": 97, "total_cputime": 23,
                "total_time": 23, "estimated_time_to_regain_access": 0,
                "ads_api_access_tier": "development_access"
            }],
            "10153848260347724": [{
                "type": "pages", "call_count": 97, "total_cputime": 23,
                "total_time": 23, "estimated_time_to_regain_access": 0
            }]
        }"#;
        let got = parse_buc_usage(v);
        let summary: Vec<_> = got
            .iter()
            .map(|b| (b.business_id.as_str(), b.kind.as_str(), b.usage.call_count))
            .collect();
        assert_eq!(
            summary,
            [
                ("66782684", "ads_management", 95.0),
                ("10153848260347724", "ads_insights", 97.0),
                ("10153848260347724", "pages", 97.0),
            ]
        );
        assert!(got.iter().all(|b| b.regain_access_minutes == Some(0.0)));
    }

    #[test]
    fn buc_several_entries_per_key_and_regain_minutes() {
        let v = r#"{"1":[{"type":"pages","call_count":100,"estimated_time_to_regain_access":19},
                         {"type":"messenger","total_time":"5.5"}]}"#;
        assert_eq!(
            parse_buc_usage(v),
            [
                BucUsage {
                    business_id: "1".into(),
                    kind: "pages".into(),
                    usage: u(100.0, 0.0, 0.0),
                    regain_access_minutes: Some(19.0),
                },
                BucUsage {
                    business_id: "1".into(),
                    kind: "messenger".into(),
                    usage: u(0.0, 5.5, 0.0),
                    regain_access_minutes: None,
                },
            ]
        );
    }

    #[test]
    fn buc_numeric_strings_and_floats() {
        let v = r#"{"7":[{"type":"instagram","call_count":"12","total_cputime":3.5,
                          "total_time":"4.25","estimated_time_to_regain_access":"2"}]}"#;
        let got = parse_buc_usage(v);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].usage, u(12.0, 4.25, 3.5));
        assert_eq!(got[0].regain_access_minutes, Some(2.0));
    }

    #[test]
    fn buc_malformed_entries_are_skipped() {
        let v = r#"{
            "1": [ 5, "x", null, {"type":"pages","call_count":"lots"}, {"type":7,"call_count":1},
                   {"type":"leadgen","call_count":9,"estimated_time_to_regain_access":"soon"} ],
            "2": "not an array",
            "3": {"type":"pages","call_count":50},
            "4": [{"call_count":1}],
            "5": []
        }"#;
        let got = parse_buc_usage(v);
        let summary: Vec<_> = got
            .iter()
            .map(|b| {
                (
                    b.business_id.as_str(),
                    b.kind.as_str(),
                    b.usage.call_count,
                    b.regain_access_minutes,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("1", "leadgen", 9.0, None),
                ("3", "pages", 50.0, None),
                ("4", "", 1.0, None),
            ]
        );
    }

    #[test]
    fn buc_garbage_is_empty_and_truncation_keeps_prefix() {
        for v in [
            "",
            "garbage",
            "[]",
            "[1,{\"a\":2}]",
            "42",
            "\"s\"",
            "null",
            "{}",
            "true",
        ] {
            assert_eq!(parse_buc_usage(v), [], "{v}");
        }
        let truncated = r#"{"1":[{"type":"pages","call_count":12}],"2":[{"type":"pa"#;
        let got = parse_buc_usage(truncated);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].business_id, "1");
    }

    /// Where the streaming parsers differ from reading the text into a `serde_json::Value`
    /// first: a number too large for an f64 (which serde_json refuses to build) in a member
    /// they skip no longer spoils the whole header.
    #[test]
    fn a_number_beyond_f64_spoils_only_a_member_that_is_read() {
        let skipped = r#"{"1001":[{"type":"pages","call_count":5,"ads_api_access_tier":1e400}]}"#;
        let got = parse_buc_usage(skipped);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].usage.call_count, 5.0);
        assert!(reference::parse_buc_usage(skipped).is_empty());
        assert_eq!(
            parse_app_usage(r#"{"call_count":5,"other":1e400}"#),
            Some(u(5.0, 0.0, 0.0))
        );
        // Read where it matters, it is the syntax error it always was: what came before stays.
        let read = r#"{"1":[{"call_count":1}],"2":[{"call_count":1e400}]}"#;
        assert_eq!(parse_buc_usage(read), reference::parse_buc_usage(read));
        assert_eq!(parse_buc_usage(read).len(), 1);
        assert_eq!(parse_app_usage(r#"{"call_count":1e400}"#), None);
    }

    #[test]
    fn error_body_auth() {
        let body = br#"{"error":{"message":"Error validating access token: Session has expired","type":"OAuthException","code":190,"error_subcode":463,"error_user_title":"t","error_user_msg":"m","fbtrace_id":"AbCdEf"}}"#;
        let e = GraphErrorInfo::from_body(body).unwrap();
        assert_eq!(
            e,
            GraphErrorInfo {
                code: 190,
                subcode: Some(463),
                error_type: Some("OAuthException".into()),
                message: "Error validating access token: Session has expired".into(),
                is_transient: false,
                fbtrace_id: Some("AbCdEf".into()),
            }
        );
        assert_eq!(e.class(), ErrorClass::Auth);
        assert_eq!(e.class().label(), "auth");
        let e102 = GraphErrorInfo::from_body(br#"{"error":{"code":102,"message":"x"}}"#);
        assert_eq!(e102.unwrap().class(), ErrorClass::Auth);
    }

    #[test]
    fn error_body_throttles() {
        let body = br#"{"error":{"message":"(#4) Application request limit reached","type":"OAuthException","is_transient":true,"code":4,"fbtrace_id":"X"}}"#;
        let e = GraphErrorInfo::from_body(body).unwrap();
        assert!(e.is_transient);
        assert_eq!(e.class(), ErrorClass::Throttle(ThrottleScope::App));
        assert_eq!(e.class().label(), "throttled");
        for (code, scope) in [
            (17, ThrottleScope::User),
            (32, ThrottleScope::Page),
            (80001, ThrottleScope::Page),
            (613, ThrottleScope::Custom),
            (80004, ThrottleScope::OtherBuc),
        ] {
            let body = format!(r#"{{"error":{{"code":{code},"message":"limit"}}}}"#);
            let e = GraphErrorInfo::from_body(body.as_bytes()).unwrap();
            assert_eq!(e.class(), ErrorClass::Throttle(scope), "{code}");
        }
    }

    #[test]
    fn error_body_transient_and_other() {
        let e = GraphErrorInfo::from_body(
            br#"{"error":{"code":1,"message":"Please reduce the amount of data you're asking for, then retry your request","error_subcode":99}}"#,
        )
        .unwrap();
        assert_eq!(e.class(), ErrorClass::Transient);
        assert_eq!(e.subcode, Some(99));
        let e = GraphErrorInfo::from_body(br#"{"error":{"code":2,"message":"Service temporarily unavailable","type":"OAuthException","is_transient":true}}"#).unwrap();
        assert_eq!(e.class().label(), "transient");
        let e = GraphErrorInfo::from_body(
            br#"{"error":{"code":100,"message":"Invalid parameter","type":"OAuthException"}}"#,
        )
        .unwrap();
        assert_eq!(e.class(), ErrorClass::Other);
        assert_eq!(e.class().label(), "other");
        // An unclassified code flagged transient by Meta is retried.
        let e =
            GraphErrorInfo::from_body(br#"{"error":{"code":368,"is_transient":true}}"#).unwrap();
        assert_eq!(e.class(), ErrorClass::Transient);
        assert_eq!(e.message, "");
    }

    #[test]
    fn error_body_tolerant_fields() {
        let e = GraphErrorInfo::from_body(
            br#"{"error":{"code":"190","error_subcode":"460","is_transient":"true","type":5},"other":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(e.code, 190);
        assert_eq!(e.subcode, Some(460));
        assert!(e.is_transient);
        assert_eq!(e.error_type, None);
        assert_eq!(e.fbtrace_id, None);
    }

    #[test]
    fn non_error_bodies_are_none() {
        for body in [
            &b""[..],
            b"<html>502 Bad Gateway</html>",
            b"\xff\xfe\x00",
            b"null",
            b"[]",
            br#"{"id":"1","name":"x"}"#,
            br#"{"error":null}"#,
            br#"{"error":"invalid_request"}"#,
            br#"{"error":{"message":"no code"}}"#,
            br#"{"error":{"code":1.5}}"#,
            br#"{"error":{"code":"abc"}}"#,
            br#"{"error":{"code":190}"#,
        ] {
            assert_eq!(
                GraphErrorInfo::from_body(body),
                None,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn classify_codes() {
        use ThrottleScope::*;
        let cases = [
            (4, ErrorClass::Throttle(App)),
            (341, ErrorClass::Throttle(App)),
            (17, ErrorClass::Throttle(User)),
            (32, ErrorClass::Throttle(Page)),
            (80001, ErrorClass::Throttle(Page)),
            (613, ErrorClass::Throttle(Custom)),
            (80000, ErrorClass::Throttle(OtherBuc)),
            (80002, ErrorClass::Throttle(OtherBuc)),
            (80004, ErrorClass::Throttle(OtherBuc)),
            (80005, ErrorClass::Throttle(OtherBuc)),
            (80006, ErrorClass::Throttle(OtherBuc)),
            (80099, ErrorClass::Throttle(OtherBuc)),
            (190, ErrorClass::Auth),
            (102, ErrorClass::Auth),
            (1, ErrorClass::Transient),
            (2, ErrorClass::Transient),
            (0, ErrorClass::Other),
            (100, ErrorClass::Other),
            (200, ErrorClass::Other),
            (800, ErrorClass::Other),
            (8000, ErrorClass::Other),
            (80100, ErrorClass::Other),
            (-4, ErrorClass::Other),
            (i64::MAX, ErrorClass::Other),
        ];
        for (code, class) in cases {
            assert_eq!(classify_code(code), class, "{code}");
        }
        assert_eq!(ThrottleScope::OtherBuc.label(), "buc");
        assert_eq!(ThrottleScope::Page.label(), "page");
    }

    /// The parsers as first written, through `serde_json::Value`: the reference the streaming
    /// parsers are checked against.
    mod reference {
        use super::super::{BucUsage, Usage};
        use serde_json::Value;

        fn number(v: &Value) -> Option<f64> {
            let n = match v {
                Value::Number(n) => n.as_f64()?,
                Value::String(s) => s.trim().parse::<f64>().ok()?,
                _ => return None,
            };
            (n.is_finite() && n >= 0.0).then_some(n)
        }

        fn optional_number(obj: &serde_json::Map<String, Value>, key: &str) -> Option<Option<f64>> {
            match obj.get(key) {
                None | Some(Value::Null) => Some(None),
                Some(v) => number(v).map(Some),
            }
        }

        fn usage_from_object(obj: &serde_json::Map<String, Value>) -> Option<Usage> {
            Some(Usage {
                call_count: optional_number(obj, "call_count")?.unwrap_or(0.0),
                total_time: optional_number(obj, "total_time")?.unwrap_or(0.0),
                total_cputime: optional_number(obj, "total_cputime")?.unwrap_or(0.0),
            })
        }

        pub fn parse_app_usage(v: &str) -> Option<Usage> {
            match serde_json::from_str::<Value>(v).ok()? {
                Value::Object(obj) => usage_from_object(&obj),
                _ => None,
            }
        }

        fn buc_entry(business_id: &str, entry: &Value) -> Option<BucUsage> {
            let obj = entry.as_object()?;
            let kind = match obj.get("type") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return None,
            };
            Some(BucUsage {
                business_id: business_id.to_owned(),
                kind,
                usage: usage_from_object(obj)?,
                regain_access_minutes: obj.get("estimated_time_to_regain_access").and_then(number),
            })
        }

        /// Reads `{"id": value, ...}` one member at a time (a repeated id keeps every
        /// value), so that what came before a syntax error is kept.
        pub fn parse_buc_usage(v: &str) -> Vec<BucUsage> {
            use serde::de::{Deserializer as _, MapAccess, Visitor};
            struct Members<'a>(&'a mut Vec<BucUsage>);
            impl<'de> Visitor<'de> for Members<'_> {
                type Value = ();
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                    while let Some(id) = map.next_key::<String>()? {
                        match map.next_value::<Value>()? {
                            Value::Array(entries) => {
                                for e in &entries {
                                    self.0.extend(buc_entry(&id, e));
                                }
                            }
                            e @ Value::Object(_) => self.0.extend(buc_entry(&id, &e)),
                            _ => {}
                        }
                    }
                    Ok(())
                }
            }
            let mut out = Vec::new();
            let mut de = serde_json::Deserializer::from_str(v);
            let _ = (&mut de).deserialize_map(Members(&mut out));
            out
        }
    }

    /// JSON text for a usage member value: numbers, numeric and other strings, null, bools,
    /// arrays and objects. (Not numbers beyond f64: see
    /// `a_number_beyond_f64_spoils_only_a_member_that_is_read`.)
    fn usage_value() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u32..300).prop_map(|n| n.to_string()),
            (-50i32..0).prop_map(|n| n.to_string()),
            (0.0f64..300.0).prop_map(|n| format!("{n}")),
            (0u32..300).prop_map(|n| format!("\" {n} \"")),
            Just("\"lots\"".to_string()),
            Just("\"-3\"".to_string()),
            Just("\"inf\"".to_string()),
            Just("\"pages\"".to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("[1,\"2\"]".to_string()),
            Just("{\"call_count\":1}".to_string()),
        ]
    }

    /// A usage object's text: known members (one spelled with an escape), unknown ones and
    /// repeats, in any order.
    fn usage_object() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            Just("type"),
            Just("call_count"),
            Just("total_time"),
            Just("total_cputime"),
            Just("estimated_time_to_regain_access"),
            Just("call\\u005fcount"),
            Just("ads_api_access_tier"),
        ];
        prop::collection::vec((name, usage_value()), 0..7).prop_map(|members| {
            let inner: Vec<String> = members
                .iter()
                .map(|(n, v)| format!("\"{n}\":{v}"))
                .collect();
            format!("{{{}}}", inner.join(","))
        })
    }

    /// A whole `X-Business-Use-Case-Usage` text: ids (some repeated) with arrays of entries
    /// (some not objects), bare objects or scalars.
    fn buc_text() -> impl Strategy<Value = String> {
        let element = prop_oneof![
            4 => usage_object(),
            1 => usage_value(),
        ];
        let value = prop_oneof![
            4 => prop::collection::vec(element, 0..4).prop_map(|e| format!("[{}]", e.join(","))),
            2 => usage_object(),
            1 => usage_value(),
        ];
        let id = prop_oneof![Just("1001".to_string()), "[0-9]{1,4}"];
        prop::collection::vec((id, value), 0..5).prop_map(|members| {
            let inner: Vec<String> = members
                .iter()
                .map(|(id, v)| format!("\"{id}\":{v}"))
                .collect();
            format!("{{{}}}", inner.join(","))
        })
    }

    proptest! {
        #[test]
        fn prop_buc_reads_as_the_value_based_parser(text in buc_text(), cut in 0usize..400) {
            prop_assert_eq!(parse_buc_usage(&text), reference::parse_buc_usage(&text), "{}", text);
            // What comes before a syntax error (a truncated header) too.
            let mut end = cut.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let prefix = &text[..end];
            prop_assert_eq!(parse_buc_usage(prefix), reference::parse_buc_usage(prefix), "{}", prefix);
        }

        #[test]
        fn prop_app_usage_reads_as_the_value_based_parser(text in prop_oneof![usage_object(), usage_value(), buc_text()]) {
            prop_assert_eq!(parse_app_usage(&text), reference::parse_app_usage(&text), "{}", text);
        }

        #[test]
        fn prop_remembered_parses_read_as_fresh_ones(
            texts in prop::collection::vec(prop_oneof![buc_text(), usage_object(), usage_value()], 1..12),
            picks in prop::collection::vec(0usize..12, 1..40),
        ) {
            // Headers in any order, repeated or not: the remembered parse is always the
            // fresh parse of the header given, never of the one before it.
            for i in picks {
                let text = &texts[i % texts.len()];
                let remembered = parse_buc_usage_shared(text);
                let fresh = parse_buc_usage(text);
                prop_assert_eq!(&*remembered, fresh.as_slice(), "{}", text);
                prop_assert_eq!(parse_app_usage_shared(text), parse_app_usage(text), "{}", text);
            }
        }

        #[test]
        fn prop_parsers_never_panic_on_strings(s in "\\PC{0,80}") {
            let _ = parse_app_usage(&s);
            let _ = parse_buc_usage(&s);
            let _ = GraphErrorInfo::from_body(s.as_bytes());
        }

        #[test]
        fn prop_parsers_never_panic_on_json_soup(s in r#"[{}\[\]":,0-9a-z_. -]{0,80}"#) {
            let _ = parse_app_usage(&s);
            let _ = parse_buc_usage(&s);
            let _ = GraphErrorInfo::from_body(s.as_bytes());
        }

        #[test]
        fn prop_from_body_never_panics_on_bytes(b in prop::collection::vec(any::<u8>(), 0..80)) {
            let _ = GraphErrorInfo::from_body(&b);
        }

        #[test]
        fn prop_buc_roundtrip(
            entries in prop::collection::vec(("[0-9]{1,6}", "[a-z_]{1,10}", 0u32..=200, 0u32..=200, 0u32..=200), 0..6)
        ) {
            // Each entry under its own (possibly repeated) key, like Meta's sample.
            let body = entries
                .iter()
                .map(|(id, kind, c, t, p)| format!(
                    r#""{id}":[{{"type":"{kind}","call_count":{c},"total_time":"{t}","total_cputime":{p}.0}}]"#
                ))
                .collect::<Vec<_>>()
                .join(",");
            let got = parse_buc_usage(&format!("{{{body}}}"));
            prop_assert_eq!(got.len(), entries.len());
            for (g, (id, kind, c, t, p)) in got.iter().zip(&entries) {
                prop_assert_eq!(&g.business_id, id);
                prop_assert_eq!(&g.kind, kind);
                prop_assert_eq!(g.usage, u(f64::from(*c), f64::from(*t), f64::from(*p)));
            }
        }
    }
}
