"""The pull-through cache: a content-addressed blob store with shared fills and auth-aware hits."""
