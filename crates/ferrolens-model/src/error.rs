//! The one error type of the runtime. Every message says what went wrong and what to do.

/// Errors raised by the hooking runtime, the loaders and the tokenizers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A hook name that is not a TransformerLens hook point of this model.
    #[error("unknown hook point `{name}`{suggestion}")]
    UnknownHook {
        /// The name as given.
        name: String,
        /// ", did you mean `...`?" or an empty string.
        suggestion: String,
    },
    /// A hook point that exists in TransformerLens but not in this model
    /// (a layer past the last one, `hook_pos_embed` on a rotary model, ...).
    #[error("hook point `{name}` does not exist in this model: {why}")]
    HookNotInModel {
        /// The hook name.
        name: String,
        /// Why it is absent.
        why: String,
    },
    /// Weights that are missing, truncated or do not match the configuration.
    #[error("weights: {0}")]
    Weights(String),
    /// A configuration file that cannot be used.
    #[error("config: {0}")]
    Config(String),
    /// Input of the wrong shape or content.
    #[error("input: {0}")]
    Input(String),
    /// A tokenizer problem.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A model name or hub id that could not be resolved or fetched.
    #[error("model: {0}")]
    Fetch(String),
    /// An error from candle (tensor op, shape mismatch inside an op).
    /// (Shown without candle's backtrace.)
    #[error("tensor: {}", first_line(.0))]
    Candle(#[from] candle_core::Error),
    /// An I/O error with the path it happened on.
    /// (The I/O error is part of the message, not a `source`, so that error chains do not
    /// print it twice.)
    #[error("{path}: {cause}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        cause: std::io::Error,
    },
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), cause: source }
    }
}

/// The first line of an error's message (candle appends a stack backtrace to some errors; a
/// user-facing message must not show it).
pub fn first_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    s.lines().next().unwrap_or("").trim_end().to_string()
}

/// Result alias of the runtime.
pub type Result<T> = std::result::Result<T, Error>;
