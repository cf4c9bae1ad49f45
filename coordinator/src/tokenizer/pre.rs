//! The pre-tokenizer named by `tokenizer.ggml.pre`: which regexes split text into words before
//! byte-level BPE runs on each word.
//!
//! Source of the rules: llama.cpp `src/llama-vocab.cpp` (the `tokenizer_pre` name switch in
//! `llama_vocab::impl::load` and the `regex_exprs` switch in `llm_tokenizer_bpe`). Each regex is
//! applied in turn to the pieces left by the previous one, keeping both the matches and the text
//! between them, which is what a `Split` pre-tokenizer with `Isolated` behaviour does.

/// GPT-2's word regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_GPT2`).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Qwen2's word regex: case-insensitive contractions, single digits
/// (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3.5's word regex: Qwen2's with combining marks kept inside words
/// (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN35`).
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's word regex: digits in groups of up to three (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The o200k (GPT-4o, GPT-OSS) word regex, as written in the models' `tokenizer.json`; llama.cpp
/// (`LLAMA_VOCAB_PRE_TYPE_GPT4O`) rewrites it with look-aheads for its own regex engine, while
/// Oniguruma runs the original.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one `tokenizer.ggml.pre` value tokenizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreTokenizerSpec {
    /// Regexes applied in order, each splitting the pieces the previous one left.
    pub(crate) regexes: &'static [&'static str],
    /// Whether a word found whole in the vocabulary is taken as one token without running the
    /// merges (llama.cpp `ignore_merges`, Hugging Face `BPE.ignore_merges`).
    pub(crate) ignore_merges: bool,
    /// Whether a BOS token is added when the file has no `tokenizer.ggml.add_bos_token`.
    pub(crate) add_bos_default: bool,
}

const fn spec(regexes: &'static [&'static str]) -> PreTokenizerSpec {
    PreTokenizerSpec { regexes, ignore_merges: false, add_bos_default: false }
}

/// The `tokenizer.ggml.pre` values this runtime supports, for error messages.
pub(crate) const SUPPORTED: &str = "default, gpt-2 (and gpt-2-regex families such as olmo, mpt, \
     mellum), mellum2 (and starcoder, refact, smollm, ...), qwen2, qwen35, llama3 (llama-bpe, \
     dbrx, smaug-bpe, ...), gpt-4o (llama4, ...)";

/// The pre-tokenizer that llama.cpp uses for the `tokenizer.ggml.pre` value `name`, or `None` for
/// a name this runtime does not support.
pub(crate) fn lookup(name: &str) -> Option<PreTokenizerSpec> {
    let s = match name {
        "default" => spec(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum"
        | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "exaone4" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" => spec(&[GPT2]),
        // Individual digits first, then GPT-2's regex.
        "mellum2" | "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(&[r"\p{N}", GPT2])
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open" => {
            spec(&[QWEN2])
        }
        "qwen35" => spec(&[QWEN35]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => PreTokenizerSpec { regexes: &[LLAMA3], ignore_merges: true, add_bos_default: true },
        "dbrx" | "smaug-bpe" => spec(&[LLAMA3]),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => spec(&[GPT4O]),
        _ => return None,
    };
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every regex compiles with the regex engine `tokenizers` uses.
    #[test]
    fn all_regexes_compile() {
        use tokenizers::SplitDelimiterBehavior;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        for re in [GPT2, QWEN2, QWEN35, LLAMA3, GPT4O, r"[\p{P}\$\+<=>\^~\|]+", r"\p{N}"] {
            Split::new(SplitPattern::Regex(re.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .unwrap_or_else(|e| panic!("{re}: {e}"));
        }
        assert!(lookup("mellum2").is_some());
        assert!(lookup("no-such-pre").is_none());
    }
}
