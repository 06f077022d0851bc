//! Field-expansion parsing and canonical form.
