//! Quality gates a chain's `check` steps may run: commands the operator names in the
//! provider file, never a command taken from a task (a producer must not be able to run
//! programs on workers).

use std::collections::BTreeMap;
use std::time::Duration;

use super::raw::RawCheck;
use super::{Errors, Result};

/// One check: a program and its arguments, run without a shell, with the step's input on
/// stdin; exit 0 passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckConfig {
    pub program: String,
    pub args: Vec<String>,
    /// What its environment holds besides `PATH` and `HOME`.
    pub env: crate::process::ChildEnv,
    /// The check fails when it runs longer.
    pub timeout: Duration,
}

/// Default [`CheckConfig::timeout`].
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(300);

pub(super) fn checks(
    errs: &Errors<'_>,
    raw: BTreeMap<String, RawCheck>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, CheckConfig>> {
    let mut out = BTreeMap::new();
    for (name, c) in raw {
        let at = |k: &str| format!("checks.{name}.{k}");
        if c.program.trim().is_empty() {
            return Err(errs.at(
                at("program"),
                "the program is empty",
                "name the program to run, e.g. program: pytest",
            ));
        }
        let timeout = match c.timeout {
            Some(t) => errs.duration(at("timeout"), &t)?,
            None => DEFAULT_CHECK_TIMEOUT,
        };
        let child_env = super::env::child_env(errs, &at("env"), c.env, env)?;
        out.insert(
            name,
            CheckConfig {
                program: c.program,
                args: c.args,
                env: child_env,
                timeout,
            },
        );
    }
    Ok(out)
}
