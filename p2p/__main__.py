"""`python -m p2p ...` is the `p2p` command."""
import sys

from p2p.cli import main

sys.exit(main())
