"""First-party backends. Each registers through the ``sparsekit.backends`` entry-point group."""
