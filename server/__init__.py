"""The volunteer side of Swarm: hosting a span of blocks and serving it over hivemind."""
