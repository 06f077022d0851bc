//! Request bodies, read the way Graph reads them, so that every parameter in them can be
//! checked before anything goes upstream. Graph reads url-encoded forms, multipart forms
//! (uploads) and JSON objects, and only on POST. Anything else is refused rather than passed
//! through unread: a body graphgate did not read is a body it did not check.
//!
//! What goes upstream is rebuilt from what was read here (see `upstream`): parameters are
//! encoded again, file parts are sent with their bytes as they came.

use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderMap, Method};

use super::request::{check_name, Params, CONTROL_PARAMS};
use super::strict_json;
use crate::error::ProxyError;

/// Longest file name accepted in a multipart part.
const MAX_FILENAME_LEN: usize = 255;

/// A multipart part with a file name: an upload, forwarded byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePart {
    pub name: String,
    pub filename: String,
    pub content_type: Option<String>,
    pub data: Bytes,
}

/// What a body holds: parameters (checked like query parameters) and uploaded files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Body {
    pub params: Params,
    pub files: Vec<FilePart>,
}

/// How a body is encoded, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Form,
    Multipart,
    Json,
}

/// Reads a request body. An empty body is no parameters whatever the method and headers.
pub fn parse(method: &Method, headers: &HeaderMap, body: Bytes) -> Result<Body, ProxyError> {
    if body.is_empty() {
        return Ok(Body::default());
    }
    if method != Method::POST {
        return Err(ProxyError::BadRequest(format!(
            "A {method} request may not carry a body: Graph reads parameters from the query \
             string for {method}."
        )));
    }
    if let Some(enc) = single_header(headers, header::CONTENT_ENCODING)? {
        if !enc.trim().eq_ignore_ascii_case("identity") {
            return Err(ProxyError::UnsupportedMediaType(
                "Compressed request bodies are not accepted.".into(),
            ));
        }
    }
    let content_type = single_header(headers, header::CONTENT_TYPE)?;
    match kind(content_type)? {
        Kind::Form => {
            let text = std::str::from_utf8(&body)
                .map_err(|_| ProxyError::BadRequest("The form body is not UTF-8.".into()))?;
            Ok(Body {
                params: Params::parse(text)?,
                files: Vec::new(),
            })
        }
        Kind::Json => Ok(Body {
            params: json_params(&body)?,
            files: Vec::new(),
        }),
        Kind::Multipart => multipart(content_type.unwrap_or_default(), body),
    }
}

/// The one value of a header that must not be repeated (two Content-Types could be read
/// differently by Graph and by graphgate).
fn single_header(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> Result<Option<&str>, ProxyError> {
    let mut values = headers.get_all(&name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ProxyError::BadRequest(format!(
            "The request has more than one {name} header."
        )));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| ProxyError::BadRequest(format!("The {name} header is not ASCII.")))
}

/// The body kind a content type names. No content type is read as a form, which is what
/// Graph and most servers do with an unlabelled POST body.
fn kind(content_type: Option<&str>) -> Result<Kind, ProxyError> {
    let Some(ct) = content_type else {
        return Ok(Kind::Form);
    };
    let mut parts = ct.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let kind = match essence.as_str() {
        "application/x-www-form-urlencoded" => Kind::Form,
        "multipart/form-data" => Kind::Multipart,
        "application/json" => Kind::Json,
        _ => {
            return Err(ProxyError::UnsupportedMediaType(format!(
                "Request bodies of type `{}` are not accepted: send a url-encoded form, \
                 multipart/form-data or a JSON object.",
                essence.chars().take(64).collect::<String>()
            )))
        }
    };
    for param in parts {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if name.trim().eq_ignore_ascii_case("charset") {
            check_charset(value)?;
        }
    }
    Ok(kind)
}

/// Only UTF-8 text is read: another charset would give Graph other characters than the ones
/// checked.
fn check_charset(value: &str) -> Result<(), ProxyError> {
    let v = value.trim().trim_matches('"');
    if v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8") {
        Ok(())
    } else {
        Err(ProxyError::UnsupportedMediaType(format!(
            "Charset `{}` is not accepted: send UTF-8.",
            v.chars().take(32).collect::<String>()
        )))
    }
}

/// A JSON object body as Graph parameters: strings as they are, other values as JSON text
/// (the encoding Graph SDKs use for structured form values). Duplicate keys are refused.
fn json_params(body: &[u8]) -> Result<Params, ProxyError> {
    let value = strict_json::parse(body)
        .map_err(|e| ProxyError::BadRequest(format!("The JSON body is invalid: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(ProxyError::BadRequest(
            "The JSON body must be an object.".into(),
        ));
    };
    let mut params = Params::new();
    for (k, v) in map {
        check_name(&k)?;
        match v {
            serde_json::Value::String(s) => params.push(k, s),
            other => params.push(k, other.to_string()),
        }
    }
    Ok(params)
}

/// multipart/form-data: parts without a file name are parameters (UTF-8 text), parts with one
/// are uploads. The body is already in memory, so every step of the parser completes at once.
fn multipart(content_type: &str, body: Bytes) -> Result<Body, ProxyError> {
    let bad = |why: String| ProxyError::BadRequest(format!("Invalid multipart body: {why}."));
    let boundary = multer::parse_boundary(content_type).map_err(|e| bad(e.to_string()))?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut parts = multer::Multipart::new(stream, boundary);
    let read = async {
        let mut out = Body::default();
        while let Some(field) = parts.next_field().await.map_err(|e| bad(e.to_string()))? {
            let name = field
                .name()
                .ok_or_else(|| bad("a part has no name".into()))?
                .to_string();
            check_name(&name)?;
            if let Some(te) = field.headers().get("content-transfer-encoding") {
                let te = te.to_str().unwrap_or("").trim().to_ascii_lowercase();
                if !matches!(te.as_str(), "7bit" | "8bit" | "binary") {
                    return Err(ProxyError::UnsupportedMediaType(
                        "Encoded multipart parts are not accepted.".into(),
                    ));
                }
            }
            let filename = field.file_name().map(str::to_string);
            let content_type = field.content_type().map(|m| m.to_string());
            let data = field.bytes().await.map_err(|e| bad(e.to_string()))?;
            match filename {
                None => {
                    if let Some(ct) = &content_type {
                        check_text_part(ct)?;
                    }
                    let value = String::from_utf8(data.to_vec())
                        .map_err(|_| bad(format!("part `{name}` is not UTF-8 text")))?;
                    out.params.push(name, value);
                }
                Some(filename) => {
                    check_filename(&filename).map_err(bad)?;
                    if CONTROL_PARAMS.contains(&name.as_str()) {
                        return Err(bad(format!("`{name}` cannot be a file")));
                    }
                    out.files.push(FilePart {
                        name,
                        filename,
                        content_type,
                        data,
                    });
                }
            }
        }
        Ok(out)
    };
    let out = read.now_or_never().ok_or_else(|| {
        ProxyError::Internal("multipart parser waited on a complete body".into())
    })??;
    for f in &out.files {
        if out.params.contains(&f.name) || out.files.iter().filter(|g| g.name == f.name).count() > 1
        {
            return Err(bad(format!("`{}` is given more than once", f.name)));
        }
    }
    Ok(out)
}

/// A parameter part may say it is text, in UTF-8.
fn check_text_part(content_type: &str) -> Result<(), ProxyError> {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("text/plain") {
        return Err(ProxyError::UnsupportedMediaType(format!(
            "A multipart parameter of type `{}` is not accepted.",
            essence.chars().take(64).collect::<String>()
        )));
    }
    for param in parts {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if name.trim().eq_ignore_ascii_case("charset") {
            check_charset(value)?;
        }
    }
    Ok(())
}

/// A file name graphgate can write back into a part header unchanged.
fn check_filename(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_FILENAME_LEN {
        return Err("a file name is empty or too long".into());
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err("a file name holds a quote, backslash or control character".into());
    }
    Ok(())
}

/// Builds a multipart/form-data body: the parameters first, then the files. Returns the
/// content type (with a boundary that occurs in no part) and the body.
pub fn encode_multipart(params: &Params, files: &[FilePart]) -> (String, Bytes) {
    let boundary = loop {
        let candidate = format!(
            "graphgate-{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let clash = params.iter().any(|(_, v)| v.contains(&candidate))
            || files
                .iter()
                .any(|f| memchr::memmem::find(&f.data, candidate.as_bytes()).is_some());
        if !clash {
            break candidate;
        }
    };
    let mut out = Vec::with_capacity(
        files.iter().map(|f| f.data.len() + 160).sum::<usize>()
            + params
                .iter()
                .map(|(k, v)| k.len() + v.len() + 100)
                .sum::<usize>(),
    );
    for (k, v) in params.iter() {
        out.extend_from_slice(
            format!("--{boundary}\r\ncontent-disposition: form-data; name=\"{k}\"\r\n\r\n")
                .as_bytes(),
        );
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for f in files {
        out.extend_from_slice(
            format!(
                "--{boundary}\r\ncontent-disposition: form-data; name=\"{}\"; filename=\"{}\"\r\n",
                f.name, f.filename
            )
            .as_bytes(),
        );
        if let Some(ct) = &f.content_type {
            out.extend_from_slice(format!("content-type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&f.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(out),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        h
    }

    fn post(ct: &str, body: &str) -> Result<Body, ProxyError> {
        parse(&Method::POST, &headers(ct), Bytes::from(body.to_string()))
    }

    #[test]
    fn forms_json_and_unlabelled_bodies_are_read() {
        let b = post(
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8",
            "a=1&b=x+y",
        )
        .unwrap();
        assert_eq!(b.params, Params::parse("a=1&b=x y").unwrap());
        let b = post("application/json", r#"{"a":"1","n":2}"#).unwrap();
        assert_eq!(b.params, Params::parse("a=1&n=2").unwrap());
        let b = parse(&Method::POST, &HeaderMap::new(), Bytes::from_static(b"a=1")).unwrap();
        assert_eq!(b.params.get("a"), Some("1"));
    }

    #[test]
    fn other_types_charsets_encodings_and_methods_are_refused() {
        for ct in [
            "text/plain",
            "application/json-seq",
            "application/xml",
            "application/x-www-form-urlencoded; charset=utf-16",
        ] {
            assert!(
                matches!(post(ct, "a=1"), Err(ProxyError::UnsupportedMediaType(_))),
                "{ct}"
            );
        }
        assert!(post("application/json", r#"{"a":"1","a":"2"}"#).is_err());
        assert!(post("application/json", r#"["a"]"#).is_err());
        assert!(post("application/json", r#"{"a.b":"1"}"#).is_err());
        let mut h = headers("application/x-www-form-urlencoded");
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert!(parse(&Method::POST, &h, Bytes::from_static(b"a=1")).is_err());
        for m in [Method::GET, Method::DELETE, Method::HEAD] {
            let h = headers("application/x-www-form-urlencoded");
            assert!(parse(&m, &h, Bytes::from_static(b"a=1")).is_err(), "{m}");
            assert!(parse(&m, &h, Bytes::new()).is_ok(), "{m} without a body");
        }
    }

    #[test]
    fn multipart_round_trips_through_encode() {
        let mut params = Params::new();
        params.push("message", "hi there");
        params.push("access_token", "k");
        let files = vec![FilePart {
            name: "source".into(),
            filename: "a.png".into(),
            content_type: Some("image/png".into()),
            data: Bytes::from_static(b"\x89PNG\r\n--not-a-boundary\r\n\x00\xff"),
        }];
        let (ct, body) = encode_multipart(&params, &files);
        let back = parse(&Method::POST, &headers(&ct), body).expect("multipart parses");
        assert_eq!(back.params, params);
        assert_eq!(back.files, files);
    }

    #[test]
    fn bad_multipart_parts_are_refused() {
        let ct = "multipart/form-data; boundary=XX";
        let part = |disp: &str, extra: &str, value: &str| {
            format!("--XX\r\nContent-Disposition: form-data; {disp}\r\n{extra}\r\n{value}\r\n--XX--\r\n")
        };
        for body in [
            part("name=\"access.token\"", "", "k"),
            part("name=\"IDS\"", "", "1002"),
            part("name=\"access_token\"; filename=\"x\"", "", "k"),
            part(
                "name=\"a\"",
                "Content-Type: text/plain; charset=utf-16\r\n",
                "x",
            ),
            part("name=\"a\"", "Content-Type: application/json\r\n", "{}"),
            part(
                "name=\"a\"",
                "Content-Transfer-Encoding: base64\r\n",
                "eA==",
            ),
            part("name=\"f\"; filename=\"a\\\"b\"", "", "x"),
            "--XX\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XX--\r\n".to_string(),
        ] {
            assert!(post(ct, &body).is_err(), "{body}");
        }
        assert!(post("multipart/form-data", "x").is_err(), "no boundary");
        let ok = post(ct, &part("name=\"message\"", "", "hello")).unwrap();
        assert_eq!(ok.params.get("message"), Some("hello"));
    }
}
