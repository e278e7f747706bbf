"""Training: ``train_step`` (the jitted, ``pmap`` and sharded steps), ``optimizer`` (AdamW as the
paper), ``checkpoint`` (Orbax, with checksums), ``distributed`` (one process per host) and ``run``
(what ``m2f-jax train`` runs)."""
