"""The gRPC transport: the Sidecar service and Envoy's rate limit service over the
same authorizer and store as HTTP. Stubs in ``gen/`` come from ``proto/``."""
