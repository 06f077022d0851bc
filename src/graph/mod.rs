//! The Graph request model: paths, parameters, bodies, fields, usage headers and error codes.
pub mod body;
pub mod call;
pub mod fields;
pub mod headers;
pub mod request;
pub mod strict_json;
pub mod usage;
