"""`hwr serve`: a trained model behind an HTTP API and a draw-a-digit page (needs `hwr-dist[serve]`)."""
