//! Text <-> token ids for GGUF models with a byte-level BPE vocabulary (`tokenizer.ggml.model =
//! "gpt2"`: Mellum2, Qwen2/Qwen3(-MoE), OLMoE, Llama 3, GPT-OSS, ...).
//!
//! The vocabulary, merges and token types stored in the GGUF file are turned into a Hugging Face
//! [`tokenizers::Tokenizer`]: a BPE model, the pre-tokenizer llama.cpp picks for
//! `tokenizer.ggml.pre` followed by the byte-level alphabet, and the control / user-defined tokens
//! as added tokens so that they are recognised inside prompts. Encoding therefore matches
//! llama.cpp's `llama_tokenize`, which the conformance fixtures check token for token.
//!
//! Decoding works on raw bytes (a token can end in the middle of a UTF-8 character), so every
//! token's bytes are precomputed once; [`Tokenizer::decode`] and [`StreamDecoder`] both use them
//! and agree exactly.

mod byte_level;
mod pre;
mod stream;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{GgufError, GgufFile};

pub use stream::StreamDecoder;

/// GGUF metadata keys read here (names as written by llama.cpp's `convert_hf_to_gguf.py`).
mod keys {
    pub(super) const MODEL: &str = "tokenizer.ggml.model";
    pub(super) const PRE: &str = "tokenizer.ggml.pre";
    pub(super) const TOKENS: &str = "tokenizer.ggml.tokens";
    pub(super) const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub(super) const MERGES: &str = "tokenizer.ggml.merges";
    pub(super) const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub(super) const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub(super) const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub(super) const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub(super) const FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
    pub(super) const FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
    pub(super) const FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
    pub(super) const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub(super) const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
}

/// Why a tokenizer could not be built from a GGUF file, or a text could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key could not be read (missing, or of the wrong type); the message names the
    /// file and the key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `tokenizer.ggml.model` names a tokenizer family this runtime does not implement.
    #[error("{file}: `tokenizer.ggml.model` is {value:?}; only \"gpt2\" (byte-level BPE) is supported")]
    UnsupportedModel {
        /// The GGUF file.
        file: PathBuf,
        /// The value found.
        value: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this runtime does not implement.
    #[error("{file}: `tokenizer.ggml.pre` is {value:?}, which is not supported (supported: {supported})")]
    UnsupportedPreTokenizer {
        /// The GGUF file.
        file: PathBuf,
        /// The value found.
        value: String,
        /// The supported values.
        supported: &'static str,
    },
    /// A metadata value is present and readable but inconsistent (a token id past the vocabulary, a malformed
    /// merge, arrays of different lengths, ...).
    #[error("{file}: invalid tokenizer metadata `{key}`: {reason}")]
    Invalid {
        /// The GGUF file.
        file: PathBuf,
        /// The metadata key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `tokenizers` library rejected the vocabulary, merges or pre-tokenizer regexes.
    #[error("{file}: cannot build the BPE tokenizer: {reason}")]
    Build {
        /// The GGUF file.
        file: PathBuf,
        /// The library's message.
        reason: String,
    },
    /// The `tokenizers` library failed to encode a text.
    #[error("cannot tokenize text: {0}")]
    Encode(String),
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`, `enum llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::Undefined,
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }

    /// Control and unknown tokens are "special": parsed in prompts only on request and left out
    /// of decoded text on request (llama.cpp `tokenizer_st_partition` / `token_to_piece`).
    fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }
}

/// End-of-generation token spellings, from llama.cpp `llama_vocab::impl::load` (the list that
/// fills `special_eog_ids`).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Fill-in-the-middle padding / repository / file-separator spellings that llama.cpp also treats
/// as end of generation when the file names no id for them.
const FIM_EOG_TEXTS: &[&[&str]] = &[
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    &["<|file_sep|>"],
];

/// A byte-level BPE tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.
///
/// Cheap to share behind an `Arc`: all methods take `&self`.
pub struct Tokenizer {
    /// Encoder that recognises control tokens in the text (`parse_special = true`).
    hf: tokenizers::Tokenizer,
    /// Encoder that spells control tokens out as text (`parse_special = false`), built on first
    /// use from `hf`.
    hf_plain: OnceLock<tokenizers::Tokenizer>,
    /// Bytes of every token, concatenated; token `i` is `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    /// Whether each token is a control / unknown token.
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: BTreeSet<u32>,
    pre: String,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.n_vocab())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

/// Reads the optional metadata of one file, naming the file and key in every error.
struct Meta<'a> {
    gguf: &'a GgufFile,
}

impl Meta<'_> {
    fn invalid(&self, key: &'static str, reason: impl Into<String>) -> TokenizerError {
        TokenizerError::Invalid { file: self.gguf.path().to_path_buf(), key, reason: reason.into() }
    }

    fn opt_bool(&self, key: &'static str) -> Result<Option<bool>, TokenizerError> {
        Ok(if self.gguf.get(key).is_some() { Some(self.gguf.get_bool(key)?) } else { None })
    }

    /// An optional token id, checked against the vocabulary size.
    fn opt_id(&self, key: &'static str, n_vocab: usize) -> Result<Option<u32>, TokenizerError> {
        if self.gguf.get(key).is_none() {
            return Ok(None);
        }
        let id = self.gguf.get_u32(key)?;
        if usize::try_from(id).map_or(true, |i| i >= n_vocab) {
            return Err(self.invalid(key, format!("token id {id} is not below the vocabulary size {n_vocab}")));
        }
        Ok(Some(id))
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by `gguf`'s `tokenizer.ggml.*` metadata.
    ///
    /// Reads `tokenizer.ggml.model` (must be `"gpt2"`), `.pre` (see the list in the error),
    /// `.tokens`, `.merges`, `.token_type` (optional: all normal), `.bos_token_id`,
    /// `.eos_token_id`, `.eot_token_id`, `.eom_token_id`, `.fim_{pad,rep,sep}_token_id` (all
    /// optional), `.add_bos_token` and `.add_eos_token` (optional; when absent, as llama.cpp:
    /// BOS only for the Llama-3 pre-tokenizer family, never EOS).
    ///
    /// # Errors
    /// [`TokenizerError`] naming the file and key for a missing, mistyped, unsupported or
    /// inconsistent value, or when the `tokenizers` library rejects the vocabulary.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let m = Meta { gguf };
        let file = || gguf.path().to_path_buf();

        let model = gguf.get_str(keys::MODEL)?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel { file: file(), value: model.to_owned() });
        }
        let pre_name = gguf.get_str(keys::PRE)?;
        let pre = pre::lookup(pre_name).ok_or_else(|| TokenizerError::UnsupportedPreTokenizer {
            file: file(),
            value: pre_name.to_owned(),
            supported: pre::SUPPORTED,
        })?;

        let tokens = gguf.get_str_array(keys::TOKENS)?;
        let n_vocab = tokens.len();
        if n_vocab == 0 || u32::try_from(n_vocab).is_err() {
            return Err(m.invalid(keys::TOKENS, format!("{n_vocab} tokens")));
        }
        let types = match gguf.get(keys::TOKEN_TYPE) {
            None => vec![TokenType::Normal; n_vocab],
            Some(_) => {
                let raw = gguf.get_i32_array(keys::TOKEN_TYPE)?;
                if raw.len() != n_vocab {
                    return Err(m.invalid(keys::TOKEN_TYPE, format!("{} entries for {n_vocab} tokens", raw.len())));
                }
                raw.iter()
                    .enumerate()
                    .map(|(i, &t)| {
                        TokenType::from_gguf(t)
                            .ok_or_else(|| m.invalid(keys::TOKEN_TYPE, format!("token {i} has unknown type {t}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let merges = gguf
            .get_str_array(keys::MERGES)?
            .iter()
            .enumerate()
            .map(|(i, merge)| {
                split_merge(merge).ok_or_else(|| {
                    m.invalid(keys::MERGES, format!("entry {i} ({merge:?}) is not two space-separated tokens"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let bos = m.opt_id(keys::BOS_ID, n_vocab)?;
        let eos = m.opt_id(keys::EOS_ID, n_vocab)?;
        let add_bos = m.opt_bool(keys::ADD_BOS)?.unwrap_or(pre.add_bos_default);
        let add_eos = m.opt_bool(keys::ADD_EOS)?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(m.invalid(keys::BOS_ID, "missing although a BOS token is to be added"));
        }
        if add_eos && eos.is_none() {
            return Err(m.invalid(keys::EOS_ID, "missing although an EOS token is to be added"));
        }
        let eog = eog_set(&m, &tokens, eos)?;

        let hf = build_hf(&tokens, &types, merges, pre)
            .map_err(|e| TokenizerError::Build { file: file(), reason: e.to_string() })?;

        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(n_vocab + 1);
        offsets.push(0);
        for (text, ty) in tokens.iter().zip(&types) {
            token_piece(text, *ty, &mut bytes);
            offsets.push(bytes.len());
        }

        Ok(Tokenizer {
            hf,
            hf_plain: OnceLock::new(),
            bytes,
            offsets,
            special: types.iter().map(|t| t.is_special()).collect(),
            bos,
            eos,
            add_bos,
            add_eos,
            eog,
            pre: pre_name.to_owned(),
        })
    }

    /// Token ids for `text`. Control tokens written in the text (`<|im_start|>`) become their ids
    /// when `parse_special` is true and are tokenized as plain text otherwise; user-defined tokens
    /// (`<think>`, `<tool_call>`) are always recognised, as in llama.cpp. BOS / EOS are added only
    /// when the file asks for it (`tokenizer.ggml.add_bos_token` / `add_eos_token`).
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] when the `tokenizers` library fails (not expected for a
    /// byte-level vocabulary, which can spell any input).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let hf = if parse_special {
            &self.hf
        } else {
            self.hf_plain.get_or_init(|| {
                let mut plain = self.hf.clone();
                plain.set_encode_special_tokens(true);
                plain
            })
        };
        let enc = hf.encode_fast(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        ids.extend(self.bos.filter(|_| self.add_bos));
        ids.extend_from_slice(enc.get_ids());
        ids.extend(self.eos.filter(|_| self.add_eos));
        Ok(ids)
    }

    /// The text of `ids`: the tokens' bytes concatenated and read as UTF-8, each invalid or
    /// incomplete sequence replaced by U+FFFD. With `skip_special`, control tokens are left out.
    /// Ids past the vocabulary are ignored. No spaces are "cleaned up" (llama.cpp's
    /// `clean_spaces` would alter code).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut out = Vec::new();
        for &id in ids {
            if !(skip_special && self.is_special(id)) {
                out.extend_from_slice(self.token_bytes(id));
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The raw bytes token `id` stands for: the byte-level spelling decoded for a normal token,
    /// the text itself for a control or user-defined token, nothing for an unused token or an id
    /// past the vocabulary (llama.cpp `token_to_piece` with `special = true`).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&start), Some(&end)) => &self.bytes[start..end],
            _ => &[],
        }
    }

    /// [`Self::token_bytes`] as text, with U+FFFD for bytes that are not complete UTF-8 on their
    /// own (a token may hold part of a multi-byte character).
    pub fn token_to_piece(&self, id: u32) -> String {
        String::from_utf8_lossy(self.token_bytes(id)).into_owned()
    }

    /// The id of the vocabulary entry spelled exactly `text` (byte-level spelling for normal
    /// tokens, e.g. `"Ġthe"`; the literal text for control and user-defined tokens).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.hf.token_to_id(text)
    }

    /// The number of tokens in the vocabulary (rows of the embedding / LM head).
    pub fn n_vocab(&self) -> usize {
        self.special.len()
    }

    /// The BOS token (`tokenizer.ggml.bos_token_id`), if the file names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The EOS token (`tokenizer.ggml.eos_token_id`), if the file names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `id` is a control (or unknown) token, the kind `decode(.., true)` leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether generating `id` ends the turn: EOS, EOT, EOM, the fill-in-the-middle pad /
    /// repository / file-separator tokens, and tokens spelled like `<|im_end|>`,
    /// `<|endoftext|>`, `<|eot_id|>`, ... (llama.cpp `llama_vocab::is_eog`).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// All end-of-generation tokens, in increasing order (see [`Self::is_eog`]).
    pub fn eog_token_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }
}

/// Splits a `tokenizer.ggml.merges` entry at its first space after the first byte, as llama.cpp
/// does (`word.find(' ', 1)`), so that a merge whose left part starts with a space still parses.
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first_len = merge.chars().next()?.len_utf8();
    let pos = merge[first_len..].find(' ')? + first_len;
    let (a, b) = (&merge[..pos], &merge[pos + 1..]);
    (!b.is_empty()).then(|| (a.to_owned(), b.to_owned()))
}

/// Appends the bytes token `text` of type `ty` stands for (llama.cpp `token_to_piece` for BPE
/// vocabularies, `special = true`).
fn token_piece(text: &str, ty: TokenType, out: &mut Vec<u8>) {
    match ty {
        TokenType::Normal | TokenType::Byte => byte_level::decode_into(text, out),
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
            out.extend_from_slice(text.as_bytes());
        }
        TokenType::Unused | TokenType::Undefined => {}
    }
}

/// The end-of-generation set, following llama.cpp `llama_vocab::impl::load`: the ids named by
/// the EOS / EOT / EOM / FIM pad, repository and separator keys (the FIM ones found by spelling
/// when absent), plus every token spelled like an end-of-turn marker; when a vocabulary has
/// `<|return|>` and `<|call|>` (GPT-OSS harmony) or `<|calls|>` and `<|flush|>`, `<|end|>` only
/// ends a message, not the generation, and is left out.
fn eog_set(m: &Meta<'_>, tokens: &[&str], eos: Option<u32>) -> Result<BTreeSet<u32>, TokenizerError> {
    let n_vocab = tokens.len();
    let by_text: HashMap<&str, u32> = tokens.iter().enumerate().map(|(i, t)| (*t, i as u32)).collect();
    let find = |texts: &[&str]| texts.iter().find_map(|t| by_text.get(t).copied());

    let mut eog = BTreeSet::new();
    eog.extend(eos);
    eog.extend(m.opt_id(keys::EOT_ID, n_vocab)?);
    eog.extend(m.opt_id(keys::EOM_ID, n_vocab)?);
    for (key, texts) in [keys::FIM_PAD_ID, keys::FIM_REP_ID, keys::FIM_SEP_ID].into_iter().zip(FIM_EOG_TEXTS) {
        match m.opt_id(key, n_vocab)? {
            Some(id) => eog.insert(id),
            None => find(texts).is_some_and(|id| eog.insert(id)),
        };
    }
    eog.extend(EOG_TEXTS.iter().filter_map(|t| by_text.get(t).copied()));

    let has = |t: &str| by_text.get(t).is_some_and(|id| eog.contains(id));
    if let Some(&end) = by_text.get("<|end|>")
        && ((has("<|return|>") && has("<|call|>")) || (has("<|calls|>") && has("<|flush|>")))
    {
        eog.remove(&end);
    }
    Ok(eog)
}

/// Builds the Hugging Face tokenizer: BPE over the vocabulary and merges, the pre-tokenizer
/// regexes then the byte-level alphabet, and the control / user-defined tokens as added tokens
/// (control and unknown ones as "special", so that `set_encode_special_tokens` can turn just
/// those off).
fn build_hf(
    tokens: &[&str],
    types: &[TokenType],
    merges: Vec<(String, String)>,
    pre: pre::PreTokenizerSpec,
) -> tokenizers::Result<tokenizers::Tokenizer> {
    // For duplicated spellings the last id wins, as in llama.cpp's `token_to_id`.
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| ((*t).to_owned(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(pre.ignore_merges).build()?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(pre.regexes.len() + 1);
    for re in pre.regexes {
        let split = Split::new(SplitPattern::Regex((*re).to_owned()), SplitDelimiterBehavior::Isolated, false)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());

    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_pre_tokenizer(Some(Sequence::new(steps)));

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(text, ty)| !text.is_empty() && (ty.is_special() || **ty == TokenType::UserDefined))
        .map(|(text, ty)| AddedToken::from(*text, ty.is_special()).normalized(false))
        .collect();
    let (special, user): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
    hf.add_special_tokens(special)?;
    hf.add_tokens(user)?;
    Ok(hf)
}

#[cfg(test)]
mod tests;
