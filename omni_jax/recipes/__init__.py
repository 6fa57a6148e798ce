"""Recipe planning shared by the CLIs, notebooks and user code (stage data, media budgets)."""
