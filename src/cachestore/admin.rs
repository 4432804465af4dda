//! admin: operator commands on a cache directory (in progress).
