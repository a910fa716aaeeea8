"""Kong: the Admin API (and Konnect) client, the catalog mapping, the import routes."""
