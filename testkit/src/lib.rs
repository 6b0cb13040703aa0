//! Test support shared by shadowcache's integration tests (placeholder filled below).
