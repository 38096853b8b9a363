"""liftstream's streaming side. Importing it installs ``streams.native``'s finder, which runs the
compiled build of the ingest rules when it was built from the current source (else the ``.py``)."""

from streams.native import install as _install_native

_install_native()
