"""Driver entry points: what `ray job submit` runs."""
