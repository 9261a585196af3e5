# The FUSE side: the primary mount, the standby mount, and the daemons that run them.
