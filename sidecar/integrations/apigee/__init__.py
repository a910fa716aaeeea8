"""Apigee: the Management API client, its pure mapping, the analytics pull and routes."""
