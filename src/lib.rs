//! graphgate: a drop-in gateway in front of Meta's Graph API.
//!
//! See README.md for what it does and ARCHITECTURE in design notes for how the pieces fit.
pub mod fake_graph;
pub mod graph;
