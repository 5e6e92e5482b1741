"""Metering: the usage ledger, the price table, quotas, exact budgets, leases and chargeback."""
