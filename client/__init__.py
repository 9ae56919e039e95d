"""The user side of Swarm: distributed model classes, routing and inference sessions."""
