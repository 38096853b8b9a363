"""The Faust agents and timers of the service, one module each; ``create_app`` installs them."""
