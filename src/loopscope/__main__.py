"""`python -m loopscope` is the same as `loopscope`."""

from loopscope.cli import main

raise SystemExit(main())
