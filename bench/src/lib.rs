//! shadowcache-bench (filled in below).
