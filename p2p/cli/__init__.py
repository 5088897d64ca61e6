"""The command line: `p2p generate | edit | sweep | attention | invert | eval | vocab | download | convert`."""
from .main import main

__all__ = ["main"]
