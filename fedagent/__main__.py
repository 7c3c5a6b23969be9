"""``python -m fedagent``: see :mod:`fedagent.cli`."""

from fedagent.cli import main

raise SystemExit(main())
