"""``python -m vmscope`` is the same as the ``vmscope`` command."""

from vmscope.cli import main

raise SystemExit(main())
