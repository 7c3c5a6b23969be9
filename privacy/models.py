"""Privacy records (budget ledger, secure-aggregation sessions, key records) live here as they arrive."""
