//! Deployment artefacts, checked without a container engine or a cluster:
//! - the Dockerfile's rules (pinned base images, non-root user, no secret in ENV/ARG, a
//!   health check on /readyz, 0.0.0.0 listeners through the environment, COPY sources that
//!   exist and are not excluded by .dockerignore), with the real binary reading the image's
//!   environment;
//! - the build stage, run for real in a directory that holds only what the Dockerfile copies
//!   (`#[ignore]`d: a release build; `.ci/run` runs it);
//! - the Helm chart, rendered by Helm's own engine (the helm-python-sdk wheel, which
//!   scripts/test installs) and checked: probes, ports, Secret references, grace period.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_graphgate");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// -------------------------------------------------------------------------------------------
// A Dockerfile reader: the instructions the rules and the build-stage run need.

#[derive(Debug, Clone)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

#[derive(Debug, Default)]
struct Stage {
    base: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &Instruction> {
        let keyword = keyword.to_string();
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
    }

    /// ENV and ARG values in force at the end of the stage.
    fn env(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for i in self.all("ENV").chain(self.all("ARG")) {
            for (k, v) in env_pairs(&i.args) {
                out.insert(k, v);
            }
        }
        out
    }
}

/// Stages of a Dockerfile: continuation lines joined, comment lines dropped.
fn parse_dockerfile(text: &str) -> Vec<Stage> {
    let mut stages: Vec<Stage> = Vec::new();
    let mut logical = String::new();
    let mut start = 0;
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && logical.is_empty()) {
            continue;
        }
        if logical.is_empty() {
            start = n + 1;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                logical.push_str(part);
                logical.push(' ');
                continue;
            }
            None => logical.push_str(trimmed),
        }
        let line = std::mem::take(&mut logical);
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let ins = Instruction {
            line: start,
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        };
        if ins.keyword == "FROM" {
            let words: Vec<&str> = ins
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                base: words.first().unwrap_or(&"").to_string(),
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push(ins);
        }
    }
    stages
}

/// Shell-like words: double and single quotes, backslash escapes.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => cur.extend(chars.next()),
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                cur.extend(chars.next());
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// `K=V K2="V 2"` (or the old `K V` form) of ENV and ARG; an ARG without a default is "".
fn env_pairs(args: &str) -> Vec<(String, String)> {
    let w = words(args);
    if w.len() >= 2 && !w[0].contains('=') {
        return vec![(w[0].clone(), w[1..].join(" "))];
    }
    w.into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect()
}

/// A COPY: flags (`--from=build`), sources, destination.
struct Copy {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

fn parse_copy(args: &str) -> Copy {
    let w: Vec<String> = if args.trim_start().starts_with('[') {
        serde_json::from_str(args).expect("COPY in JSON form")
    } else {
        words(args)
    };
    let mut from = None;
    let mut rest = Vec::new();
    for word in w {
        if let Some(f) = word.strip_prefix("--from=") {
            from = Some(f.to_string());
        } else if !word.starts_with("--") {
            rest.push(word);
        }
    }
    let dest = rest.pop().expect("COPY has a destination");
    Copy {
        from,
        sources: rest,
        dest,
    }
}

/// The shell command of a RUN, without its `--mount`/`--network` options.
fn run_command(args: &str) -> String {
    let mut rest = args.trim();
    while rest.starts_with("--") {
        rest = rest
            .split_once(char::is_whitespace)
            .map_or("", |(_, r)| r)
            .trim_start();
    }
    rest.to_string()
}

/// The words of an exec-form (`["a", "b"]`) or shell-form instruction.
fn exec_words(args: &str) -> Vec<String> {
    if args.trim_start().starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"))
    } else {
        words(args)
    }
}

// -------------------------------------------------------------------------------------------
// .dockerignore: which files of the context Docker sends.

struct DockerIgnore {
    /// (pattern, is an exception `!pattern`), in file order; the last match wins.
    patterns: Vec<(String, bool)>,
}

impl DockerIgnore {
    fn load() -> DockerIgnore {
        let text = std::fs::read_to_string(repo().join(".dockerignore")).unwrap_or_default();
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| match l.strip_prefix('!') {
                Some(p) => (p.trim_matches('/').to_string(), true),
                None => (l.trim_matches('/').to_string(), false),
            })
            .collect();
        DockerIgnore { patterns }
    }

    /// Is `rel` (a path relative to the context, `/`-separated) left out of the context? A
    /// pattern matching a parent directory leaves out everything under it.
    fn excludes(&self, rel: &str) -> bool {
        let parts: Vec<&str> = rel.split('/').collect();
        let mut excluded = false;
        for (pattern, exception) in &self.patterns {
            let hit = (1..=parts.len()).any(|n| glob(pattern, &parts[..n].join("/")));
            if hit {
                excluded = !exception;
            }
        }
        excluded
    }
}

/// Go's filepath.Match as Docker uses it, plus `**` for any number of directories.
fn glob(pattern: &str, path: &str) -> bool {
    fn go(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) if rest.first() == Some(&b'*') => {
                let rest = &rest[1..];
                (0..=s.len()).any(|i| go(rest, &s[i..]))
            }
            Some((b'*', rest)) => (0..=s.len())
                .take_while(|&i| i == 0 || s[i - 1] != b'/')
                .any(|i| go(rest, &s[i..])),
            Some((b'?', rest)) => s.first().is_some_and(|&c| c != b'/') && go(rest, &s[1..]),
            Some((&c, rest)) => s.first() == Some(&c) && go(rest, &s[1..]),
        }
    }
    go(pattern.as_bytes(), path.as_bytes())
}

/// Every file under `dir` (relative to the repository), recursively.
fn files_under(rel: &str) -> Vec<String> {
    let root = repo();
    let mut out = Vec::new();
    let mut todo = vec![root.join(rel)];
    while let Some(p) = todo.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        } else if p.exists() {
            let r = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.push(r);
        }
    }
    out.sort();
    out
}

// -------------------------------------------------------------------------------------------
// The rules.

fn is_pinned(image: &str) -> bool {
    if let Some((_, digest)) = image.split_once("@sha256:") {
        return digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    }
    let Some((_, tag)) = image.rsplit_once(':') else {
        return false;
    };
    // An exact version: major.minor at least (`1.95.0-slim-bookworm`, `12.12-slim`).
    let version = tag.split('-').next().unwrap_or("");
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

const SECRET_WORDS: [&str; 7] = [
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "API_KEY",
    "PRIVATE",
    "CREDENTIAL",
];

#[test]
fn dockerfile_reader_understands_the_syntax_it_meets() {
    assert_eq!(words(r#"a "b c" 'd e' f\ g"#), ["a", "b c", "d e", "f g"]);
    assert_eq!(
        env_pairs(r#"A=1 B="two words" C"#),
        [
            ("A".into(), "1".into()),
            ("B".into(), "two words".into()),
            ("C".into(), "".into())
        ]
    );
    assert_eq!(
        env_pairs("A some value"),
        [("A".into(), "some value".into())]
    );
    assert_eq!(
        run_command("--mount=type=cache,target=/x  cargo build"),
        "cargo build"
    );
    let stages =
        parse_dockerfile("FROM a:1.2 AS b\n# c\nRUN x \\\n  # inner\n  && y\nFROM b\nUSER 1\n");
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0].name.as_deref(), Some("b"));
    assert_eq!(stages[0].instructions[0].args, "x  && y");
    assert!(is_pinned("rust:1.95.0-slim-bookworm") && is_pinned("debian:12.12-slim"));
    assert!(is_pinned(&format!("debian@sha256:{}", "a".repeat(64))));
    for loose in [
        "rust:1",
        "debian:bookworm-slim",
        "debian",
        "x:latest",
        "rust:1-slim",
    ] {
        assert!(!is_pinned(loose), "{loose}");
    }
    assert!(glob("*.md", "README.md") && !glob("*.md", "benches/README.md"));
    assert!(glob("**/*.md", "benches/README.md") && glob("targ?t", "target"));
}

#[test]
fn dockerfile_pins_its_bases_runs_as_non_root_holds_no_secret_and_listens_on_all_interfaces() {
    let stages = parse_dockerfile(&read("Dockerfile"));
    assert!(stages.len() >= 2, "multi-stage build expected");
    let names: Vec<String> = stages.iter().filter_map(|s| s.name.clone()).collect();
    for s in &stages {
        assert!(
            names.contains(&s.base) || is_pinned(&s.base),
            "FROM {} is not pinned to a version or digest",
            s.base
        );
        for (k, v) in s.env() {
            let upper = k.to_ascii_uppercase();
            assert!(
                !SECRET_WORDS.iter().any(|w| upper.contains(w)),
                "ENV/ARG {k} looks like a secret baked into the image"
            );
            assert!(!v.starts_with("EAA"), "ENV/ARG {k} holds a Meta token");
        }
        for i in s.all("RUN") {
            assert!(
                !i.args.contains("--build-arg") && !i.args.contains("GRAPHGATE_SYSTEM_USER_TOKEN"),
                "line {}: a secret in a RUN",
                i.line
            );
        }
    }
    // The build stage builds the release profile from the lock file.
    let build_runs: String = stages[..stages.len() - 1]
        .iter()
        .flat_map(|s| s.all("RUN"))
        .map(|i| i.args.clone())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        build_runs.contains("cargo build --release --locked"),
        "{build_runs}"
    );
    // The production binary holds no simulated Graph API: every build turns graphgate's
    // default features (`demo`) off, and the features it names instead default to none.
    for build in build_runs
        .split(['\n'])
        .flat_map(|l| l.split("&&"))
        .filter(|c| c.contains("cargo build"))
    {
        assert!(build.contains("--no-default-features"), "{build}");
    }
    for s in &stages[..stages.len() - 1] {
        if let Some(features) = s.env().get("FEATURES") {
            assert!(features.is_empty(), "ARG FEATURES defaults to {features:?}");
        }
    }

    let runtime = stages.last().unwrap();
    let user = runtime
        .all("USER")
        .last()
        .expect("USER in the runtime stage")
        .args
        .clone();
    let uid = user.split(':').next().unwrap_or("");
    assert!(
        !["", "root", "0"].contains(&uid),
        "the runtime runs as root ({user})"
    );
    // Nothing secret-looking is copied into the image.
    for i in runtime.all("COPY") {
        for src in parse_copy(&i.args).sources {
            for bad in [".pem", ".key", ".env", "secret", "clients.toml"] {
                assert!(!src.contains(bad), "line {}: COPY {src}", i.line);
            }
        }
    }
    let health = runtime
        .all("HEALTHCHECK")
        .last()
        .expect("HEALTHCHECK")
        .args
        .clone();
    let health_cmd = exec_words(health.split_once("CMD").expect("HEALTHCHECK CMD").1);
    assert!(
        health_cmd
            .iter()
            .any(|w| w == "healthcheck" || w.ends_with("/readyz")),
        "HEALTHCHECK does not check /readyz: {health_cmd:?}"
    );
    let entry: Vec<String> = runtime
        .all("ENTRYPOINT")
        .chain(runtime.all("CMD"))
        .flat_map(|i| exec_words(&i.args))
        .collect();
    assert!(entry.iter().any(|w| w == "serve"), "{entry:?}");
    let exposed: Vec<u16> = runtime
        .all("EXPOSE")
        .flat_map(|i| {
            i.args
                .split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();

    // The binary with exactly the image's environment (and a token, as a deployment adds
    // it) listens on every interface, on the exposed ports, and its health check aims at
    // the admin listener.
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd.env("GRAPHGATE_SYSTEM_USER_TOKEN", "EAAB-image-test-token");
    for (k, v) in runtime.env() {
        cmd.env(k, v);
    }
    let dir = std::env::temp_dir().join(format!("graphgate-image-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = cmd.current_dir(&dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: toml::Table = text.parse().unwrap();
    let addr = |key: &str| -> std::net::SocketAddr {
        effective["server"][key].as_str().unwrap().parse().unwrap()
    };
    for key in ["listen", "admin_listen"] {
        assert!(
            addr(key).ip().is_unspecified(),
            "server.{key} in the image: {}",
            addr(key)
        );
        assert!(
            exposed.contains(&addr(key).port()),
            "server.{key} port not exposed"
        );
    }
}

/// Every file the Dockerfile copies from the build context (sources that exist, minus what
/// .dockerignore leaves out); fails on a COPY whose source would be missing.
fn context_files(stage: &Stage, ignore: &DockerIgnore) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in stage.all("COPY") {
        let copy = parse_copy(&i.args);
        if copy.from.is_some() {
            continue;
        }
        for src in &copy.sources {
            let files: Vec<String> = files_under(src)
                .into_iter()
                .filter(|f| !ignore.excludes(f))
                .collect();
            assert!(
                !files.is_empty(),
                "line {}: COPY {src}: not in the build context (missing or in .dockerignore)",
                i.line
            );
            for f in files {
                out.push((f, copy.dest.clone()));
            }
        }
    }
    out
}

#[test]
fn every_file_the_dockerfile_copies_is_in_the_context_with_every_declared_target() {
    let stages = parse_dockerfile(&read("Dockerfile"));
    let ignore = DockerIgnore::load();
    let copied: Vec<String> = stages
        .iter()
        .flat_map(|s| context_files(s, &ignore))
        .map(|(f, _)| f)
        .collect();
    // Cargo refuses to load a manifest whose declared targets have no file: each must be
    // copied (examples, tests and src/bin files are found only if present, so only declared
    // ones matter).
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    for (kind, dir) in [
        ("bench", "benches"),
        ("example", "examples"),
        ("test", "tests"),
        ("bin", "src/bin"),
    ] {
        for t in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let name = t["name"].as_str().unwrap();
            let path = t
                .get("path")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| format!("{dir}/{name}.rs"));
            let main_rs = format!("{dir}/{name}/main.rs");
            assert!(
                copied.contains(&path) || copied.contains(&main_rs),
                "[[{kind}]] {name}: {path} is not copied by the Dockerfile"
            );
        }
    }
    // Cargo loads every workspace member to build any of them: each one's manifest and
    // library are copied.
    let mut needed: Vec<String> = ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"]
        .map(String::from)
        .to_vec();
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str())
        .filter(|m| *m != ".");
    for member in members {
        needed.push(format!("{member}/Cargo.toml"));
        needed.push(format!("{member}/src/lib.rs"));
    }
    for needed in &needed {
        assert!(copied.contains(needed), "{needed} not copied");
    }
    // The Rust in the image can build what the lock file pins.
    let rust = stages
        .iter()
        .map(|s| s.base.as_str())
        .find(|b| b.starts_with("rust:"))
        .expect("a rust: build stage");
    let image_version = version_of(rust.trim_start_matches("rust:"));
    // Only this platform's packages: the others (Windows crates) need not be downloaded.
    let rustc = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    let rustc = String::from_utf8_lossy(&rustc.stdout);
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc names its host");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", host])
        .current_dir(repo())
        .output()
        .unwrap();
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cargo metadata: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for p in meta["packages"].as_array().unwrap() {
        if let Some(v) = p["rust_version"].as_str() {
            assert!(
                version_of(v) <= image_version,
                "{} {} needs Rust {v}, the image has {rust}",
                p["name"],
                p["version"]
            );
        }
    }
}

fn version_of(s: &str) -> (u32, u32, u32) {
    let v: Vec<u32> = s
        .split('-')
        .next()
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    (v[0], *v.get(1).unwrap_or(&0), *v.get(2).unwrap_or(&0))
}

// -------------------------------------------------------------------------------------------
// The build stage, for real.

/// Waits for `child` up to `deadline`; kills it (by its pid) past it.
fn wait_until(mut child: std::process::Child, deadline: Instant, what: &str) -> bool {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: not done within the time bound");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs the stages the image copies from in a directory holding only what they COPY from
/// the context (after .dockerignore), with their WORKDIR mapped to that directory; then runs
/// the binary the runtime stage copies, with the runtime stage's environment. Cargo uses the
/// machine's registry cache offline and keeps its target directory between runs under
/// target/dockerfile-build (as a BuildKit cache mount would), so a second run is quick.
#[test]
#[ignore = "a release build (minutes); .ci/run runs it"]
fn dockerfile_build_stage_builds_from_only_what_it_copies() {
    let deadline = Instant::now() + Duration::from_secs(45 * 60);
    let stages = parse_dockerfile(&read("Dockerfile"));
    let ignore = DockerIgnore::load();
    let runtime = stages.last().unwrap();
    let work = std::env::temp_dir().join(format!("graphgate-dockerfile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let mut built: BTreeMap<String, (PathBuf, String)> = BTreeMap::new();
    for stage in &stages[..stages.len() - 1] {
        let name = stage.name.clone().expect("build stages are named");
        let root = work.join(&name);
        std::fs::create_dir_all(&root).unwrap();
        let cache = repo().join("target/dockerfile-build").join(&name);
        std::fs::create_dir_all(&cache).unwrap();
        let mut workdir = "/".to_string();
        let mut env = stage.env();
        env.insert("CARGO_NET_OFFLINE".into(), "true".into());
        // What is checked is that the stage builds from what it copies, not how fast the
        // binary runs: an unoptimised release profile keeps this test to minutes in CI.
        for (key, value) in [
            ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0"),
            ("CARGO_PROFILE_RELEASE_LTO", "false"),
            ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256"),
            ("CARGO_PROFILE_RELEASE_DEBUG", "false"),
        ] {
            env.insert(key.into(), value.into());
        }
        for i in &stage.instructions {
            match i.keyword.as_str() {
                "WORKDIR" => {
                    assert_eq!(workdir, "/", "one WORKDIR per build stage");
                    workdir = i.args.clone();
                    // The stage's target/ is the kept cache.
                    std::os::unix::fs::symlink(&cache, root.join("target")).unwrap();
                }
                "COPY" => {
                    let copy = parse_copy(&i.args);
                    assert!(
                        copy.from.is_none(),
                        "line {}: COPY --from in a build stage",
                        i.line
                    );
                    let dest = if copy.dest.starts_with('/') {
                        copy.dest
                            .strip_prefix(&workdir)
                            .unwrap_or_else(|| panic!("line {}: COPY outside WORKDIR", i.line))
                            .trim_start_matches('/')
                            .to_string()
                    } else {
                        copy.dest.clone()
                    };
                    for src in &copy.sources {
                        let files: Vec<String> = files_under(src)
                            .into_iter()
                            .filter(|f| !ignore.excludes(f))
                            .collect();
                        assert!(
                            !files.is_empty(),
                            "line {}: COPY {src}: nothing to copy",
                            i.line
                        );
                        let src_is_dir = repo().join(src).is_dir();
                        for f in files {
                            let target = if src_is_dir {
                                // A directory's contents go into the destination.
                                root.join(&dest)
                                    .join(Path::new(&f).strip_prefix(src).unwrap())
                            } else if dest.ends_with('/') || dest == "." || dest == "./" {
                                root.join(&dest).join(Path::new(&f).file_name().unwrap())
                            } else {
                                root.join(&dest)
                            };
                            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                            std::fs::copy(repo().join(&f), &target).unwrap();
                        }
                    }
                }
                "RUN" => {
                    let cmd = run_command(&i.args);
                    eprintln!("[{name}] RUN {cmd}");
                    let child = Command::new("sh")
                        .args(["-c", &cmd])
                        .current_dir(&root)
                        .envs(&env)
                        .stdin(Stdio::null())
                        .spawn()
                        .unwrap();
                    assert!(
                        wait_until(child, deadline, &cmd),
                        "line {}: RUN failed in a directory holding only what the stage copies: {cmd}",
                        i.line
                    );
                }
                "ENV" | "ARG" | "LABEL" => {}
                other => panic!(
                    "line {}: {other} in a build stage is not understood here",
                    i.line
                ),
            }
        }
        built.insert(name, (root, workdir));
    }
    // What the runtime stage copies from the build stages exists; the binary runs with the
    // image's environment.
    let mut binary = None;
    for i in runtime.all("COPY") {
        let copy = parse_copy(&i.args);
        let Some(from) = copy.from else { continue };
        let (root, workdir) = &built[&from];
        for src in &copy.sources {
            let rel = src
                .strip_prefix(workdir.as_str())
                .unwrap_or(src)
                .trim_start_matches('/');
            let path = root.join(rel);
            assert!(
                path.is_file(),
                "line {}: COPY --from={from} {src}: not built",
                i.line
            );
            if copy.dest.ends_with("/graphgate") {
                binary = Some(path);
            }
        }
    }
    let binary = binary.expect("the runtime stage copies the graphgate binary");
    let mut cmd = Command::new(&binary);
    cmd.arg("check-config")
        .env_clear()
        .env("GRAPHGATE_SYSTEM_USER_TOKEN", "EAAB-image-test-token");
    for (k, v) in runtime.env() {
        cmd.env(k, v);
    }
    let out = cmd.current_dir(&work).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("listen = \"0.0.0.0:8080\""), "{text}");
    // Built without the `demo` feature: the simulated Graph's commands are not in it.
    for command in ["demo", "fake-graph"] {
        let out = Command::new(&binary)
            .args([command, "--help"])
            .env_clear()
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the image's binary runs `{command}`: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// The production build (graphgate without default features, as the Dockerfile builds it)
/// does not depend on the simulated Graph API; the default build (the demo) does.
#[test]
fn the_production_build_has_no_simulated_graph() {
    let tree = |args: &[&str]| {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "-p", "graphgate", "-e", "normal,build"])
            .args(["--prefix", "none", "--locked", "--offline"])
            .args(args)
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let has_fake_graph = |tree: &str| tree.lines().any(|l| l.starts_with("fake-graph "));
    let production = tree(&["--no-default-features"]);
    assert!(
        production.lines().any(|l| l.starts_with("hyper ")),
        "{production}"
    );
    assert!(!has_fake_graph(&production), "{production}");
    assert!(has_fake_graph(&tree(&[])), "the demo build uses fake-graph");
}

// -------------------------------------------------------------------------------------------
// The Helm chart, rendered by Helm's engine (Helm's Go SDK through the helm-python-sdk
// wheel: there is no `helm` binary in the package registries these machines reach).

const CHART: &str = "deploy/helm/graphgate";

/// The Python with helm-python-sdk: $GRAPHGATE_TEST_PYTHON (set by scripts/test), else the
/// virtualenv scripts/test makes.
fn helm_python() -> PathBuf {
    std::env::var_os("GRAPHGATE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/test-venv/bin/python"))
}

const RENDER: &str = r#"
import json, sys
import helm_python as helm, yaml
chart, values = sys.argv[1], json.loads(sys.argv[2])
lint = helm.lint(chart, values, strict=True)
with helm.Chart.load(chart) as c:
    out = c.render(values, name="gg", namespace="prod")
docs = []
for path, text in sorted(out.items()):
    if path.endswith(".yaml"):
        docs += [d for d in yaml.safe_load_all(text) if d]
print(json.dumps({"lint": lint, "docs": docs}))
"#;

/// Renders the chart with `values` (release `gg` in namespace `prod`): Helm's lint report
/// and every rendered object; or Helm's error.
fn helm_render(values: &Value) -> Result<(Value, Vec<Value>), String> {
    let python = helm_python();
    let out = Command::new(&python)
        .args(["-c", RENDER])
        .arg(repo().join(CHART))
        .arg(values.to_string())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} ({e}): run scripts/test, which installs it",
                python.display()
            )
        });
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !err.contains("No module named"),
            "helm-python-sdk missing ({err}); scripts/test installs it into target/test-venv"
        );
        return Err(err);
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON from the render script");
    Ok((v["lint"].clone(), v["docs"].as_array().unwrap().clone()))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

/// Every `labels` entry of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().expect("selector labels");
    !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k] == v)
}

const CLIENTS_TOML: &str =
    "[[clients]]\nname = \"reports\"\nkey = \"helm-client-key-secret\"\npages = [\"1001\"]\n";

fn secret_values() -> Value {
    serde_json::json!({
        "secrets": {
            "systemUserToken": "EAAB-helm-system-token",
            "appSecret": "helm-app-secret",
            "adminToken": "helm-admin-token",
            "clients": CLIENTS_TOML,
        }
    })
}

/// Runs the real binary the way the pod would: the ConfigMap and Secret files at their
/// mount paths (moved into a temp dir), the container's environment with the Secret's values
/// resolved. Returns `check-config`'s effective configuration.
fn check_config_as_the_pod(docs: &[Value]) -> toml::Table {
    let deployment = find(docs, "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let secret = find(docs, "Secret").expect("the chart's Secret");
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    let config_map = find(docs, "ConfigMap").unwrap();
    let dir = std::env::temp_dir().join(format!("graphgate-helm-pod-{}", fastrand::u64(..)));
    // Volume name -> files.
    let mut mounts: BTreeMap<String, PathBuf> = BTreeMap::new();
    for m in container["volumeMounts"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"));
        let local = dir.join(name);
        std::fs::create_dir_all(&local).unwrap();
        let (source, data) = if let Some(cm) = volume.get("configMap") {
            assert_eq!(cm["name"], config_map["metadata"]["name"]);
            (cm, &config_map["data"])
        } else {
            let s = &volume["secret"];
            assert_eq!(
                s["secretName"], secret_name,
                "volume {name} names another Secret"
            );
            (s, &secret["stringData"])
        };
        for item in source["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap();
            let text = data[key]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no key {key}"));
            std::fs::write(local.join(item["path"].as_str().unwrap()), text).unwrap();
        }
        mounts.insert(m["mountPath"].as_str().unwrap().to_string(), local);
    }
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config").env_clear();
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = if let Some(v) = e["value"].as_str() {
            // A path under a mount points into the temp dir.
            mounts
                .iter()
                .find_map(|(mount, local)| {
                    v.strip_prefix(mount.as_str()).map(|rest| {
                        local
                            .join(rest.trim_start_matches('/'))
                            .display()
                            .to_string()
                    })
                })
                .unwrap_or_else(|| v.to_string())
        } else {
            let r = &e["valueFrom"]["secretKeyRef"];
            assert_eq!(r["name"], secret_name, "{name} names another Secret");
            match secret["stringData"][r["key"].as_str().unwrap()].as_str() {
                Some(v) => v.to_string(),
                None if r["optional"] == true => continue,
                None => panic!("{name}: Secret has no key {}", r["key"]),
            }
        };
        cmd.env(name, value);
    }
    let out = cmd.current_dir(&dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.parse().unwrap()
}

#[test]
fn helm_chart_renders_probes_ports_secret_references_and_a_configuration_graphgate_accepts() {
    let values = secret_values();
    let (lint, docs) = helm_render(&values).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        lint["errors"].as_array().unwrap().is_empty()
            && lint["messages"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["severity"].as_i64() < Some(2)),
        "helm lint: {lint}"
    );
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ServiceAccount",
    ] {
        assert!(find(&docs, kind).is_some(), "no {kind}");
    }
    assert!(find(&docs, "HorizontalPodAutoscaler").is_none());
    assert!(find(&docs, "ServiceMonitor").is_none());

    let deployment = find(&docs, "Deployment").unwrap();
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let port = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((port("http"), port("admin")), (8080, 9090));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    // Draining fits in the grace period: preStop sleep + shutdown_grace_ms < grace period.
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
    };
    let grace_ms: u64 = env("GRAPHGATE_SERVER__SHUTDOWN_GRACE_MS").unwrap()["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let sleep: u64 = c["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let period = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        period * 1000 > grace_ms + sleep * 1000,
        "{period} s for {grace_ms} ms + {sleep} s"
    );
    // Secrets only through the Secret: none in the ConfigMap or as plain env values.
    let secret = find(&docs, "Secret").unwrap();
    let cm = find(&docs, "ConfigMap").unwrap().to_string();
    for s in [
        "EAAB-helm-system-token",
        "helm-app-secret",
        "helm-admin-token",
        "helm-client-key-secret",
    ] {
        assert!(!cm.contains(s), "ConfigMap holds a secret");
        assert!(
            !c["env"].to_string().contains(s),
            "a secret as a plain env value"
        );
    }
    for name in [
        "GRAPHGATE_SYSTEM_USER_TOKEN",
        "GRAPHGATE_APP_SECRET",
        "GRAPHGATE_SERVER__ADMIN_TOKEN",
    ] {
        let r = &env(name).unwrap_or_else(|| panic!("{name}"))["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], secret["metadata"]["name"], "{name}");
        assert!(
            secret["stringData"]
                .get(r["key"].as_str().unwrap())
                .is_some(),
            "{name}"
        );
    }
    // The Service reaches the named container ports of these pods.
    let service = find(&docs, "Service").unwrap();
    assert!(selects(&service["spec"]["selector"], pod_labels));
    for p in service["spec"]["ports"].as_array().unwrap() {
        let target = p["targetPort"].as_str().unwrap();
        assert!(port(target) > 0, "Service targets unknown port {target}");
    }
    let pdb = find(&docs, "PodDisruptionBudget").unwrap();
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));

    // graphgate itself accepts what the pod would give it.
    let effective = check_config_as_the_pod(&docs);
    assert_eq!(effective["server"]["listen"].as_str(), Some("0.0.0.0:8080"));
    assert_eq!(
        effective["server"]["admin_listen"].as_str(),
        Some("0.0.0.0:9090")
    );
    assert_eq!(
        effective["server"]["shutdown_grace_ms"].as_integer(),
        Some(grace_ms as i64)
    );
    assert_eq!(
        effective["server"]["admin_token"].as_str(),
        Some("[redacted]")
    );
    assert_eq!(
        effective["credentials"]["app_secret"].as_str(),
        Some("[redacted]")
    );
    assert_eq!(effective["clients"][0]["name"].as_str(), Some("reports"));
    assert_eq!(effective["log"]["format"].as_str(), Some("json"));
}

#[test]
fn helm_chart_options_autoscaling_service_monitor_redis_and_an_existing_secret() {
    let values = serde_json::json!({
        "secrets": {"create": false, "existingSecret": "graphgate-tokens"},
        "redis": {"enabled": true},
        "autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 9},
        "serviceMonitor": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}},
        "shutdownGraceMs": 30000,
        "preStopSleepSeconds": 10,
        "env": {"GRAPHGATE_QUOTA__PAGE_CALLS": 600},
    });
    let (lint, docs) = helm_render(&values).unwrap_or_else(|e| panic!("{e}"));
    assert!(lint["errors"].as_array().unwrap().is_empty(), "{lint}");
    assert!(
        find(&docs, "Secret").is_none(),
        "an existing Secret is used, none created"
    );
    let deployment = find(&docs, "Deployment").unwrap();
    assert!(
        deployment["spec"].get("replicas").is_none(),
        "the HPA owns replicas"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    for e in c["env"].as_array().unwrap() {
        if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            assert_eq!(r["name"], "graphgate-tokens", "{e}");
        }
    }
    let names: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"GRAPHGATE_REDIS__URL"), "{names:?}");
    assert!(names.contains(&"GRAPHGATE_QUOTA__PAGE_CALLS"), "{names:?}");
    for v in pod["volumes"].as_array().unwrap() {
        if let Some(s) = v.get("secret") {
            assert_eq!(s["secretName"], "graphgate-tokens");
        }
    }
    // 30 s drain + 10 s preStop + margin.
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 40);
    let hpa = find(&docs, "HorizontalPodAutoscaler").unwrap();
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    let monitor = find(&docs, "ServiceMonitor").unwrap();
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let service = find(&docs, "Service").unwrap();
    assert!(selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == endpoint["port"] && p["targetPort"] == "admin"),
        "the ServiceMonitor scrapes the admin port"
    );
}

#[test]
fn helm_chart_refuses_to_render_without_the_required_secrets() {
    let err = helm_render(&serde_json::json!({})).unwrap_err();
    assert!(err.contains("secrets.systemUserToken"), "{err}");
    let err =
        helm_render(&serde_json::json!({"secrets": {"systemUserToken": "EAAB-x"}})).unwrap_err();
    assert!(err.contains("secrets.clients"), "{err}");
    let err = helm_render(&serde_json::json!({
        "secrets": {"systemUserToken": "EAAB-x", "clients": CLIENTS_TOML},
        "redis": {"enabled": true}
    }))
    .unwrap_err();
    assert!(err.contains("secrets.redisUrl"), "{err}");
}
