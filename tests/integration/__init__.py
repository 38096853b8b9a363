"""Tests that need a real Kafka-protocol broker and/or redis-server (``-m integration``)."""
