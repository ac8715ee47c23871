//! The crates' layout: imports between the top modules of a crate run one way (each
//! `lib.rs` names the order), so no two modules need each other. `make lint` runs this test
//! alone, and `make test` with the rest.
//!
//! A top module is a file `src/<m>.rs` or a directory `src/<m>/`. A module names another
//! by a path from the crate's root (`crate::<m>`, `crate::{<m>, ...}`) or by enough
//! `super::` to reach the root. Comments, string literals and test modules (`#[cfg(test)]`)
//! are left out: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose `src/` is read.
const CRATES: [&str; 4] = ["shared", "worker", "scheduler", "producer"];

/// Where a module names another: `file:line`.
type Edges = BTreeMap<String, BTreeMap<String, String>>;

/// The module path of a file under `src/` (`a/b.rs` and `a/b/mod.rs` are `[a, b]`; `lib.rs`
/// and `main.rs` the root).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return Vec::new();
    }
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

/// A line without its comment and with its string literals emptied.
fn code_of(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_string = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (in_string, c) {
            (false, '/') if chars.peek() == Some(&'/') => break,
            (false, '"') | (true, '"') => {
                in_string = !in_string;
                out.push('"');
            }
            (true, '\\') => {
                chars.next();
            }
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first names of a use group's members: `a, b::c, d::{e, f}` gives a, b, d.
fn group_heads(s: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                heads.push(ident(s[start..i].trim()));
                return heads;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                heads.push(ident(s[start..i].trim()));
                start = i + 1;
            }
            _ => {}
        }
    }
    heads.push(ident(s[start..].trim()));
    heads
}

/// The top modules a line of module `from` names through the crate's root.
fn named_tops(code: &str, from: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    loop {
        let at = match (rest.find("crate::"), rest.find("super::")) {
            (Some(c), Some(s)) => c.min(s),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => return out,
        };
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        let mut tail = &rest[at..];
        let reaches_root = match tail.strip_prefix("crate::") {
            Some(t) => {
                tail = t;
                true
            }
            None => {
                let mut ups = 0;
                while let Some(t) = tail.strip_prefix("super::") {
                    tail = t;
                    ups += 1;
                }
                ups >= from.len()
            }
        };
        if reaches_root && !preceded {
            match tail.strip_prefix('{') {
                Some(group) => out.extend(group_heads(group).into_iter().map(str::to_owned)),
                None => out.push(ident(tail).to_owned()),
            }
        }
        rest = &rest[at + 1..];
    }
}

/// Every edge between the top modules of the crate whose sources are under `src`.
fn edges(src: &Path) -> std::io::Result<Edges> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_path(f.strip_prefix(src).ok()?).first().cloned())
        .collect();
    let mut edges = Edges::new();
    for file in files {
        let Ok(rel) = file.strip_prefix(src).map(Path::to_path_buf) else {
            continue;
        };
        let from = module_path(&rel);
        let Some(top) = from.first() else { continue };
        let text = std::fs::read_to_string(&file)?;
        let mut lines = text.lines().enumerate().peekable();
        while let Some((n, line)) = lines.next() {
            if line.starts_with("#[cfg(test)]")
                && lines
                    .peek()
                    .is_some_and(|(_, next)| next.starts_with("mod ") && next.ends_with('{'))
            {
                break;
            }
            for to in named_tops(&code_of(line), &from) {
                if &to != top && tops.contains(&to) {
                    edges
                        .entry(top.clone())
                        .or_default()
                        .entry(to)
                        .or_insert_with(|| format!("{}:{}", rel.display(), n + 1));
                }
            }
        }
    }
    Ok(edges)
}

/// The cycles among `edges`, each as the modules on one loop, the first named again last.
fn cycles(edges: &Edges) -> Vec<Vec<String>> {
    fn walk(
        at: &str,
        edges: &Edges,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(i) = path.iter().position(|p| p == at) {
            let mut cycle = path[i..].to_vec();
            cycle.push(at.to_owned());
            found.push(cycle);
            return;
        }
        if done.contains(at) {
            return;
        }
        path.push(at.to_owned());
        for next in edges.get(at).into_iter().flat_map(BTreeMap::keys) {
            walk(next, edges, path, done, found);
        }
        path.pop();
        done.insert(at.to_owned());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for start in edges.keys() {
        walk(start, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

/// Each cycle as a sentence naming where each module names the next.
fn described(krate: &str, edges: &Edges) -> Vec<String> {
    cycles(edges)
        .iter()
        .map(|cycle| {
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    format!(
                        "{} names {} at {krate}/src/{}",
                        w[0], w[1], edges[&w[0]][&w[1]]
                    )
                })
                .collect();
            format!(
                "{krate} has an import cycle ({}): {}. Move what both need into the module \
                 that comes first in {krate}/src/lib.rs's order.",
                cycle.join(" -> "),
                steps.join("; ")
            )
        })
        .collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn imports_between_a_crate_s_top_modules_run_one_way() -> std::io::Result<()> {
    let mut found = Vec::new();
    for krate in CRATES {
        found.extend(described(krate, &edges(&root().join(krate).join("src"))?));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
    Ok(())
}

#[test]
fn the_check_finds_a_cycle_through_crate_super_and_groups_but_not_comments_strings_or_tests()
-> std::io::Result<()> {
    let dir = std::env::temp_dir().join(format!("llmq-layout-{}", std::process::id()));
    let src = dir.as_path();
    std::fs::create_dir_all(src.join("b")).expect("src/b");
    let write = |name: &str, text: &str| std::fs::write(src.join(name), text).expect("a source");
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n");
    write(
        "a.rs",
        "use crate::{b::x, d};\n// crate::c\nconst S: &str = \"crate::c\";\n",
    );
    write("b/mod.rs", "mod inner;\n");
    write("b/inner.rs", "use super::super::c::y;\n");
    write(
        "c.rs",
        "fn f() { super::a::g() }\n#[cfg(test)]\nmod tests {\n    use crate::d;\n}\n",
    );
    write("d.rs", "pub fn h() {}\n");
    let edges = edges(src)?;
    let named = |from: &str| -> Vec<&str> {
        edges
            .get(from)
            .map(|e| e.keys().map(String::as_str).collect())
            .unwrap_or_default()
    };
    assert_eq!(named("a"), ["b", "d"]);
    assert_eq!(named("b"), ["c"]);
    assert_eq!(named("c"), ["a"]);
    assert!(named("d").is_empty());
    let found = described("demo", &edges);
    std::fs::remove_dir_all(&dir).expect("the temporary sources removed");
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("demo has an import cycle (a -> b -> c -> a): a names b at demo/src/a.rs:1; b names c at demo/src/b/inner.rs:1; c names a at demo/src/c.rs:1."),
        "{}",
        found[0]
    );
    Ok(())
}
