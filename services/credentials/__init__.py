"""The credentials service: per-tenant secrets and keys, audited, rotated (issue 3)."""
