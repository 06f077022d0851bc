//! The Graph request model: paths, parameters, fields, usage headers and error codes.
pub mod fields;
pub mod request;
pub mod usage;
