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
/// and tab (escape sequences, carriage returns, bells, the C1 controls) are written as
/// `\u{…}`; borrowed when there is none.
#[must_use]
pub fn printable(text: &str) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.contains(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if bad(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
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
            printable("red \x1b[31mtext\x07\r\nnext\tcol \u{9b}"),
            "red \\u{1b}[31mtext\\u{7}\\u{d}\nnext\tcol \\u{9b}"
        );
        assert!(matches!(printable("line\n\ttab"), Cow::Borrowed(_)));
    }
}
