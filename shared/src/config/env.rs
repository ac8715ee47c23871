//! `${VAR}` and `${VAR:-default}` in the provider file.

pub(super) const ENV_FIX: &str = "export the variable, or give a default as ${NAME:-value}";

/// Expands `${VAR}` and `${VAR:-default}`.
pub(super) fn expand(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{value}` has a `${{` without its closing `}}`"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A child process's `env:` section: each value expanded, each name one a program can be
/// given. `at` names the section's key.
pub(super) fn child_env(
    errs: &super::Errors<'_>,
    at: &str,
    raw: std::collections::BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> super::Result<crate::process::ChildEnv> {
    if !errs.with_secrets {
        return Ok(crate::process::ChildEnv::default());
    }
    let mut out = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let key = format!("{at}.{name}");
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(errs.at(
                key,
                format!("`{name}` is not an environment variable name"),
                "use a name such as ANTHROPIC_API_KEY",
            ));
        }
        let value = expand(&value, env).map_err(|m| errs.at(key, m, ENV_FIX))?;
        out.push((name, value));
    }
    Ok(crate::process::ChildEnv(out))
}
