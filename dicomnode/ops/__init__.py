"""Operating the node: start-up checks, the HTTP server (health, metrics, status page)."""
