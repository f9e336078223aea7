"""First-party correctors. Each registers through the ``sparsekit.correctors`` entry-point group."""
