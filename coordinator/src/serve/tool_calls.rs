//! Hermes-style tool calls in the model's output: `<tool_call>{"name": ..., "arguments": {...}}
//! </tool_call>` (Mellum2, Qwen), parsed as the text streams in.
//!
//! Text that may be the start of `<tool_call>` is held back; a call's body is buffered until
//! `</tool_call>`. A body that is not a JSON object with a string `name` stays content, tags
//! included. A call left open at the end of the output is parsed if its body is complete JSON.

use serde_json::Value;

use super::stop::partial_match_len;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

impl ToolCall {
    /// Parses a call body; `None` when it is not a call.
    fn parse(body: &str) -> Option<ToolCall> {
        let Value::Object(mut obj) = serde_json::from_str::<Value>(body.trim()).ok()? else {
            return None;
        };
        let name = obj.remove("name")?.as_str()?.to_owned();
        let arguments = match obj.remove("arguments").or_else(|| obj.remove("parameters")) {
            None | Some(Value::Null) => "{}".to_owned(),
            Some(Value::String(s)) => s,
            Some(v) => v.to_string(),
        };
        Some(ToolCall { name, arguments })
    }

    /// The arguments as a JSON value (Ollama's shape): the parsed text, or the text itself as a
    /// string when it is not JSON.
    pub fn arguments_value(&self) -> Value {
        serde_json::from_str(&self.arguments).unwrap_or_else(|_| Value::String(self.arguments.clone()))
    }
}

/// What the parser releases.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Plain text.
    Content(String),
    /// A complete tool call.
    Call(ToolCall),
}

/// Incremental tool-call parser.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    buf: String,
    in_call: bool,
}

impl ToolCallParser {
    /// A parser at the start of the output.
    pub fn new() -> ToolCallParser {
        ToolCallParser::default()
    }

    /// Feeds text; returns the items it completes.
    pub fn push(&mut self, text: &str) -> Vec<Item> {
        self.buf.push_str(text);
        let mut items = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else { return items };
                let body: String = self.buf.drain(..end + CLOSE.len()).collect();
                let body = &body[..end];
                items.push(match ToolCall::parse(body) {
                    Some(call) => Item::Call(call),
                    None => Item::Content(format!("{OPEN}{body}{CLOSE}")),
                });
                self.in_call = false;
            } else if let Some(start) = self.buf.find(OPEN) {
                push_content(&mut items, &self.buf[..start]);
                self.buf.drain(..start + OPEN.len());
                self.in_call = true;
            } else {
                let release = self.buf.len() - partial_match_len(&self.buf, OPEN);
                push_content(&mut items, &self.buf[..release]);
                self.buf.drain(..release);
                return items;
            }
        }
    }

    /// Ends the output: releases held text and an unterminated call.
    pub fn finish(&mut self) -> Vec<Item> {
        let rest = std::mem::take(&mut self.buf);
        let mut items = Vec::new();
        if std::mem::take(&mut self.in_call) {
            items.push(match ToolCall::parse(&rest) {
                Some(call) => Item::Call(call),
                None => Item::Content(format!("{OPEN}{rest}")),
            });
        } else {
            push_content(&mut items, &rest);
        }
        items
    }
}

fn push_content(items: &mut Vec<Item>, text: &str) {
    if !text.is_empty() {
        items.push(Item::Content(text.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the parser over `pieces` and merges adjacent content items.
    fn run(pieces: &[&str]) -> Vec<Item> {
        let mut p = ToolCallParser::new();
        let mut items: Vec<Item> = Vec::new();
        let mut all: Vec<Item> = pieces.iter().flat_map(|t| p.push(t)).collect();
        all.extend(p.finish());
        for item in all {
            match (items.last_mut(), item) {
                (Some(Item::Content(a)), Item::Content(b)) => a.push_str(&b),
                (_, item) => items.push(item),
            }
        }
        items
    }

    fn call(name: &str, arguments: &str) -> Item {
        Item::Call(ToolCall { name: name.into(), arguments: arguments.into() })
    }

    fn content(s: &str) -> Item {
        Item::Content(s.into())
    }

    const CANNED: &[(&str, &[&str])] = &[
        ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", &["call"]),
        (
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"x\": [1, 2]}}\n</tool_call>",
            &["call", "content", "call"],
        ),
        (
            "Let me check.\n<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"q\\\": 1}\"}</tool_call> done",
            &["content", "call", "content"],
        ),
        ("<tool_call>{\"name\": broken json}</tool_call>", &["content"]),
        ("a < b and <tool_ but not a call", &["content"]),
        ("<tool_call>{\"name\": \"late\", \"arguments\": {\"k\": \"日本\"}}", &["call"]),
        ("<tool_call>{\"name\": \"cut\", \"argu", &["content"]),
    ];

    #[test]
    fn canned_outputs() {
        assert_eq!(run(&[CANNED[0].0]), [call("get_weather", r#"{"city":"Paris"}"#)]);
        assert_eq!(run(&[CANNED[1].0]), [call("a", "{}"), content("\n"), call("b", r#"{"x":[1,2]}"#)]);
        assert_eq!(run(&[CANNED[2].0]), [content("Let me check.\n"), call("f", r#"{"q": 1}"#), content(" done")]);
        assert_eq!(run(&[CANNED[3].0]), [content(CANNED[3].0)]);
        assert_eq!(run(&[CANNED[4].0]), [content(CANNED[4].0)]);
        assert_eq!(run(&[CANNED[5].0]), [call("late", r#"{"k":"日本"}"#)]);
        assert_eq!(run(&[CANNED[6].0]), [content(CANNED[6].0)]);
    }

    #[test]
    fn shapes_of_canned_outputs() {
        for (text, shape) in CANNED {
            let kinds: Vec<&str> =
                run(&[text]).iter().map(|i| if matches!(i, Item::Call(_)) { "call" } else { "content" }).collect();
            assert_eq!(&kinds, shape, "{text:?}");
        }
    }

    /// Fed split at every byte boundary (two and three pieces) and char by char, the parser
    /// yields the same items as fed whole.
    #[test]
    fn every_chunk_boundary_gives_the_same_result() {
        for (text, _) in CANNED {
            let expected = run(&[text]);
            let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
            for &i in &bounds {
                assert_eq!(run(&[&text[..i], &text[i..]]), expected, "{text:?} split at {i}");
                for &j in bounds.iter().filter(|&&j| j >= i).step_by(7) {
                    assert_eq!(run(&[&text[..i], &text[i..j], &text[j..]]), expected, "{text:?} split at {i}, {j}");
                }
            }
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(run(&refs), expected, "{text:?} char by char");
        }
    }

    #[test]
    fn arguments_value() {
        assert_eq!(
            ToolCall { name: "f".into(), arguments: r#"{"a":1}"#.into() }.arguments_value(),
            serde_json::json!({"a": 1})
        );
        assert_eq!(ToolCall { name: "f".into(), arguments: "not json".into() }.arguments_value(), "not json");
    }
}
