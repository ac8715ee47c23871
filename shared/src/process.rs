//! What every llmq binary shares about itself: the name an instance goes by, the defaults of
//! its flags for in-process use, and the environment of the programs it starts.

use std::fmt;

/// The environment a child process (a CLI provider, a chain's check) starts with: none of the
/// worker's but [`ChildEnv::INHERITED`], plus what its entry in the provider file names. A
/// check runs code that models wrote and a CLI agent runs tools: neither may read the
/// worker's `DATABASE_URL`, `REDIS_URL` or provider keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChildEnv(pub Vec<(String, String)>);

impl ChildEnv {
    /// Passed on from the worker's own environment, where set.
    pub const INHERITED: [&str; 2] = ["PATH", "HOME"];

    /// Clears `cmd`'s environment, then sets the inherited variables and the entry's own.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        cmd.env_clear();
        for name in Self::INHERITED {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        cmd.envs(self.0.iter().map(|(k, v)| (k, v)));
    }
}

/// Values are left out: they often hold API keys.
impl fmt::Debug for ChildEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}=…")))
            .finish()
    }
}

/// A name for this process, unique in the fleet: host, pid and a random suffix
/// (`web-7f9c-1234-a1b2c3`); `fallback` stands in for an unknown host name.
#[must_use]
pub fn instance_id(fallback: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| fallback.to_owned());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..6])
}

/// `T`'s flags at their defaults: parsed from no arguments, with no environment variable
/// read and a required flag left empty (the caller sets it). A binary's settings derive
/// `clap::Args`, so each default is written once, on its flag.
///
/// # Errors
/// A default does not parse (a unit test of each binary's settings rules that out).
pub fn defaults<T: clap::Args + clap::FromArgMatches>(
    name: &'static str,
) -> clap::error::Result<T> {
    let cmd = T::augment_args(clap::Command::new(name)).mut_args(|a| {
        let required = a.is_required_set();
        let a = a.env(None::<&'static str>).required(false);
        if required { a.default_value("") } else { a }
    });
    T::from_arg_matches(&cmd.try_get_matches_from([name])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_differ_and_name_the_process() {
        let (a, b) = (instance_id("x"), instance_id("x"));
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }
}
