//! The error type shared by the whole client: a message for the user that already says what
//! failed and where.

/// A result whose error is a message for the user.
pub type Result<T> = std::result::Result<T, String>;
