//! sbx core.
