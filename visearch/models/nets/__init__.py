"""Network definitions, one file per network; parameter names are those of the official checkpoints."""
