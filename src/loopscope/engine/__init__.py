"""The training-loop engine: torch only, never Textual."""
