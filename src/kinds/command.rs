//! Command kinds: named jobs that an operator defines in the config, each
//! running one fixed program, so that clients can be offered safe jobs
//! without the general `exec` kind.
//!
//! ```toml
//! [kinds.thumbnail]
//! pool = "io"
//! argv = ["/usr/bin/convert", "{src}", "-resize", "{size}", "{dst}"]
//! timeout_secs = 30
//! max_attempts = 3
//! stdin_payload = false
//! ```
//!
//! `{field}` placeholders are replaced by the payload's field of that name.
//! A placeholder is always a whole argument and becomes exactly one
//! argument: the value is never split, globbed or shell-expanded, so
//! `{"src": "x; rm -rf /"}` passes the literal text `x; rm -rf /`. Only
//! strings and numbers substitute; a missing field or another type fails
//! the job with a message naming the field. `{{name}}` passes the literal
//! text `{name}`. With `stdin_payload = true` the payload's JSON (one line)
//! is written to the program's stdin.
//!
//! Command kinds run whether or not `[exec] enabled` is set, ignore the
//! exec allow-list (the operator chose the program), and share exec's other
//! limits: environment (`[exec] env`), output cap, default timeout, and the
//! rule that a non-zero exit fails the job. Their result has the same shape
//! as exec's. See `kinds::exec` for the runner both use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jobd_actors::{KindOptions, RuntimeBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::exec::{ChildSpec, ExecConfig, job_deadline, run_child};
use crate::protocol::type_name;

/// Kind names that belong to built-in kinds and cannot be redefined.
pub const RESERVED_KINDS: [&str; 3] = ["exec", "echo", "sleep"];

fn default_pool() -> String {
    jobd_actors::DEFAULT_POOL.to_string()
}

/// One `[kinds.NAME]` table of the config.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandKind {
    /// The program (absolute path) and its arguments; whole-argument
    /// `{field}` placeholders take values from the payload.
    pub argv: Vec<String>,
    /// Pool the kind runs on.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Per-attempt timeout; `[exec] timeout_secs` when unset (0 = none).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Attempts in all when the submission does not say (default 1).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Write the payload as JSON to the program's stdin.
    #[serde(default)]
    pub stdin_payload: bool,
}

/// One argument of a command template, parsed at start-up.
#[derive(Debug, Clone, PartialEq)]
enum Arg {
    /// Passed as it is.
    Literal(String),
    /// Replaced by the payload field of this name.
    Field(String),
}

/// True for the characters a placeholder name may use.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// `Some(name)` when `s` is exactly `{name}`.
fn placeholder(s: &str) -> Option<&str> {
    let name = s.strip_prefix('{')?.strip_suffix('}')?;
    (!name.is_empty() && name.chars().all(is_name_char)).then_some(name)
}

/// True when `s` contains a `{name}` inside a longer argument.
fn has_embedded_placeholder(s: &str) -> bool {
    s.match_indices('{').any(|(i, _)| {
        let rest = &s[i + 1..];
        let end = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
        end > 0 && rest[end..].starts_with('}')
    })
}

/// Parse one template argument (index `i`, for messages).
fn parse_arg(kind: &str, i: usize, s: &str) -> Result<Arg, String> {
    if let Some(inner) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}'))
        && placeholder(inner).is_some()
    {
        // `{{name}}`: the literal text `{name}`.
        return Ok(Arg::Literal(inner.to_string()));
    }
    if let Some(name) = placeholder(s) {
        return Ok(Arg::Field(name.to_string()));
    }
    if has_embedded_placeholder(s) {
        return Err(format!(
            "kind '{kind}': argument {i} '{s}' has a placeholder inside a longer \
             argument; a placeholder must be a whole argument (e.g. \"--size\", \"{{size}}\")"
        ));
    }
    Ok(Arg::Literal(s.to_string()))
}

/// A command kind checked and parsed at start-up.
#[derive(Debug, Clone, PartialEq)]
struct Template {
    /// The kind's name, for messages.
    kind: String,
    /// argv[0], an absolute path.
    program: PathBuf,
    /// Every argument, argv[0] included.
    args: Vec<Arg>,
    /// Feed the payload on stdin.
    stdin_payload: bool,
}

impl Template {
    /// Check a `[kinds.NAME]` table: a non-reserved name, a non-empty argv
    /// whose program is an absolute path, and well-formed placeholders.
    fn parse(kind: &str, c: &CommandKind) -> Result<Template, String> {
        if kind.is_empty() {
            return Err("a [kinds] table has an empty name".to_string());
        }
        if RESERVED_KINDS.contains(&kind) {
            return Err(format!(
                "kind '{kind}': the name belongs to a built-in kind; choose another"
            ));
        }
        let Some(program) = c.argv.first() else {
            return Err(format!("kind '{kind}': argv is empty"));
        };
        if !Path::new(program).is_absolute() {
            return Err(format!(
                "kind '{kind}': argv[0] '{program}' must be an absolute path"
            ));
        }
        if c.max_attempts == Some(0) {
            return Err(format!("kind '{kind}': max_attempts must be at least 1"));
        }
        let args = c
            .argv
            .iter()
            .enumerate()
            .map(|(i, a)| {
                if i == 0 {
                    Ok(Arg::Literal(a.clone()))
                } else {
                    parse_arg(kind, i, a)
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Template {
            kind: kind.to_string(),
            program: PathBuf::from(program),
            args,
            stdin_payload: c.stdin_payload,
        })
    }

    /// The argv for one payload: every placeholder replaced by exactly one
    /// argument, or an error naming the field that is missing or unusable.
    fn render(&self, payload: &Value) -> Result<Vec<String>, String> {
        self.args
            .iter()
            .map(|a| match a {
                Arg::Literal(s) => Ok(s.clone()),
                Arg::Field(name) => self.field(payload, name),
            })
            .collect()
    }

    fn field(&self, payload: &Value, name: &str) -> Result<String, String> {
        let kind = &self.kind;
        let Value::Object(map) = payload else {
            return Err(format!(
                "kind '{kind}': the payload must be a JSON object with field '{name}'"
            ));
        };
        match map.get(name) {
            None => Err(format!("kind '{kind}': payload field '{name}' is missing")),
            Some(Value::String(s)) if s.contains('\0') => Err(format!(
                "kind '{kind}': payload field '{name}' contains a NUL byte"
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(other) => Err(format!(
                "kind '{kind}': payload field '{name}' must be a string or a number, not {}",
                type_name(other)
            )),
        }
    }
}

/// Register every command kind. Fails, naming the kind, when one is
/// invalid (see `Template::parse`); the daemon then refuses to start.
/// A program that does not exist (yet) is only logged: it may be installed
/// later, and its jobs fail with a clear message until then.
pub fn register(
    mut b: RuntimeBuilder,
    kinds: &BTreeMap<String, CommandKind>,
    exec: &ExecConfig,
) -> Result<RuntimeBuilder, String> {
    for (name, c) in kinds {
        let t = Template::parse(name, c)?;
        if !t.program.exists() {
            tracing::warn!(kind = %name, program = %t.program.display(),
                "command kind's program does not exist (yet)");
        }
        let timeout_secs = c.timeout_secs.unwrap_or(exec.timeout_secs);
        let default_timeout =
            (timeout_secs > 0).then(|| std::time::Duration::from_secs(timeout_secs));
        let options = KindOptions {
            max_attempts: c.max_attempts.unwrap_or(1),
            timeout: default_timeout,
            ..KindOptions::default()
        };
        let max_output_bytes = exec.max_output_bytes;
        let exec_env = exec.clone();
        b = b.raw_handler(name, &c.pool, options, move |ctx, payload| {
            let argv = t.render(payload)?;
            let stdin = if t.stdin_payload {
                let mut line = serde_json::to_vec(payload)
                    .map_err(|e| format!("cannot encode the payload: {e}"))?;
                line.push(b'\n');
                Some(line)
            } else {
                None
            };
            let spec = ChildSpec {
                program: t.program.clone(),
                argv,
                env: exec_env.passed_env(),
                cwd: None,
                stdin,
                max_output_bytes,
                deadline: job_deadline(ctx, default_timeout),
            };
            run_child(&spec, &|| ctx.is_cancelled())?.into_result()
        });
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kind(argv: &[&str]) -> CommandKind {
        CommandKind {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            pool: default_pool(),
            timeout_secs: None,
            max_attempts: None,
            stdin_payload: false,
        }
    }

    fn tpl(argv: &[&str]) -> Template {
        Template::parse("k", &kind(argv)).unwrap()
    }

    #[test]
    fn placeholders_take_whole_arguments_from_strings_and_numbers() {
        let t = tpl(&[
            "/usr/bin/prog",
            "--size",
            "{size}",
            "{name}",
            "--",
            "{size}",
        ]);
        let argv = t.render(&json!({"size": 640, "name": "a b.png"})).unwrap();
        assert_eq!(
            argv,
            ["/usr/bin/prog", "--size", "640", "a b.png", "--", "640"]
        );
        let argv = t.render(&json!({"size": 1.5, "name": ""})).unwrap();
        assert_eq!(argv[2], "1.5");
        assert_eq!(argv[3], "");
    }

    #[test]
    fn shell_syntax_in_a_value_stays_one_literal_argument() {
        let t = tpl(&["/bin/echo", "{x}"]);
        for evil in ["x; rm -rf /", "$(id)", "`id`", "a b c", "*", "-rf", "{y}"] {
            let argv = t.render(&json!({"x": evil})).unwrap();
            assert_eq!(argv, ["/bin/echo", evil]);
        }
    }

    #[test]
    fn missing_or_mistyped_fields_fail_with_the_field_name() {
        let t = tpl(&["/bin/echo", "{size}"]);
        let e = t.render(&json!({})).unwrap_err();
        assert!(e.contains("'size'") && e.contains("missing"), "{e}");
        for (v, what) in [
            (json!(true), "boolean"),
            (json!(null), "null"),
            (json!([1]), "array"),
            (json!({"a": 1}), "object"),
        ] {
            let e = t.render(&json!({ "size": v })).unwrap_err();
            assert!(e.contains("'size'") && e.contains(what), "{e}");
        }
        let e = t.render(&json!("just a string")).unwrap_err();
        assert!(e.contains("JSON object"), "{e}");
        assert!(t.render(&json!({"size": "a\0b"})).is_err());
        // Without placeholders any payload is fine.
        assert_eq!(
            tpl(&["/bin/true"]).render(&json!(null)).unwrap(),
            ["/bin/true"]
        );
    }

    #[test]
    fn literals_braces_and_escapes() {
        let t = tpl(&[
            "/usr/bin/find",
            ".",
            "-exec",
            "{}",
            ";",
            "{{size}}",
            "{\"a\":1}",
        ]);
        let argv = t.render(&json!({})).unwrap();
        assert_eq!(argv[3], "{}");
        assert_eq!(argv[5], "{size}");
        assert_eq!(argv[6], "{\"a\":1}");
    }

    #[test]
    fn invalid_kinds_are_refused_naming_the_kind() {
        let cases: [(&str, CommandKind, &str); 6] = [
            ("empty", kind(&[]), "argv is empty"),
            ("rel", kind(&["bin/prog"]), "absolute"),
            ("ph0", kind(&["{prog}"]), "absolute"),
            (
                "inner",
                kind(&["/bin/echo", "--size={size}"]),
                "whole argument",
            ),
            ("echo", kind(&["/bin/echo"]), "built-in"),
            (
                "zero",
                CommandKind {
                    max_attempts: Some(0),
                    ..kind(&["/bin/echo"])
                },
                "max_attempts",
            ),
        ];
        for (name, c, why) in cases {
            let e = Template::parse(name, &c).unwrap_err();
            assert!(e.contains(&format!("'{name}'")) && e.contains(why), "{e}");
            let mut m = BTreeMap::new();
            m.insert(name.to_string(), c);
            let r = register(jobd_actors::Runtime::builder(), &m, &ExecConfig::default());
            assert!(r.is_err());
        }
    }

    #[test]
    fn config_tables_parse_with_defaults_and_reject_unknown_keys() {
        let c: CommandKind = serde_json::from_value(json!({"argv": ["/bin/echo"]})).unwrap();
        assert_eq!(c.pool, "default");
        assert_eq!(c.timeout_secs, None);
        assert!(!c.stdin_payload);
        assert!(serde_json::from_value::<CommandKind>(json!({"argv": [], "shell": true})).is_err());
        let e: ExecConfig = serde_json::from_value(json!({})).unwrap();
        assert_eq!(e, ExecConfig::default());
        assert!(!e.enabled);
        assert_eq!(e.env, ["PATH"]);
        assert_eq!(e.max_output_bytes, 1 << 20);
        assert_eq!(e.timeout_secs, 60);
        assert!(serde_json::from_value::<ExecConfig>(json!({"enable": true})).is_err());
    }
}
