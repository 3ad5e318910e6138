"""The chat layer: the turn runner, conversations, agents and their files, export, per-request
limits and the server-wide generation gate. It calls storage and engines, never the HTTP layer."""
