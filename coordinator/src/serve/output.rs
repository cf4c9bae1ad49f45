//! The chat endpoints' view of the generated text: reasoning, content and tool calls.

use super::reasoning::ReasoningParser;
use super::tool_calls::{Item, ToolCall, ToolCallParser};

/// A piece of the assistant's message.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    /// Text of the think block.
    Reasoning(String),
    /// Answer text.
    Content(String),
    /// A tool call.
    Call(ToolCall),
}

/// Splits generated text into [`Delta`]s as it streams in. With tool parsing on, content made
/// only of whitespace is held until more content follows, and dropped at the end when the
/// message made tool calls (the newlines between and around `<tool_call>` blocks).
#[derive(Debug)]
pub struct ChatOutput {
    reasoning: ReasoningParser,
    tools: Option<ToolCallParser>,
    pending_ws: String,
    n_calls: usize,
}

impl ChatOutput {
    /// A parser for output that starts inside a think block (`in_think`) or not, parsing tool
    /// calls when `parse_tools`.
    pub fn new(in_think: bool, parse_tools: bool) -> ChatOutput {
        ChatOutput {
            reasoning: ReasoningParser::new(in_think),
            tools: parse_tools.then(ToolCallParser::new),
            pending_ws: String::new(),
            n_calls: 0,
        }
    }

    /// Feeds generated text; returns the deltas it completes.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let split = self.reasoning.push(text);
        self.deltas(split.reasoning, &split.content, false)
    }

    /// Ends the output: returns the deltas held back.
    pub fn finish(&mut self) -> Vec<Delta> {
        let split = self.reasoning.finish();
        let mut out = self.deltas(split.reasoning, &split.content, true);
        if self.n_calls == 0 && !self.pending_ws.is_empty() {
            out.push(Delta::Content(std::mem::take(&mut self.pending_ws)));
        }
        out
    }

    fn deltas(&mut self, reasoning: String, content: &str, last: bool) -> Vec<Delta> {
        let mut out = Vec::new();
        if !reasoning.is_empty() {
            out.push(Delta::Reasoning(reasoning));
        }
        let Some(parser) = &mut self.tools else {
            if !content.is_empty() {
                out.push(Delta::Content(content.to_owned()));
            }
            return out;
        };
        let mut items = parser.push(content);
        if last {
            items.extend(parser.finish());
        }
        for item in items {
            match item {
                Item::Call(call) => {
                    self.n_calls += 1;
                    self.pending_ws.clear();
                    out.push(Delta::Call(call));
                }
                Item::Content(text) if text.trim().is_empty() => self.pending_ws.push_str(&text),
                Item::Content(text) => {
                    let mut text = text;
                    text.insert_str(0, &std::mem::take(&mut self.pending_ws));
                    out.push(Delta::Content(text));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(in_think: bool, tools: bool, pieces: &[&str]) -> Vec<Delta> {
        let mut o = ChatOutput::new(in_think, tools);
        let mut out: Vec<Delta> = pieces.iter().flat_map(|p| o.push(p)).collect();
        out.extend(o.finish());
        out
    }

    #[test]
    fn reasoning_then_calls_without_whitespace_content() {
        let text =
            "<think>\nweather needed\n</think>\n\n<tool_call>\n{\"name\": \"w\", \"arguments\": {}}\n</tool_call>\n";
        let out = run(false, true, &[text]);
        assert_eq!(
            out,
            [
                Delta::Reasoning("weather needed\n".into()),
                Delta::Call(ToolCall { name: "w".into(), arguments: "{}".into() })
            ]
        );
    }

    #[test]
    fn tags_are_plain_text_without_tools() {
        let text = "<tool_call>{\"name\": \"w\"}</tool_call>";
        assert_eq!(run(false, false, &[text]), [Delta::Content(text.into())]);
    }

    #[test]
    fn whitespace_kept_without_calls() {
        assert_eq!(run(false, true, &["a", "\n", "\n", "b", " "]).len(), 3);
        let joined: String = run(false, true, &["a", "\n", "\n", "b", " "])
            .into_iter()
            .map(|d| if let Delta::Content(c) = d { c } else { String::new() })
            .collect();
        assert_eq!(joined, "a\n\nb ");
    }
}
