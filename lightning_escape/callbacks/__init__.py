"""Lightning callbacks of lightning_escape."""
