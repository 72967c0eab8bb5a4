//! The tokenizer side of a model, loaded vocab-only from the head file:
//! tokenization, the chat template, end-of-generation tokens and a streaming
//! detokenizer that never splits a UTF-8 character.

use std::path::Path;

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tracing::warn;

use crate::{EngineError, Result};

pub struct Vocab {
    model: LlamaModel,
    /// The model's own chat template, or ChatML when it carries none (as
    /// llama.cpp's server does).
    chat_template: LlamaChatTemplate,
}

/// The template used for a model that carries none: llama.cpp's server falls
/// back to ChatML too (`common_chat_templates_init`).
pub const FALLBACK_CHAT_TEMPLATE: &str = "chatml";

impl Vocab {
    /// Loads the tokenizer of a head file (or of any full GGUF).
    pub fn load(path: &Path) -> Result<Vocab> {
        let backend = crate::backend()?;
        if !path.is_file() {
            return Err(EngineError::Load(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|e| {
            EngineError::Load(format!(
                "cannot load the tokenizer from {}: {e}",
                path.display()
            ))
        })?;
        // llama.cpp applies the templates it recognises; for one it does
        // not, its server falls back to ChatML too.
        let own = model
            .chat_template(None)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                let probe =
                    LlamaChatMessage::new("user".into(), "hi".into()).map_err(|e| e.to_string())?;
                model
                    .apply_chat_template(&t, &[probe], true)
                    .map(|_| t)
                    .map_err(|e| format!("llama.cpp cannot apply it: {e}"))
            });
        let chat_template = match own {
            Ok(t) => t,
            Err(e) => {
                warn!(
                    "{}: no usable chat template ({e}); chat requests use {FALLBACK_CHAT_TEMPLATE}, as llama.cpp's server does",
                    path.display()
                );
                LlamaChatTemplate::new(FALLBACK_CHAT_TEMPLATE)
                    .map_err(|e| EngineError::Load(format!("chat template: {e}")))?
            }
        };
        Ok(Vocab {
            model,
            chat_template,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab() as usize
    }

    /// Tokenizes a prompt (adding BOS when the model wants it; special tokens parsed).
    pub fn tokenize(&self, text: &str) -> Vec<i32> {
        let v = self.model.vocab();
        v.tokenize(text.as_bytes(), v.should_add_bos(), true)
            .iter()
            .map(|t| t.0)
            .collect()
    }

    pub fn is_eog(&self, token: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    /// Bytes of one token as text (special tokens rendered empty).
    pub fn piece(&self, token: i32) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), false, None)
    }

    /// Applies the model's chat template (ChatML when it has none) to
    /// `(role, content)` messages, ending with the assistant's turn.
    pub fn apply_chat_template(&self, messages: &[(String, String)]) -> Result<String> {
        let msgs = messages
            .iter()
            .map(|(r, c)| LlamaChatMessage::new(r.clone(), c.clone()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| EngineError::InvalidInput(format!("chat message: {e}")))?;
        self.model
            .apply_chat_template(&self.chat_template, &msgs, true)
            .map_err(|e| EngineError::InvalidInput(format!("chat template: {e}")))
    }
}

/// Turns a stream of token pieces into text chunks that are whole UTF-8.
#[derive(Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds a token's bytes; returns the text that is complete so far.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // An invalid sequence (not just an unfinished one) is emitted lossily.
                if e.error_len().is_some() {
                    let out = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    return out;
                }
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
        }
    }

    /// Whatever is left at the end.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stream_keeps_characters_whole() {
        let mut s = TextStream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.push(b"a"), "a");
        assert_eq!(s.push(&euro[..1]), "");
        assert_eq!(s.push(&euro[1..]), "€");
        assert_eq!(s.push(&[0xff]), "\u{fffd}");
        assert_eq!(s.push(&euro[..2]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
