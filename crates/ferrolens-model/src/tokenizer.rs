//! Tokenizers: `tokenizer.json`, GPT-2 `vocab.json`/`encoder.json` + `merges.txt`/`vocab.bpe`,
//! or the byte-level BPE embedded in a GGUF file.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// A tokenizer. `encode` never adds special tokens (TL's `prepend_bos=False`); add a BOS
/// yourself with [`Tokenizer::bos_id`] when the model wants one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    prepend_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab={}, bos={:?})", self.vocab_size(), self.bos)
    }
}

impl Tokenizer {
    /// Wrap a `tokenizers` tokenizer.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer, bos: Option<u32>) -> Self {
        Tokenizer { inner, bos, prepend_bos: false }
    }

    /// Read a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        Ok(Tokenizer { inner, bos: None, prepend_bos: false })
    }

    /// GPT-2's byte-level BPE from `vocab.json` (alias `encoder.json`) and `merges.txt` (alias `vocab.bpe`).
    pub fn gpt2(vocab: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Self> {
        let (v, m) = (vocab.as_ref(), merges.as_ref());
        let bpe = BPE::from_file(&v.display().to_string(), &m.display().to_string())
            .build()
            .map_err(|e| Error::Tokenizer(format!("cannot build GPT-2 BPE from {} and {}: {e}", v.display(), m.display())))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        inner.add_special_tokens(vec![AddedToken::from("<|endoftext|>", true)]).map_err(|e| Error::Tokenizer(format!("cannot add <|endoftext|>: {e}")))?;
        let bos = inner.token_to_id("<|endoftext|>");
        Ok(Tokenizer { inner, bos, prepend_bos: false })
    }

    /// The tokenizer embedded in a GGUF file: byte-level BPE (`tokenizer.ggml.model = gpt2`) with the pre-tokenizer that
    /// `tokenizer.ggml.pre` names (`smollm`: digits one by one, then byte-level without a prefix
    /// space; control tokens special); or, for Gemma files (a `llama` SentencePiece vocabulary
    /// with scores), SentencePiece BPE over the pieces (see `gemma_from_gguf`).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        use candle_core::quantized::tokenizer::TokenizerFromGguf;
        let kind = ct.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let arch = ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if kind == "llama" {
            if arch.starts_with("gemma") {
                return Self::gemma_from_gguf(ct);
            }
            return Err(Error::Tokenizer(format!(
                "this `{arch}` GGUF file has a SentencePiece (`llama`) vocabulary, which ferrolens reads for Gemma files only; load the Hugging Face checkpoint (with its tokenizer.json) instead"
            )));
        }
        let mut inner =
            tokenizers::Tokenizer::from_gguf(ct).map_err(|e| Error::Tokenizer(format!("cannot build the GGUF tokenizer: {}", crate::error::first_line(&e))))?;
        let pre = ct.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let byte_level = ByteLevel::new(false, true, true);
        match pre.as_str() {
            "smollm" | "starcoder" => {
                let seq = Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), PreTokenizerWrapper::ByteLevel(byte_level)]);
                inner.with_pre_tokenizer(Some(seq));
            }
            "gpt2" | "default" | "" => {
                inner.with_pre_tokenizer(Some(byte_level));
            }
            _ => {} // llama3, qwen2, ...: candle's pipeline for that name.
        }
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let bos = ct.metadata.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok());
        Ok(Tokenizer { inner, bos, prepend_bos: false })
    }

    /// Gemma's SentencePiece BPE from a GGUF vocabulary (pieces, scores = minus the merge rank,
    /// token types), as the model's own `tokenizer.model` encodes: pairs merge in the order of the
    /// merged piece's score (the merges transformers' `generate_merges` derives from the same
    /// scores), unknown bytes fall back to `<0xNN>` pieces, spaces are `▁` and no space is added
    /// in front; user-defined pieces (newline runs, markup) are matched whole, control tokens are
    /// special. Checked against the SentencePiece library on a model built from the same pieces
    /// (tests/tokenizers.rs); on runs of several spaces Hugging Face's tokenizer.json for Gemma
    /// may differ (it is not available offline to compare). (transformers 4.57 builds a Unigram model from these scores instead, which
    /// splits common words into characters; docs/architecture.md.)
    fn gemma_from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = &ct.metadata;
        let arr = |k: &str| -> Result<Vec<gguf_file::Value>> {
            md.get(k).and_then(|v| v.to_vec().ok()).cloned().ok_or_else(|| Error::Tokenizer(format!("the GGUF file lacks `{k}`")))
        };
        let tokens: Vec<String> = arr("tokenizer.ggml.tokens")?
            .iter()
            .map(|t| t.to_string().cloned().map_err(|e| Error::Tokenizer(format!("a GGUF token is not a string: {e}"))))
            .collect::<Result<_>>()?;
        let scores: Vec<f32> = arr("tokenizer.ggml.scores")?
            .iter()
            .map(|s| s.to_f32().map_err(|e| Error::Tokenizer(format!("a GGUF token score is not a float: {e}"))))
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            Some(v) => v.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if tokens.len() != scores.len() || tokens.len() != types.len() {
            return Err(Error::Tokenizer(format!("{} tokens, {} scores and {} types in the GGUF file", tokens.len(), scores.len(), types.len())));
        }
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let vocab: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        // Merges: every split of a normal piece into two pieces of the vocabulary, ranked by the
        // merged piece's score (highest first), ties by the lengths of the left and right parts
        // (longest first) and then their ids, as transformers' generate_merges.
        let mut merges: Vec<(f32, usize, usize, usize, usize, usize)> = Vec::new();
        for (i, piece) in tokens.iter().enumerate() {
            if types[i] != 1 {
                continue;
            }
            for (cut, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(cut);
                if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                    merges.push((scores[i], l.chars().count(), r.chars().count(), li, ri, i));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)).then(a.3.cmp(&b.3)).then(a.4.cmp(&b.4)));
        let merges: Vec<serde_json::Value> = merges.iter().map(|m| serde_json::json!([tokens[m.3], tokens[m.4]])).collect();
        let vocab_json: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i.into())).collect();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            // 3 = control (special), 4 = user-defined (matched whole, not special). llama.cpp
            // writes Gemma's space-run pieces with raw spaces, which SentencePiece matches against
            // text whose spaces are already `▁`, i.e. never; so do we.
            let space_run = t.contains(' ') && t.trim().is_empty();
            if types[i] == 3 || (types[i] == 4 && !space_run) {
                added.push(serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}));
            }
        }
        let unk = id("tokenizer.ggml.unknown_token_id").and_then(|u| tokens.get(u as usize)).cloned();
        let j = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab_json, "merges": merges},
        });
        let inner: tokenizers::Tokenizer =
            j.to_string().parse().map_err(|e| Error::Tokenizer(format!("cannot build the Gemma tokenizer from the GGUF vocabulary: {e}")))?;
        Ok(Tokenizer { inner, bos: id("tokenizer.ggml.bos_token_id"), prepend_bos: true })
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A whole prompt's token ids: the BOS token first when the model wants it
    /// ([`Tokenizer::prepends_bos`]; set from the model's `Config::prepend_bos`), then
    /// [`Tokenizer::encode`]. Label positions and prompt lengths are counted in these ids.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        if self.prepend_bos {
            self.encode_with_bos(text)
        } else {
            self.encode(text)
        }
    }

    /// Whether [`Tokenizer::encode_prompt`] puts the BOS token first.
    pub fn prepends_bos(&self) -> bool {
        self.prepend_bos && self.bos.is_some()
    }

    /// The same tokenizer with prompts getting the BOS token first or not.
    pub fn with_prepend_bos(mut self, on: bool) -> Self {
        self.prepend_bos = on;
        self
    }

    /// Token ids with the BOS token first (where the tokenizer has one).
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        ids.extend(self.bos);
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Decode ids to text (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}")))
    }

    /// The string of each id (`Ġ` marks a leading space in byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of an exact vocabulary entry.
    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    /// The one token that `text` encodes to, or an error that shows how it splits.
    /// Use a leading space for words inside a sentence (`" Mary"`).
    pub fn single_token(&self, text: &str) -> Result<u32> {
        let ids = self.encode(text)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => {
                let pieces: Vec<String> = ids.iter().map(|i| self.id_to_token(*i).unwrap_or_default()).collect();
                Err(Error::Input(format!(
                    "answer {text:?} is {} tokens ({pieces:?}), not one; pick a single-token answer (with a leading space inside a sentence)",
                    ids.len()
                )))
            }
        }
    }

    /// The BOS token id, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The same tokenizer with `bos` as its BOS token (e.g. `config.json`'s `bos_token_id` for
    /// a `tokenizer.json`, which does not say which token is the BOS).
    pub fn with_bos(mut self, bos: Option<u32>) -> Self {
        self.bos = bos;
        self
    }

    /// Write a `tokenizer.json` that `tokenizers` (Rust or Python) and [`Tokenizer::from_file`] read.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner.save(path, false).map_err(|e| Error::Tokenizer(format!("cannot write {}: {e}", path.display())))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
