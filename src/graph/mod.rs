//! The Graph request model: paths, fields, parameters.
pub mod fields;
pub mod usage;
