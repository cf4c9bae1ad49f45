//! Splitting a `<think>...</think>` block off the start of the model's output, as it streams.
//!
//! The block is recognised at the start of the output (after whitespace), or the output starts
//! inside it when the prompt already opened it (templates with `enable_thinking` end the prompt
//! with `<think>\n`). Its text becomes `reasoning_content`; whitespace right after `<think>` and
//! after `</think>` is dropped. A block never closed is reasoning to the end.

use super::stop::partial_match_len;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Reasoning and content text released by one step of the parser.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Split {
    /// Text of the think block.
    pub reasoning: String,
    /// Text after it (or all text when there is no block).
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Nothing but whitespace seen yet: a `<think>` may still open.
    Start,
    /// Inside the block; `started` once non-whitespace reasoning was released.
    Think { started: bool },
    /// Right after `</think>`: dropping whitespace.
    AfterThink,
    /// Plain content to the end.
    Content,
}

/// Incremental `<think>` block parser.
#[derive(Debug)]
pub struct ReasoningParser {
    state: State,
    buf: String,
}

impl ReasoningParser {
    /// A parser for output that starts inside a think block (`in_think`) or before one.
    pub fn new(in_think: bool) -> ReasoningParser {
        let state = if in_think { State::Think { started: false } } else { State::Start };
        ReasoningParser { state, buf: String::new() }
    }

    /// Whether `prompt` leaves the generation inside an opened think block.
    pub fn prompt_opens_think(prompt: &str) -> bool {
        prompt.trim_end().ends_with(OPEN)
    }

    /// Feeds text; returns what can be released.
    pub fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        self.buf.push_str(text);
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.buf.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.buf = rest.to_owned();
                        self.state = State::Think { started: false };
                    } else if OPEN.starts_with(trimmed) {
                        return out;
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Think { started } => {
                    if !started {
                        self.buf = self.buf.trim_start().to_owned();
                    }
                    if let Some(pos) = self.buf.find(CLOSE) {
                        out.reasoning.push_str(&self.buf[..pos]);
                        self.buf.drain(..pos + CLOSE.len());
                        self.state = State::AfterThink;
                    } else {
                        let keep = partial_match_len(&self.buf, CLOSE);
                        let release = self.buf.len() - keep;
                        out.reasoning.push_str(&self.buf[..release]);
                        self.buf.drain(..release);
                        self.state = State::Think { started: started || release > 0 };
                        return out;
                    }
                }
                State::AfterThink => {
                    self.buf = self.buf.trim_start().to_owned();
                    if self.buf.is_empty() {
                        return out;
                    }
                    self.state = State::Content;
                }
                State::Content => {
                    out.content.push_str(&self.buf);
                    self.buf.clear();
                    return out;
                }
            }
        }
    }

    /// Ends the output: releases what was held back.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Start | State::Content => Split { content: rest, ..Split::default() },
            State::Think { .. } => Split { reasoning: rest, ..Split::default() },
            State::AfterThink => Split::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(in_think: bool, pieces: &[&str]) -> Split {
        let mut p = ReasoningParser::new(in_think);
        let mut all = Split::default();
        let mut splits: Vec<Split> = pieces.iter().map(|t| p.push(t)).collect();
        splits.push(p.finish());
        for s in splits {
            all.reasoning.push_str(&s.reasoning);
            all.content.push_str(&s.content);
        }
        all
    }

    fn split(reasoning: &str, content: &str) -> Split {
        Split { reasoning: reasoning.into(), content: content.into() }
    }

    #[test]
    fn canned_outputs() {
        assert_eq!(
            run(false, &["<think>\nLet me add.\n</think>\n\nThe sum is 3."]),
            split("Let me add.\n", "The sum is 3.")
        );
        assert_eq!(run(false, &["No thinking here."]), split("", "No thinking here."));
        assert_eq!(run(false, &["  <thin"]), split("", "  <thin"));
        assert_eq!(run(false, &["x <think>y</think>"]), split("", "x <think>y</think>"));
        assert_eq!(run(true, &["I should answer.\n</think>\n\nAnswer"]), split("I should answer.\n", "Answer"));
        assert_eq!(run(true, &["cut off mid-thought </thi"]), split("cut off mid-thought </thi", ""));
        assert_eq!(run(false, &["<think>\n\n</think>\n\n"]), split("", ""));
    }

    #[test]
    fn prompt_detection() {
        assert!(ReasoningParser::prompt_opens_think("<|im_start|>assistant\n<think>\n"));
        assert!(!ReasoningParser::prompt_opens_think("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!ReasoningParser::prompt_opens_think("<|im_start|>assistant\n"));
    }

    /// Fed split at every byte boundary (two pieces) and char by char, the result is the same.
    #[test]
    fn every_chunk_boundary_gives_the_same_result() {
        for (in_think, text) in [
            (false, "<think>\nplan: 日本 </ok></think>\n\n答え: 42 </think>"),
            (true, "\n  reasoning…</think> content"),
            (false, " \n<think>a</think>b"),
            (false, "plain <think> text"),
        ] {
            let expected = run(in_think, &[text]);
            for i in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                assert_eq!(run(in_think, &[&text[..i], &text[i..]]), expected, "{text:?} split at {i}");
            }
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(run(in_think, &refs), expected, "{text:?} char by char");
        }
    }
}
