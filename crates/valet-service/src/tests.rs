//! In-process tests of the service (filled in below).
