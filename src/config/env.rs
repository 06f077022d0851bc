//! Configuration layers on top of the file: environment variables and command-line `--set`
//! flags, and clients from a separate file. Applied to the raw TOML table before it is
//! deserialized, so every key the file accepts can be set this way without a list of keys
//! to keep in step with the structs.
//!
//! - `GRAPHGATE_<SECTION>__<KEY>=value` sets `[section] key` (`GRAPHGATE_SERVER__LISTEN`,
//!   `GRAPHGATE_QUOTA__PAGE_CALLS`): upper-case variable names, section and key separated by
//!   a double underscore, lowered to the file's key names.
//! - `--set section.key=value` does the same from the command line.
//! - Precedence: file < environment < `--set`. Environment variables apply in name order.
//! - A value is read as a TOML value (`42`, `true`, `["1001", "1002"]`,
//!   `[{ id = "1001", page_calls = 600 }]`) when it parses as one and the key accepts it,
//!   else as a plain string (`0.0.0.0:8080`, or a numeric admin token).
//! - An unknown section or key, or a value the key cannot take, is an error that names the
//!   variable (or flag); values are never quoted in it (they may be secrets).
//! - `clients_file` (or `GRAPHGATE_CLIENTS_FILE`): a TOML file of `[[clients]]` added to the
//!   ones in the configuration, so keys can live in a Secret apart from the ConfigMap.
//!
//! `GRAPHGATE_*` variables without a double underscore are not overrides (`GRAPHGATE_CONFIG`,
//! `GRAPHGATE_SYSTEM_USER_TOKEN`, `GRAPHGATE_APP_SECRET`, `GRAPHGATE_CLIENTS_FILE` have their
//! own meaning; others are ignored).

use std::ffi::OsString;

use serde::Deserialize;

use super::{
    describe_parse_error, redact_quoted_values, Config, ConfigError, RawClient, RawConfig,
};

/// Prefix of every graphgate environment variable.
pub const ENV_PREFIX: &str = "GRAPHGATE_";
/// Separates section and key in an override variable's name.
const ENV_SEPARATOR: &str = "__";
/// A clients file given in the environment (overrides `clients_file` in the file).
pub const ENV_CLIENTS_FILE: &str = "GRAPHGATE_CLIENTS_FILE";

/// One value set on top of the file.
#[derive(Clone, PartialEq, Eq)]
pub struct Override {
    /// What set it, for messages: the variable name or `--set section.key`.
    source: String,
    /// `["server", "listen"]`.
    path: Vec<String>,
    value: String,
}

impl std::fmt::Debug for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value may be a secret.
        write!(f, "{} ({})", self.source, self.path.join("."))
    }
}

impl Override {
    /// `--set section.key=value`.
    pub fn from_flag(flag: &str) -> Result<Override, String> {
        let (key, value) = flag
            .split_once('=')
            .ok_or_else(|| "--set needs section.key=value".to_string())?;
        let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(format!("--set {}: expected section.key=value", key.trim()));
        }
        Ok(Override {
            source: format!("--set {}", key.trim()),
            path,
            value: value.to_string(),
        })
    }

    /// An override from one environment variable, if the name is one.
    fn from_env(name: &str, value: String) -> Option<Override> {
        let path = if name == ENV_CLIENTS_FILE {
            vec!["clients_file".to_string()]
        } else {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            if !rest.contains(ENV_SEPARATOR) {
                return None;
            }
            rest.split(ENV_SEPARATOR)
                .map(str::to_ascii_lowercase)
                .collect()
        };
        Some(Override {
            source: name.to_string(),
            path,
            value,
        })
    }

    /// Candidate TOML values, most specific first: the value as TOML, then as a string.
    fn candidates(&self) -> Vec<toml::Value> {
        let as_string = toml::Value::String(self.value.clone());
        let parsed = format!("v = {}", self.value)
            .parse::<toml::Table>()
            .ok()
            .filter(|t| t.len() == 1)
            .and_then(|mut t| t.remove("v"));
        match parsed {
            Some(v) if v != as_string => vec![v, as_string],
            _ => vec![as_string],
        }
    }

    /// Sets the value in `table`, once a configuration holding only it has been accepted:
    /// that way an unknown key or a wrong type is reported against this override.
    fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        if self.path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Parse(format!(
                "{}: empty section or key name",
                self.source
            )));
        }
        let mut first_error = None;
        for value in self.candidates() {
            let alone = nest(&self.path, value.clone());
            match RawConfig::deserialize(toml::Value::Table(alone)) {
                Ok(_) => {
                    set(table, &self.path, value);
                    return Ok(());
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let why = first_error.map_or_else(String::new, |e| {
            redact_quoted_values(e.message().trim_end())
        });
        Err(ConfigError::Parse(format!(
            "{} (sets {}): {why}",
            self.source,
            self.path.join(".")
        )))
    }
}

/// `{a: {b: value}}` for the path `[a, b]`.
fn nest(path: &[String], value: toml::Value) -> toml::Table {
    let mut value = value;
    for key in path[1..].iter().rev() {
        let mut t = toml::Table::new();
        t.insert(key.clone(), value);
        value = toml::Value::Table(t);
    }
    let mut top = toml::Table::new();
    top.insert(path[0].clone(), value);
    top
}

/// Sets `path` in `table`, creating tables on the way; a non-table on the way is replaced.
fn set(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in parents {
        let entry = at
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        at = next;
    }
    at.insert(last.clone(), value);
}

/// What is layered on the file, in order of precedence (later wins).
#[derive(Debug, Clone, Default)]
pub struct Layers {
    overrides: Vec<Override>,
}

impl Layers {
    /// No overrides: the file alone (tests, the demo).
    pub fn none() -> Layers {
        Layers::default()
    }

    /// The overrides in `vars` (the process environment: [`Layers::from_process_env`]),
    /// then the `--set` flags.
    pub fn new(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
        flags: &[String],
    ) -> Result<Layers, ConfigError> {
        let mut from_env = Vec::new();
        for (name, value) in vars {
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(ENV_PREFIX) {
                continue;
            }
            let Ok(value) = value.into_string() else {
                return Err(ConfigError::Parse(format!("{name}: not valid UTF-8")));
            };
            if let Some(o) = Override::from_env(name, value) {
                from_env.push(o);
            }
        }
        from_env.sort_by(|a, b| a.source.cmp(&b.source));
        let mut overrides = from_env;
        for f in flags {
            overrides.push(Override::from_flag(f).map_err(ConfigError::Parse)?);
        }
        Ok(Layers { overrides })
    }

    pub fn from_process_env(flags: &[String]) -> Result<Layers, ConfigError> {
        Layers::new(std::env::vars_os(), flags)
    }

    pub fn is_empty(&self) -> bool {
        self.overrides.is_empty()
    }

    /// The variables and flags that were applied, for a start-up log line (never values).
    pub fn sources(&self) -> Vec<String> {
        self.overrides.iter().map(|o| o.source.clone()).collect()
    }
}

/// The shape of a clients file: `[[clients]]` and nothing else.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    #[allow(dead_code)] // read through the table; the struct only checks the shape
    clients: Vec<RawClient>,
}

/// Reads `path` and returns its `[[clients]]` as TOML values (checked against the client
/// shape, with errors that keep their line and never quote values).
fn read_clients_file(path: &str) -> Result<Vec<toml::Value>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: format!("clients_file {path}"),
        source,
    })?;
    let in_file = |e: &toml::de::Error| {
        ConfigError::Parse(format!(
            "clients_file {path}: {}",
            describe_parse_error(e, &text)
        ))
    };
    toml::from_str::<ClientsFile>(&text).map_err(|e| in_file(&e))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| in_file(&e))?;
    match table.remove("clients") {
        Some(toml::Value::Array(clients)) => Ok(clients),
        _ => Ok(Vec::new()),
    }
}

/// One key (`section.key`) of the file with `layers` on top, without validating the rest:
/// for tools that need a single setting of a configuration they do not own (the container
/// health check needs the admin address, not the tokens).
pub fn layered_value(
    text: &str,
    layers: &Layers,
    key: &str,
) -> Result<Option<toml::Value>, ConfigError> {
    let mut table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError::Parse(describe_parse_error(&e, text)))?;
    for o in &layers.overrides {
        o.apply(&mut table)?;
    }
    let mut at = Some(&toml::Value::Table(table));
    for part in key.split('.') {
        at = at.and_then(|v| v.get(part));
    }
    Ok(at.cloned())
}

impl Config {
    /// The file's text with `layers` on top, and clients from `clients_file` if one is
    /// named; then validated as [`Config::from_toml`] does. `env` supplies the two secret
    /// variables (`GRAPHGATE_SYSTEM_USER_TOKEN`, `GRAPHGATE_APP_SECRET`), which win over
    /// everything else for those two keys.
    pub fn from_layers(
        text: &str,
        layers: &Layers,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // The file alone first, so its own errors keep their line and column.
        let file: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(describe_parse_error(&e, text)))?;
        if layers.is_empty() && file.clients_file.is_none() {
            return Config::from_raw(file, env);
        }
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(describe_parse_error(&e, text)))?;
        for o in &layers.overrides {
            o.apply(&mut table)?;
        }
        if let Some(path) = table.get("clients_file").and_then(toml::Value::as_str) {
            let path = path.to_string();
            if !path.is_empty() {
                let extra = read_clients_file(&path)?;
                let clients = table
                    .entry("clients")
                    .or_insert_with(|| toml::Value::Array(Vec::new()));
                if let toml::Value::Array(list) = clients {
                    list.extend(extra);
                }
            }
        }
        let raw = RawConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::Parse(format!(
                "configuration with overrides: {}",
                redact_quoted_values(e.message().trim_end())
            ))
        })?;
        Config::from_raw(raw, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[credentials]
system_user_token = "EAAB-system-token-secret"
[[clients]]
name = "reports"
key = "client-key-reports"
pages = ["1001"]
"#;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn load(text: &str, env: &[(&str, &str)], flags: &[&str]) -> Result<Config, String> {
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        let layers = Layers::new(vars(env), &flags).map_err(|e| e.to_string())?;
        Config::from_layers(text, &layers, |_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn environment_sets_keys_of_every_type() {
        let c = load(
            MIN,
            &[
                ("GRAPHGATE_SERVER__LISTEN", "0.0.0.0:8080"),
                ("GRAPHGATE_QUOTA__PAGE_CALLS", "600"),
                ("GRAPHGATE_CACHE__COMPRESS", "false"),
                ("GRAPHGATE_REDIS__LOCAL_BUDGET_FRACTION", "0.25"),
                ("graphgate_log__level", "debug"),
                (
                    "GRAPHGATE_QUOTA__PAGES",
                    r#"[{ id = "1001", page_calls = 60 }]"#,
                ),
                (
                    "GRAPHGATE_CACHE__RULES",
                    r#"[{ match = "/*/feed", ttl_s = 5 }]"#,
                ),
            ],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.quota.page_calls, 600);
        assert!(!c.cache.compress);
        assert_eq!(c.redis.local_budget_fraction, Some(0.25));
        assert_eq!(c.quota.pages, [("1001".to_string(), 60)]);
        assert_eq!(c.cache.rules[0].pattern, "/*/feed");
        // Lower-case variable names are not ours (the prefix is upper case).
        assert_eq!(c.log.level, "info");
    }

    #[test]
    fn a_value_that_parses_as_toml_but_does_not_fit_is_a_string() {
        let c = load(MIN, &[("GRAPHGATE_SERVER__ADMIN_TOKEN", "12345678")], &[]).unwrap();
        assert_eq!(c.server.admin_token.unwrap().expose(), "12345678");
        let c = load(
            MIN,
            &[("GRAPHGATE_UPSTREAM__DEFAULT_VERSION", "v21.0")],
            &[],
        )
        .unwrap();
        assert_eq!(c.upstream.default_version, "v21.0");
    }

    #[test]
    fn precedence_is_file_then_environment_then_flags() {
        let text = format!("[server]\nlisten = \"127.0.0.1:1000\"\n{MIN}");
        let c = load(&text, &[], &[]).unwrap();
        assert_eq!(c.server.listen.port(), 1000);
        let env = [("GRAPHGATE_SERVER__LISTEN", "127.0.0.1:2000")];
        assert_eq!(load(&text, &env, &[]).unwrap().server.listen.port(), 2000);
        let c = load(&text, &env, &["server.listen=127.0.0.1:3000"]).unwrap();
        assert_eq!(c.server.listen.port(), 3000);
    }

    #[test]
    fn unknown_section_or_key_names_the_variable() {
        for (name, shown) in [
            ("GRAPHGATE_SERVR__LISTEN", "servr"),
            ("GRAPHGATE_SERVER__LISTEN_ADDR", "listen_addr"),
            (
                "GRAPHGATE_SERVER__LISTEN__PORT",
                "GRAPHGATE_SERVER__LISTEN__PORT",
            ),
            ("GRAPHGATE_CLIENTS__NAME", "GRAPHGATE_CLIENTS__NAME"),
        ] {
            let err = load(MIN, &[(name, "x")], &[]).unwrap_err();
            assert!(err.contains(name) && err.contains(shown), "{name}: {err}");
        }
        let err = load(MIN, &[], &["servr.listen=x"]).unwrap_err();
        assert!(err.contains("--set servr.listen"), "{err}");
        assert!(load(MIN, &[], &["listen"]).is_err());
    }

    #[test]
    fn a_wrong_type_names_the_variable_and_never_the_value() {
        let err = load(MIN, &[("GRAPHGATE_QUOTA__PAGE_CALLS", "lots-secret")], &[]).unwrap_err();
        assert!(err.contains("GRAPHGATE_QUOTA__PAGE_CALLS"), "{err}");
        assert!(!err.contains("lots-secret"), "{err}");
        // Validation after merging: the key is named and the secret is not shown.
        let err = load(
            MIN,
            &[(
                "GRAPHGATE_CREDENTIALS__SYSTEM_USER_TOKEN",
                "client-key-reports",
            )],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("clients[0].key"), "{err}");
        assert!(!err.contains("client-key-reports"), "{err}");
    }

    #[test]
    fn one_value_without_validating_the_rest() {
        let layers = Layers::new(
            vars(&[("GRAPHGATE_SERVER__ADMIN_LISTEN", "0.0.0.0:9")]),
            &[],
        )
        .unwrap();
        let v = layered_value("", &layers, "server.admin_listen").unwrap();
        assert_eq!(
            v.and_then(|v| v.as_str().map(str::to_string)).as_deref(),
            Some("0.0.0.0:9")
        );
        let v = layered_value(
            "[server]\nlisten = \"x\"\n",
            &Layers::none(),
            "server.admin_listen",
        );
        assert_eq!(v.unwrap(), None);
    }

    #[test]
    fn other_graphgate_variables_are_not_overrides() {
        let c = load(
            MIN,
            &[
                ("GRAPHGATE_CONFIG", "/nowhere"),
                ("GRAPHGATE_BIN", "/bin/x"),
                ("OTHER__THING", "1"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 8080);
    }

    #[test]
    fn secrets_from_override_variables_and_the_dedicated_ones() {
        let text = "[[clients]]\nname='a'\nkey='client-key-aaaa'\npages=['*']\n";
        let layers = Layers::new(
            vars(&[(
                "GRAPHGATE_CREDENTIALS__SYSTEM_USER_TOKEN",
                "tok-from-override",
            )]),
            &[],
        )
        .unwrap();
        let c = Config::from_layers(text, &layers, |_| None).unwrap();
        assert_eq!(
            c.credentials.system_user_token.expose(),
            "tok-from-override"
        );
        // The dedicated variable wins.
        let c = Config::from_layers(text, &layers, |k| {
            (k == super::super::ENV_SYSTEM_USER_TOKEN).then(|| "tok-dedicated".to_string())
        })
        .unwrap();
        assert_eq!(c.credentials.system_user_token.expose(), "tok-dedicated");
    }

    #[test]
    fn clients_come_also_from_a_clients_file() {
        let dir = std::env::temp_dir().join(format!("gg-clients-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("clients.toml");
        std::fs::write(
            &path,
            "[[clients]]\nname = \"from-file\"\nkey = \"client-key-from-file\"\npages = [\"*\"]\n",
        )
        .unwrap();
        let p = path.display().to_string();
        let c = load(MIN, &[(ENV_CLIENTS_FILE, &p)], &[]).unwrap();
        let names: Vec<&str> = c.clients.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["reports", "from-file"]);
        let text = format!("clients_file = \"{p}\"\n{MIN}");
        assert_eq!(load(&text, &[], &[]).unwrap().clients.len(), 2);
        // A bad clients file: named, with the line, without the value.
        std::fs::write(
            &path,
            "[[clients]]\nname = \"x\"\nkee = \"client-key-secret\"\n",
        )
        .unwrap();
        let err = load(&text, &[], &[]).unwrap_err();
        assert!(
            err.contains(&p) && err.contains("kee") && err.contains("line 3"),
            "{err}"
        );
        assert!(!err.contains("client-key-secret"), "{err}");
        std::fs::write(&path, "[server]\nlisten = \"x\"\n").unwrap();
        let err = load(&text, &[], &[]).unwrap_err();
        assert!(err.contains("server"), "{err}");
        let missing = load(MIN, &[(ENV_CLIENTS_FILE, "/nonexistent/clients.toml")], &[]);
        assert!(missing.unwrap_err().contains("/nonexistent/clients.toml"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
