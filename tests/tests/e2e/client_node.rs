//! Filled in by the client work (issue 35).
