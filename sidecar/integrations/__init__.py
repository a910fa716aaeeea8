"""What is specific to each gateway: its API client, its pure mapping, its routes."""
