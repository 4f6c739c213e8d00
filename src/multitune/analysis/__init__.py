"""Task relations: gradient conflict, lookahead affinity, and task grouping."""
