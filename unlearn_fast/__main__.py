"""`python -m unlearn_fast demo|bench|audit`: see unlearn_fast/cli.py."""
import sys

from .cli import main

sys.exit(main())
