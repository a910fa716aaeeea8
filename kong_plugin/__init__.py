"""The Aforo Kong plugin: asks the sidecar before Kong proxies a request (access phase)
and reports what was proxied (log phase). Runs in kong-pdk's dedicated plugin server,
started by Kong as ``aforo-kong-plugin -p <kong prefix>``; see kong_plugin/README.md."""

PLUGIN_NAME = "aforo-authorize"
__version__ = "0.1.0"
# After Kong's authentication plugins (key-auth 1250 ... hmac-auth 1030), ACL (950) and
# rate-limiting (910), so a request they reject never spends quota or wallet balance.
PRIORITY = 901
