"""State every worker shares through Redis: dedup, inboxes, leases, stats and the reaper."""
