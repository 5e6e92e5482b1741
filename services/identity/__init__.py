"""identity: tenants, principals, API keys, signed tokens and the keys that sign them."""
