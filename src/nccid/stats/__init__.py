"""Clinical cleaning, summaries, dashboard and public statistics data."""
