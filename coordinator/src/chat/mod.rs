//! Chat templates: turning an OpenAI-style conversation into the model's prompt text.
//!
//! Models ship a Jinja template (`tokenizer.chat_template` in GGUF, copied from the Hugging Face
//! `tokenizer_config.json`). It is rendered here with minijinja set up the way transformers sets
//! up Jinja2 for `apply_chat_template` (`chat_template_utils.py`): `trim_blocks` and
//! `lstrip_blocks`, loop controls, `True` / `False` / `None` printed as Python prints them, Python string / dict methods (`minijinja-contrib` pycompat:
//! `startswith`, `strip`, `split`, `items`, ...), `raise_exception(msg)`, `strftime_now(fmt)` and
//! transformers' own `tojson` (Python `json.dumps` output, see `json.rs`). The conversation comes from clients, so every failure
//! is an error value, never a panic.

mod json;
pub(crate) mod strftime;
mod value;

use std::collections::BTreeMap;
use std::path::PathBuf;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::ValueKind;
use minijinja::{Environment, Error, ErrorKind, Output, State, Value};

use crate::gguf::{GgufError, GgufFile};

/// The name the template is registered under (appears in error locations).
const TEMPLATE_NAME: &str = "chat_template";

/// GGUF keys read by [`ChatTemplate::from_gguf`].
const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

/// Template variables set by [`ChatTemplate::render`] itself, which `kwargs` may not replace
/// (in transformers, passing them twice is a `TypeError`).
const RESERVED: [&str; 3] = ["messages", "tools", "add_generation_prompt"];

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A metadata key could not be read (present but of the wrong type); the message names the
    /// file and the key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The BOS / EOS token id is past the end of the vocabulary.
    #[error("{file}: `{key}` is token {id}, past the vocabulary of {n_vocab} tokens")]
    BadTokenId {
        /// The GGUF file.
        file: PathBuf,
        /// The metadata key.
        key: &'static str,
        /// The id found.
        id: u32,
        /// The vocabulary size.
        n_vocab: usize,
    },
    /// The template source does not compile.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The request's messages, tools or template arguments have the wrong shape.
    #[error("invalid chat request: {0}")]
    InvalidInput(String),
    /// Rendering failed: the template called `raise_exception` (typically rejecting the
    /// conversation, e.g. roles that do not alternate) or hit an error on this input.
    #[error("chat template error: {0}")]
    Render(String),
}

/// A compiled chat template plus the special-token texts it may print.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template. `bos_token` / `eos_token` stay undefined until
    /// [`Self::with_special_tokens`].
    ///
    /// # Errors
    /// [`ChatError::Syntax`] when the source is not a valid template.
    pub fn new(source: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_debug(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", json::tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: &str| strftime::DateTime::now_utc().format(format));
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(|e| ChatError::Syntax(e.to_string()))?;
        Ok(ChatTemplate { env, bos_token: None, eos_token: None })
    }

    /// Sets the texts of the `bos_token` and `eos_token` template variables (`None`: undefined).
    #[must_use]
    pub fn with_special_tokens(mut self, bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        self.bos_token = bos_token.map(str::to_owned);
        self.eos_token = eos_token.map(str::to_owned);
        self
    }

    /// The template stored in `tokenizer.chat_template`, with `bos_token` / `eos_token` set to
    /// the texts of `tokenizer.ggml.bos_token_id` / `eos_token_id` (as llama.cpp's server does).
    /// `Ok(None)` when the file has no template.
    ///
    /// # Errors
    /// [`ChatError::Gguf`] for a mistyped value, [`ChatError::BadTokenId`] for a BOS / EOS id
    /// past the vocabulary (both name the file and key); [`ChatError::Syntax`] when the template
    /// does not compile.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Option<ChatTemplate>, ChatError> {
        if gguf.get(KEY_TEMPLATE).is_none() {
            return Ok(None);
        }
        let source = gguf.get_str(KEY_TEMPLATE)?;
        let special =
            |key: &'static str| -> Result<Option<String>, ChatError> {
                if gguf.get(key).is_none() {
                    return Ok(None);
                }
                let id = gguf.get_u32(key)?;
                let tokens = gguf.get_str_array(KEY_TOKENS)?;
                let text = usize::try_from(id).ok().and_then(|i| tokens.get(i)).ok_or_else(|| {
                    ChatError::BadTokenId { file: gguf.path().to_path_buf(), key, id, n_vocab: tokens.len() }
                })?;
                Ok(Some((*text).to_owned()))
            };
        let (bos, eos) = (special(KEY_BOS)?, special(KEY_EOS)?);
        Ok(Some(ChatTemplate::new(source)?.with_special_tokens(bos.as_deref(), eos.as_deref())))
    }

    /// Renders the prompt for a conversation.
    ///
    /// - `messages`: a JSON array of message objects (`role`, `content`, and optionally
    ///   `tool_calls`, `name`, `reasoning_content`, ... as the template expects them).
    /// - `tools`: the tool definitions (`[{"type": "function", "function": {..}}]`), or `None`
    ///   (the template then sees `tools` as `none`, as in transformers).
    /// - `add_generation_prompt`: whether to append the opening of the assistant's turn.
    /// - `kwargs`: further template variables (`enable_thinking`, ...); they may override
    ///   `bos_token` / `eos_token` but not `messages`, `tools` or `add_generation_prompt`.
    ///
    /// Object key order is kept (it shows in `tojson` output).
    ///
    /// # Errors
    /// [`ChatError::InvalidInput`] when `messages` is not an array, `tools` is neither an array
    /// nor null, or `kwargs` names a reserved variable; [`ChatError::Render`] when the template
    /// raises or fails on this input.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatError> {
        if !messages.is_array() {
            return Err(ChatError::InvalidInput("`messages` must be an array".into()));
        }
        let tools = tools.filter(|t| !t.is_null());
        if tools.is_some_and(|t| !t.is_array()) {
            return Err(ChatError::InvalidInput("`tools` must be an array".into()));
        }
        if let Some(name) = RESERVED.iter().find(|name| kwargs.contains_key(**name)) {
            return Err(ChatError::InvalidInput(format!("template argument `{name}` is set by the server")));
        }

        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::from(eos.as_str()));
        }
        for (k, v) in kwargs {
            ctx.insert(k.clone(), value::from_json(v));
        }
        ctx.insert("messages".into(), value::from_json(messages));
        ctx.insert("tools".into(), tools.map_or(Value::from(()), value::from_json));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));

        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatError::Render(e.to_string()))?;
        template.render(Value::from_object(ctx)).map_err(|e| ChatError::Render(e.to_string()))
    }
}

/// Prints `{{ value }}` as Jinja2 does under Python: `True` / `False` / `None` rather than
/// minijinja's `true` / `false` / `none`; everything else as minijinja prints it.
fn python_formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        ValueKind::None => out.write_str("None")?,
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

/// `raise_exception(message)`: the template rejects its input (transformers raises
/// `TemplateError(message)`).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests;
