"""Allow ``python -m aspy``."""
from .cli import main

raise SystemExit(main())
