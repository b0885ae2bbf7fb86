import os
import sys

# the scripts live at the repository root, nanoGPT style
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
