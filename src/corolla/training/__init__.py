"""SWARM training: pipeline stages served by swarms of peers, trainers that wire micro-batches through them."""
