//! Untrusted text (from tasks, chain specs, models and CLIs) made safe for where it goes:
//! [`storable`] for Postgres, which refuses NUL in text, and [`printable`] for a terminal,
//! which would obey escape sequences.
//!
//! Rust strings are valid UTF-8 already (bytes from Redis or a CLI are read lossily), so NUL is
//! the one character Postgres cannot store.

use std::borrow::Cow;

/// What stands in for a character that cannot be stored.
pub const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// `text` with every NUL replaced by U+FFFD; borrowed when there is none.
#[must_use]
pub fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// [`storable`] for an owned string, without a copy when it has no NUL.
#[must_use]
pub fn into_storable(text: String) -> String {
    match storable(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(s) => s,
    }
}

/// `text` as a terminal shows it without obeying it: control characters other than newline
/// and tab (escape sequences, carriage returns, bells, DEL, the C1 controls) are written as
/// `\u001b`, which is also how JSON escapes them, so JSON output stays valid and means the
/// same; borrowed when there is none.
#[must_use]
pub fn printable(text: &str) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.contains(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if bad(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `url` fit to print: a password or token in its user part becomes `***`, and a query
/// (where `?key=` may sit) is left out; borrowed when there is neither.
#[must_use]
pub fn without_credentials(url: &str) -> Cow<'_, str> {
    let start = url.find("://").map_or(0, |i| i + 3);
    // The user part ends at the last `@` before the path: a password may hold `#` or `?`.
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let user = url[start..end].rfind('@').map(|i| start + i);
    let host = user.map_or(start, |at| at + 1);
    let query = url[host..].find(['?', '#']).map(|i| host + i);
    if user.is_none() && query.is_none() {
        return Cow::Borrowed(url);
    }
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..start]);
    if user.is_some() {
        out.push_str("***@");
    }
    out.push_str(&url[host..query.unwrap_or(url.len())]);
    if query.is_some() {
        out.push_str("?…");
    }
    Cow::Owned(out)
}

/// At most `max` characters of `body`, trimmed, on a character boundary, for error messages.
#[must_use]
pub fn excerpt(body: &str, max: usize) -> String {
    let body = body.trim();
    match body.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &body[..cut]),
        None => body.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_replaced_and_clean_text_is_borrowed() {
        assert_eq!(storable("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        assert!(matches!(storable("plain ünï"), Cow::Borrowed(_)));
        assert_eq!(into_storable("x\0".into()), "x\u{FFFD}");
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(
            printable("red \x1b[31mtext\x07\r\nnext\tcol \u{9b}\u{7f}"),
            "red \\u001b[31mtext\\u0007\\u000d\nnext\tcol \\u009b\\u007f"
        );
        // In JSON, the escape means the character it replaces.
        let json = "{\"a\":\"x\u{9b}y\"}";
        let v: serde_json::Value = serde_json::from_str(&printable(json)).unwrap();
        assert_eq!(v["a"], "x\u{9b}y");
        assert!(matches!(printable("line\n\ttab"), Cow::Borrowed(_)));
    }

    #[test]
    fn credentials_are_left_out_of_urls() {
        for (url, shown) in [
            ("https://api.example.com/v1", "https://api.example.com/v1"),
            (
                "https://user:pa55@proxy:8443/v1",
                "https://***@proxy:8443/v1",
            ),
            (
                "redis://:secret@127.0.0.1:6379/0",
                "redis://***@127.0.0.1:6379/0",
            ),
            ("https://host/v1beta?key=AIza", "https://host/v1beta?…"),
            ("http://a@b@host?x=1", "http://***@host?…"),
            ("host:1234", "host:1234"),
            ("redis://:p#ss@h:6379", "redis://***@h:6379"),
            ("redis://:pa?ss@h/0", "redis://***@h/0"),
            ("redis?x://h", "redis?x://h"),
        ] {
            assert_eq!(without_credentials(url), shown, "{url}");
        }
    }
}
