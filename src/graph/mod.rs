//! The Graph request model: paths, parameters, bodies, fields, usage headers and error codes.
pub mod body;
pub mod fields;
pub mod request;
pub mod strict_json;
pub mod usage;
