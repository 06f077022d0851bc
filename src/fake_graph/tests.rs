//! Socket-level tests of the fake Graph server.
