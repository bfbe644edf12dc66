"""The `connector` command: thin sub-commands over the library modules."""
