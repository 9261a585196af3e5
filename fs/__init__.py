# The FUSE side: the primary mount, the standby mount, and running them.
