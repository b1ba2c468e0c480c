//! Configuration loading shared by every SDP process (SPEC §9).
//!
//! One TOML file per process, then `SDP_<KEY>` environment variables on top (upper case, `__`
//! between a table and its key). An unknown key in the file is an error that names it. An
//! `SDP_*` variable that names no key of this process is ignored and reported in
//! [`Loaded::ignored_env`], because the server, the agents and the command-line client share
//! one environment on laptops, and each reads only its own keys.

mod types;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use types::{ByteSize, ConfigDuration, Secret};

/// The prefix of every configuration variable.
pub const ENV_PREFIX: &str = "SDP_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("environment variable {var} is not a valid TOML value: {message}")]
    EnvValue { var: String, message: String },
    #[error("unknown config key `{key}`{}", origin_suffix(.path))]
    UnknownKey { key: String, path: Option<PathBuf> },
    #[error("invalid configuration{}: {message}", origin_suffix(.path))]
    Invalid {
        path: Option<PathBuf>,
        message: String,
    },
}

fn origin_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

/// A configuration, and what of the environment it did not use.
#[derive(Debug)]
pub struct Loaded<T> {
    pub config: T,
    /// `SDP_*` variables that name no key of this configuration, and were ignored.
    pub ignored_env: Vec<String>,
}

/// Reads `file` (if any), applies the `SDP_*` variables of `env`, and deserializes `T`.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.message().to_owned(),
                })?
        }
        None => toml::Table::new(),
    };
    let from_env = apply_env(&mut table, env)?;
    from_table(table, file, &from_env)
}

/// Deserializes `T`; `from_env` maps the dotted keys set by variables to those variables.
fn from_table<T: DeserializeOwned>(
    table: toml::Table,
    file: Option<&Path>,
    from_env: &BTreeMap<String, String>,
) -> Result<Loaded<T>, ConfigError> {
    let mut unknown = Vec::new();
    let value = toml::Value::Table(table);
    let parsed: Result<T, _> =
        serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    let mut ignored_env = Vec::new();
    for key in unknown {
        // An unknown table reports itself, not the keys a variable put under it.
        let prefix = format!("{key}.");
        let vars: Vec<&String> = from_env
            .iter()
            .filter(|(dotted, _)| **dotted == key || dotted.starts_with(&prefix))
            .map(|(_, var)| var)
            .collect();
        if vars.is_empty() {
            // Reported before any other error: a misspelt key often causes a missing one.
            return Err(ConfigError::UnknownKey {
                key,
                path: file.map(Path::to_owned),
            });
        }
        ignored_env.extend(vars.into_iter().cloned());
    }
    let config = parsed.map_err(|e| ConfigError::Invalid {
        path: file.map(Path::to_owned),
        message: e.to_string(),
    })?;
    Ok(Loaded {
        config,
        ignored_env,
    })
}

/// Puts each `SDP_A__B=v` into `table` as `a.b = v`, and returns the dotted keys it set with
/// their variables.
///
/// Values are strings, except those that start with `[` or `{`, which are read as TOML arrays
/// and inline tables, for keys that hold lists or tables.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut set = BTreeMap::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest.is_empty() {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        if path.iter().any(String::is_empty) {
            continue;
        }
        let value = if raw.starts_with('[') || raw.starts_with('{') {
            let doc = format!("v = {raw}");
            let mut parsed = doc
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::EnvValue {
                    var: var.clone(),
                    message: e.message().to_owned(),
                })?;
            parsed.remove("v").unwrap_or(toml::Value::String(raw))
        } else {
            toml::Value::String(raw)
        };
        if insert_path(table, &path, value) {
            set.insert(path.join("."), var);
        }
    }
    Ok(set)
}

/// Sets `path` in `table`, creating tables on the way. A path that would turn a plain key into
/// a table names no key we have, and is left out.
fn insert_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> bool {
    match path {
        [] => false,
        [last] => {
            table.insert(last.clone(), value);
            true
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(inner) => insert_path(inner, rest, value),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Example {
        listen: String,
        token: Secret,
        #[serde(default)]
        git: Git,
        ttl: ConfigDuration,
    }

    #[derive(Debug, Default, Deserialize)]
    struct Git {
        probe_repo: Option<String>,
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_the_file_with_double_underscore_for_tables() {
        let f = write("listen = \"a\"\nttl = \"30s\"\n[git]\nprobe_repo = \"x\"\n");
        let c: Example = load(
            Some(f.path()),
            env(&[("SDP_TOKEN", "t0k"), ("SDP_GIT__PROBE_REPO", "y")]),
        )
        .unwrap()
        .config;
        assert_eq!(c.listen, "a");
        assert_eq!(c.token.expose(), "t0k");
        assert_eq!(c.git.probe_repo.as_deref(), Some("y"));
        assert_eq!(c.ttl.get(), std::time::Duration::from_secs(30));
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error_that_names_it() {
        let f = write("listen = \"a\"\ntoken = \"t\"\nttl = \"1s\"\n[git]\nprobe_rpeo = \"x\"\n");
        let err = load::<Example>(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("`git.probe_rpeo`"), "{err}");
    }

    #[test]
    fn variables_of_other_processes_are_ignored_and_reported() {
        let loaded: Loaded<Example> = load(
            None,
            env(&[
                ("SDP_LISTEN", "a"),
                ("SDP_TOKEN", "t"),
                ("SDP_TTL", "2h"),
                ("SDP_USERNAME", "alice"),
                ("SDP_GIT__UNKNOWN", "x"),
                ("SDP_OTHER__KEY", "x"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(
            loaded.config.ttl.get(),
            std::time::Duration::from_secs(7200)
        );
        let mut ignored = loaded.ignored_env;
        ignored.sort();
        assert_eq!(
            ignored,
            ["SDP_GIT__UNKNOWN", "SDP_OTHER__KEY", "SDP_USERNAME"]
        );
    }

    #[test]
    fn a_bad_duration_is_explained() {
        let err = load::<Example>(
            None,
            env(&[("SDP_LISTEN", "a"), ("SDP_TOKEN", "t"), ("SDP_TTL", "soon")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("duration"), "{err}");
    }

    #[test]
    fn a_bad_size_is_an_error_that_names_the_key() {
        #[derive(Debug, Deserialize)]
        struct Sized {
            max_log_size: ByteSize,
        }
        let f = write("max_log_size = \"64MB\"\n");
        let err = load::<Sized>(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("max_log_size"), "{err}");
        let from_env = load::<Sized>(None, env(&[("SDP_MAX_LOG_SIZE", "512KiB")])).unwrap();
        assert_eq!(from_env.config.max_log_size, ByteSize::kib(512));
        let integer = load::<Sized>(Some(write("max_log_size = 1048576\n").path()), env(&[]));
        assert_eq!(integer.unwrap().config.max_log_size, ByteSize::mib(1));
    }
}
