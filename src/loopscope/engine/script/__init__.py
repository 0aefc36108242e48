"""Script mode (DESIGN.md §8): the user's own training script, run as written, stopped at the
training stages torch's hooks report."""
