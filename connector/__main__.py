"""`python -m connector`: the same command line as `connector`."""

import sys

from connector.cli.main import main

sys.exit(main())
