# The secondary's side: the door (gate) and the receiver that stages sets, the
# applier and what a batch changes (footprint), promotion to primary, a rejoin
# after a failover, and running the secondary (run).
