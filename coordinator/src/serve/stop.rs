//! Stop sequences matched on the generated text as it streams in.
//!
//! Text that could be the start of a stop sequence is held back until it either completes one
//! (then it is dropped and generation ends) or can no longer match (then it is released).

/// The length of the longest suffix of `text` that is a proper prefix of `pattern` (0 if none):
/// how much of `text` must be held back while `pattern` may still follow.
pub fn partial_match_len(text: &str, pattern: &str) -> usize {
    let longest = text.len().min(pattern.len().saturating_sub(1));
    (1..=longest).rev().find(|&k| pattern.is_char_boundary(k) && text.ends_with(&pattern[..k])).unwrap_or(0)
}

/// Matches a set of stop sequences on text fed in pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Feeds `text`. Returns the text that can be emitted now and whether a stop sequence
    /// matched; after a match, the text from the match on is dropped and the matcher is empty.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.held.push_str(text);
        if let Some(pos) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.held.truncate(pos);
            return (std::mem::take(&mut self.held), true);
        }
        let hold = self.stops.iter().map(|s| partial_match_len(&self.held, s)).max().unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - hold);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// Ends the text: releases whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces`; returns the emitted pieces and whether a stop matched.
    fn feed(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (text, hit) = m.push(p);
            out.push(text);
            if hit {
                return (out, true);
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn holds_back_a_possible_prefix_and_releases_it() {
        let (out, hit) = feed(&["END"], &["abc E", "N", "x"]);
        assert_eq!(out, ["abc ", "", "ENx", ""]);
        assert!(!hit);
    }

    #[test]
    fn matches_across_chunks_and_drops_the_rest() {
        let (out, hit) = feed(&["END"], &["abc E", "N", "D tail"]);
        assert_eq!(out, ["abc ", "", ""]);
        assert!(hit);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, hit) = feed(&["xyz", "b"], &["aab", "xyz"]);
        assert_eq!(out, ["aa"]);
        assert!(hit);
    }

    #[test]
    fn held_text_released_at_the_end() {
        let (out, hit) = feed(&["</end>"], &["done </e"]);
        assert_eq!(out.concat(), "done </e");
        assert!(!hit);
    }

    #[test]
    fn multibyte_stop_and_text() {
        let (out, hit) = feed(&["日本"], &["a日", "x日", "本b"]);
        assert_eq!(out.concat(), "a日x");
        assert!(hit);
    }

    /// Every split of the text into two pieces gives the same emitted text and match.
    #[test]
    fn every_chunk_boundary_gives_the_same_result() {
        let stops = ["\n\nUser:", "STOP", "日本"];
        for text in ["hello\n\nUser: more", "no stop here S ST STO", "abc STO STOP def", "x日本y", "\n\n\nUser"] {
            let whole = feed(&stops, &[text]);
            let expected = (whole.0.concat(), whole.1);
            for i in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let (out, hit) = feed(&stops, &[&text[..i], &text[i..]]);
                assert_eq!((out.concat(), hit), expected, "split of {text:?} at {i}");
            }
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
            let (out, hit) = feed(&stops, &refs);
            assert_eq!((out.concat(), hit), expected, "{text:?} char by char");
        }
    }

    #[test]
    fn partial_match_lengths() {
        assert_eq!(partial_match_len("abc<too", "<tool_call>"), 4);
        assert_eq!(partial_match_len("abc", "<tool_call>"), 0);
        assert_eq!(partial_match_len("<tool_call>", "<tool_call>"), 0);
        assert_eq!(partial_match_len("x日", "日本"), 3);
    }
}
