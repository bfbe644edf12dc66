"""The `connector` command: thin sub-commands over the library modules."""

import os

# Read once, when grpc loads (before any sub-command module is imported): gRPC's C core
# writes its own lines to stderr, past the log format the command sets up (not JSON), one
# per failed TLS handshake at its default level, which anyone who reaches the port can
# cause. Only its errors, unless the operator asks for more with GRPC_VERBOSITY.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
