"""Edge-triggered alerts: pure rules and their state in Redis."""
