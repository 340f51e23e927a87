//! The dump's decisions against a scripted host (what is refused, what is frozen and thawed on
//! which error), with temporary directories for files.
