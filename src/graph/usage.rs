//! Parsing of Meta usage headers and error classification.
