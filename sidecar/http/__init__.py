"""The HTTP transport: Starlette routes over the authorizer and the store."""
