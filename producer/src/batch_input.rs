//! A batch file read as a stream: a JSON array of tasks, or JSON Lines (one task a line),
//! from a file or standard input, told apart by the first character that is not white
//! space. The tasks are parsed on a thread of their own and handed over through a bounded
//! channel, so memory stays flat whatever the file's size.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde_json::Value;
use tokio::sync::mpsc;

/// Where a task sits in its file: what an error names, and what a task without a
/// `custom_id` is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The `n`th element (from 0) of a JSON array.
    Index(u64),
    /// Line `n` (from 1) of a JSON Lines file.
    Line(u64),
}

impl At {
    /// The position as a task's key within its batch: its index, or `line-<n>`.
    pub fn key(self) -> String {
        match self {
            At::Index(i) => i.to_string(),
            At::Line(n) => format!("line-{n}"),
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Index(i) => write!(f, "task [{i}]"),
            At::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// What a batch is read from.
#[derive(Debug, Clone)]
pub enum Input {
    File(PathBuf),
    Stdin,
}

impl Input {
    pub fn of(path: &Path) -> Self {
        if path.as_os_str() == "-" {
            Input::Stdin
        } else {
            Input::File(path.to_owned())
        }
    }

    /// How errors name it.
    pub fn name(&self) -> String {
        match self {
            Input::File(p) => p.display().to_string(),
            Input::Stdin => "standard input".into(),
        }
    }
}

/// The tasks in flight between the reading thread and the enqueue: a few chunks' worth.
const IN_FLIGHT: usize = 4096;

/// The first byte of a JSON object.
const OPEN_BRACE: u8 = b'{';

/// Starts reading `input` on a thread of its own: each record made a `T` by `convert`, with
/// where it is, or the sentence of what is wrong with the file or the record (after which
/// nothing more comes). Parsing runs there, beside the enqueue.
pub fn read<T, F>(input: Input, convert: F) -> mpsc::Receiver<Result<(At, T), String>>
where
    T: Send + 'static,
    F: FnMut(Value) -> Result<T, String> + Send + 'static,
{
    let name = input.name();
    let open = move || -> Result<Box<dyn Read>, String> {
        match &input {
            Input::Stdin => Ok(Box::new(std::io::stdin())),
            Input::File(p) => std::fs::File::open(p)
                .map(|f| Box::new(f) as Box<dyn Read>)
                .map_err(|e| format!("cannot read {}: {e}", input.name())),
        }
    };
    spawn(name, open, convert)
}

/// [`read`] from `reader`, which errors call `name`.
pub fn read_from<T, F>(
    name: String,
    reader: impl Read + Send + 'static,
    convert: F,
) -> mpsc::Receiver<Result<(At, T), String>>
where
    T: Send + 'static,
    F: FnMut(Value) -> Result<T, String> + Send + 'static,
{
    spawn(name, move || Ok(Box::new(reader) as Box<dyn Read>), convert)
}

fn spawn<T, F>(
    name: String,
    open: impl FnOnce() -> Result<Box<dyn Read>, String> + Send + 'static,
    mut convert: F,
) -> mpsc::Receiver<Result<(At, T), String>>
where
    T: Send + 'static,
    F: FnMut(Value) -> Result<T, String> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    std::thread::spawn(move || {
        let reader = match open() {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        let mut reader = BufReader::with_capacity(1 << 16, reader);
        // A record that is JSON but not a task stops the batch at it, named.
        let stop = std::cell::Cell::new(false);
        let convert = std::cell::RefCell::new(&mut convert);
        let sent = |item: Result<(At, Value), String>| {
            let item = item.and_then(|(at, value)| {
                (convert.borrow_mut())(value)
                    .map(|t| (at, t))
                    .map_err(|e| format!("{name} {at}: {e}"))
            });
            let bad = item.is_err();
            let ok = tx.blocking_send(item).is_ok() && !bad;
            stop.set(!ok);
            ok
        };
        if let Err(e) = read_into(&mut reader, &name, &sent)
            && !stop.get()
        {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

fn read_into(
    reader: &mut impl BufRead,
    name: &str,
    sent: &dyn Fn(Result<(At, Value), String>) -> bool,
) -> Result<(), String> {
    // Blank lines before the first task still count in its line number.
    let mut skipped_lines = 0u64;
    let first = loop {
        let buf = reader
            .fill_buf()
            .map_err(|e| format!("cannot read {name}: {e}"))?;
        let Some(&b) = buf.first() else {
            return Ok(());
        };
        if b.is_ascii_whitespace() {
            skipped_lines += u64::from(b == b'\n');
            reader.consume(1);
        } else {
            break b;
        }
    };
    if first == b'[' {
        let mut de = serde_json::Deserializer::from_reader(reader);
        de::Deserializer::deserialize_seq(&mut de, Elements { sent })
            .map_err(|e| format!("{name} is not a JSON array of tasks: {e}"))?;
        return de
            .end()
            .map_err(|e| format!("{name} has more after its array of tasks: {e}"));
    }
    if first == OPEN_BRACE && starts_requests_body(reader.fill_buf().unwrap_or_default()) {
        // Anthropic's body (on one line or several), streamed a request at a time: a
        // 256 MB body is never held whole, as it would be read as a line.
        return read_body(reader, name, sent);
    }
    read_lines(reader, (name, skipped_lines, first), sent)
}

/// JSON Lines, one task a line (`skipped` blank lines before the first).
fn read_lines(
    reader: &mut impl BufRead,
    (name, skipped_lines, first): (&str, u64, u8),
    sent: &dyn Fn(Result<(At, Value), String>) -> bool,
) -> Result<(), String> {
    let mut line = String::new();
    let mut n = skipped_lines;
    loop {
        line.clear();
        n += 1;
        let read = (&mut *reader)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .map_err(|e| format!("cannot read line {n} of {name}: {e}"))?;
        if read == 0 {
            return Ok(());
        }
        if read > MAX_LINE {
            return Err(format!(
                "line {n} of {name} is over {} MiB; a task is {} MiB at most",
                MAX_LINE >> 20,
                llmq_shared::envelope::DEFAULT_MAX_PAYLOAD_BYTES >> 20
            ));
        }
        if line.trim().is_empty() {
            continue;
        }
        let value = match serde_json::from_str::<Value>(&line) {
            Ok(value) => value,
            // An object over several lines first: an Anthropic Message Batches body.
            Err(e) if e.is_eof() && n == skipped_lines + 1 && first == OPEN_BRACE => {
                let text = std::mem::take(&mut line);
                let whole = std::io::Cursor::new(text.into_bytes()).chain(reader);
                return read_body(whole, name, sent);
            }
            Err(e) => {
                return Err(format!(
                    "line {n} of {name} is not a JSON task (JSON Lines: one task a line): {e}"
                ));
            }
        };
        if !sent(Ok((At::Line(n), value))) {
            return Ok(());
        }
    }
}

/// Anthropic's `{"requests": [...]}` body, each request handed on as it is parsed.
fn read_body(
    reader: impl std::io::Read,
    name: &str,
    sent: &dyn Fn(Result<(At, Value), String>) -> bool,
) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    de::Deserializer::deserialize_map(&mut de, RequestsBody { sent })
        .map_err(|e| format!("{name} is not a {REQUESTS_BODY}: {e}"))?;
    de.end()
        .map_err(|e| format!("{name} has more after its {REQUESTS_BODY}: {e}"))
}

/// The longest line read: a line over it cannot be a task (whose envelope is 1 MiB at most),
/// and is not held whole to find that out.
const MAX_LINE: usize = 8 << 20;

/// Whether `head` (the start of a file, after white space) opens `{"requests":`, Anthropic's
/// body: no task of a JSON Lines file has that field.
fn starts_requests_body(head: &[u8]) -> bool {
    let rest = head.strip_prefix(b"{").unwrap_or_default();
    let at = rest
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(rest.len());
    rest[at..].starts_with(b"\"requests\"")
}

/// How errors name Anthropic's `{"requests": [...]}` body.
const REQUESTS_BODY: &str = "Message Batches body ({\"requests\": [...]})";

/// Streams the `requests` of an Anthropic Message Batches body, each as it is parsed.
struct RequestsBody<'a> {
    sent: &'a dyn Fn(Result<(At, Value), String>) -> bool,
}

impl<'de> Visitor<'de> for RequestsBody<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object holding `requests`")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut read = false;
        while let Some(key) = map.next_key::<String>()? {
            if key != "requests" || read {
                return Err(de::Error::custom(format!(
                    "it holds `{}` besides one `requests`",
                    llmq_shared::text::excerpt(&key, 40)
                )));
            }
            map.next_value_seed(ElementsSeed { sent: self.sent })?;
            read = true;
        }
        if read {
            Ok(())
        } else {
            Err(de::Error::custom("it has no `requests`"))
        }
    }
}

struct ElementsSeed<'a> {
    sent: &'a dyn Fn(Result<(At, Value), String>) -> bool,
}

impl<'de> DeserializeSeed<'de> for ElementsSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(Elements { sent: self.sent })
    }
}

/// Hands each element of the array on as it is parsed.
struct Elements<'a> {
    sent: &'a dyn Fn(Result<(At, Value), String>) -> bool,
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of tasks")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0u64;
        while let Some(value) = seq.next_element_seed(OneValue)? {
            if !(self.sent)(Ok((At::Index(i), value))) {
                // The reader stopped listening: drain nothing more.
                return Err(de::Error::custom("the batch was stopped"));
            }
            i += 1;
        }
        Ok(())
    }
}

struct OneValue;

impl<'de> DeserializeSeed<'de> for OneValue {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        serde::Deserialize::deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Vec<Result<(At, Value), String>> {
        let out = std::cell::RefCell::new(Vec::new());
        let sent = |item| {
            out.borrow_mut().push(item);
            true
        };
        if let Err(e) = read_into(&mut text.as_bytes(), "f", &sent) {
            out.borrow_mut().push(Err(e));
        }
        out.into_inner()
    }

    #[test]
    fn an_array_and_json_lines_give_the_same_tasks_each_where_it_is() {
        let array = all(" [{\"prompt\":\"a\"}, {\"prompt\":\"b\"}]\n");
        assert_eq!(array.len(), 2);
        assert_eq!(array[1].as_ref().unwrap().0, At::Index(1));
        let lines = all("{\"prompt\":\"a\"}\n\n{\"prompt\":\"b\"}\n");
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1].as_ref().unwrap().0,
            At::Line(3),
            "a blank line counts"
        );
        let late = all("\n \n{\"prompt\":\"a\"}\n");
        assert_eq!(
            late[0].as_ref().unwrap().0,
            At::Line(3),
            "so do blank lines first"
        );
        assert_eq!(array[1].as_ref().unwrap().1, lines[1].as_ref().unwrap().1);
        assert_eq!(At::Line(3).key(), "line-3");
        assert_eq!(At::Index(1).to_string(), "task [1]");
        assert!(all("").is_empty());
    }

    #[test]
    fn anthropic_s_requests_body_is_read_request_by_request() {
        let one_line =
            r#"{"requests": [{"custom_id": "a", "params": {}}, {"custom_id": "b", "params": {}}]}"#;
        let pretty = "{\n  \"requests\": [\n    {\"custom_id\": \"a\", \"params\": {}},\n    {\"custom_id\": \"b\", \"params\": {}}\n  ]\n}\n";
        for text in [one_line, pretty] {
            let got = all(text);
            assert_eq!(got.len(), 2, "{text}: {got:?}");
            let (at, value) = got[1].as_ref().unwrap();
            assert_eq!(*at, At::Index(1));
            assert_eq!(value["custom_id"], "b");
        }
        let e = all("{\n\"requests\": [],\n\"model\": 1}")
            .pop()
            .unwrap()
            .unwrap_err();
        assert!(e.contains("holds `model` besides one `requests`"), "{e}");
        let e = all(&format!("{one_line}\n{{\"prompt\": \"x\"}}\n"))
            .pop()
            .unwrap()
            .unwrap_err();
        assert!(
            e.contains("f has more after its Message Batches body"),
            "{e}"
        );
    }

    #[test]
    fn a_line_too_long_to_be_a_task_is_refused_unread() {
        let text = format!("{{\"prompt\": \"{}\"}}\n", "a".repeat(MAX_LINE));
        let e = all(&text).pop().unwrap().unwrap_err();
        assert!(e.starts_with("line 1 of f is over 8 MiB"), "{e}");
    }

    #[test]
    fn a_bad_line_or_array_is_named() {
        let lines = all("{\"prompt\":\"a\"}\n{\"prompt\":\n");
        let e = lines.last().unwrap().as_ref().unwrap_err();
        assert!(e.starts_with("line 2 of f is not a JSON task"), "{e}");
        let array = all("[{\"prompt\":\"a\"}, oops]");
        assert_eq!(array.len(), 2);
        let e = array[1].as_ref().unwrap_err();
        assert!(e.starts_with("f is not a JSON array of tasks"), "{e}");
        let e = all("[{}] {}").pop().unwrap().unwrap_err();
        assert!(e.contains("more after its array"), "{e}");
    }
}
