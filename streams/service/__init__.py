"""The worker process: Faust app, roles, HTTP API and dashboard, metrics, topics."""
