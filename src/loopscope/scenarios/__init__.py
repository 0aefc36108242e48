"""Built-in experiments, one module each, all data generated locally."""
