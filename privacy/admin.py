"""Admin for privacy records (budget ledger, secure-aggregation sessions, key records), as they arrive."""
