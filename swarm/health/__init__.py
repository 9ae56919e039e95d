"""The swarm's health page: any peer can run it (swarm-health); the swarm never depends on it."""
