"""bangerd: the per-user daemon (Unix socket RPC, state owner, reconcile)."""
