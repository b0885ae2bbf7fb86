"""What the scripts at the repository root share, one module per concern (README.md, Layout)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
