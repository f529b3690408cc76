"""``corolla api``: an OpenAI-compatible HTTP gateway to the models a swarm serves."""
