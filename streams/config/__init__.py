"""Settings: flags, environment variables, client factories (Kafka, Redis)."""
