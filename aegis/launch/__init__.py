"""Inside the allocation: the head, the per-node agents, engine ranks, health, the endpoints file."""
