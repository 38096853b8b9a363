"""The ``liftstream`` command line: one module per command."""
