# iSCSI (RFC 7143): the replfs LUN as a target, the primary as an initiator.
