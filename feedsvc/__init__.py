"""feedsvc: feed/inbox backend."""
