//! The simulated Graph API used by the demo, tests and benches.
