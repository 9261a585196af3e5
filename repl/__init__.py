# Replication: capture into data sets, the wire protocol, the sender, receiver and
# applier, syncs and failover.
