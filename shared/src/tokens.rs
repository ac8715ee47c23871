//! A prompt's tokens before the call, for quota reservations, context-window checks and a
//! command's usage: the model's own tokenizer where llmq has it, else one estimate.

/// A prompt's tokens, counted once per tokenizer however many candidate models ask: with the
/// model's own tokenizer where llmq knows it (OpenAI's families, through tiktoken-rs, whose
/// encodings ship inside the crate), else [`estimate_tokens`]. Used for quota reservations
/// and context-window checks, which are reconciled with the provider's count after the call.
pub struct PromptTokens<'a> {
    system: Option<&'a str>,
    prompt: &'a str,
    o200k: std::cell::OnceCell<u64>,
    cl100k: std::cell::OnceCell<u64>,
}

impl<'a> PromptTokens<'a> {
    #[must_use]
    pub fn new(system: Option<&'a str>, prompt: &'a str) -> Self {
        Self {
            system,
            prompt,
            o200k: std::cell::OnceCell::new(),
            cl100k: std::cell::OnceCell::new(),
        }
    }

    /// The prompt's tokens for `model`.
    #[must_use]
    pub fn for_model(&self, model: &str) -> u64 {
        use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
        let (cell, bpe) = match get_tokenizer(model) {
            Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony) => {
                (&self.o200k, tiktoken_rs::o200k_base_singleton())
            }
            Some(Tokenizer::Cl100kBase) => (&self.cl100k, tiktoken_rs::cl100k_base_singleton()),
            _ => return estimate_tokens(self.system, self.prompt),
        };
        *cell.get_or_init(|| {
            // Ordinary encoding: text from a task is never read as special tokens.
            let count = |t: &str| bpe.encode_ordinary(t).len() as u64 + 4;
            self.system.map_or(0, count) + count(self.prompt)
        })
    }
}

/// A prompt's token count, estimated without a tokenizer: [`estimate_text`] of its messages,
/// with four characters more for each message's framing.
#[must_use]
pub fn estimate_tokens(system: Option<&str>, prompt: &str) -> u64 {
    estimate_chars(system.map_or(0, |s| s.chars().count() + 4) + prompt.chars().count() + 4)
}

/// A text's token count, estimated without a tokenizer: one token per three characters (real
/// English averages about four, so this errs high). Reservations are reconciled with the
/// provider's count after the call; a command's call has no count, and reports this.
#[must_use]
pub fn estimate_text(text: &str) -> u64 {
    estimate_chars(text.chars().count())
}

fn estimate_chars(chars: usize) -> u64 {
    u64::try_from(chars.div_ceil(3)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_models_are_counted_with_their_tokenizer() {
        let t = PromptTokens::new(None, "hello world");
        assert_eq!(t.for_model("gpt-4o"), 2 + 4, "o200k: `hello`, ` world`");
        assert_eq!(t.for_model("gpt-4"), 2 + 4, "cl100k");
        assert_eq!(
            t.for_model("claude-3-5-haiku-latest"),
            estimate_tokens(None, "hello world"),
            "no known tokenizer: the estimate"
        );
        // Not English: the estimate (a token per three characters) undercounts what the model
        // bills; the tokenizer does not.
        let japanese = "東京は日本の首都であり、世界有数の大都市です。".repeat(20);
        let t = PromptTokens::new(None, &japanese);
        let (counted, estimated) = (t.for_model("gpt-4o"), estimate_tokens(None, &japanese));
        assert!(
            counted > estimated,
            "counted {counted}, estimated {estimated}"
        );
    }

    #[test]
    fn estimates_err_high() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        // About 200 real tokens.
        assert!(estimate_tokens(None, &text) >= 250);
    }
}
