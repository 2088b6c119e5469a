"""``launch local``: plan (pure) and agent (torch's elastic agent, carrying the plan out)."""
