"""Run the CLI as ``python -m mailwarden``.

Security: none (delegates to the CLI).
"""

from mailwarden.cli.main import main

raise SystemExit(main())
