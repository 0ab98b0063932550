"""The decoding algorithm, free of families, models and scheduling: the per-row loop and the pieces it is made of
(routing policies, acceptance estimators, speculative acceptance, sampling, strategies, block state, stats, traces)
and the request protocol it speaks to whoever runs its forwards."""
