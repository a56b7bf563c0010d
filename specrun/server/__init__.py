"""`specrun serve`: the scheduler that runs shared passes, and the HTTP side in front of it."""
