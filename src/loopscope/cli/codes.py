"""Exit codes of every `loopscope` command."""

EXIT_OK, EXIT_STAGE_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_CLAIM_FAILED = 1  # `demo --verify`: a step's claim did not hold
