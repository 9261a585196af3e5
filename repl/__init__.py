# Replication, in three sub-packages and what they share. primary/: the primary's
# side (capture into data sets, syncs, the sender). secondary/: the secondary's side
# (receiver, applier, promotion, rejoin, running the secondary). cluster/: replfs
# node (etcd, election, lease). Here, shared by both sides: the wire format
# (protocol), links, TLS, the redo rule (apply), the tree, the activity log,
# divergence, verify, config, control sockets, metrics; and the transports that
# carry the frames (fc/, iscsi/, scsi/).
